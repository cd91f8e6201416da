"""The names that make a trainkit checkpoint: format version, dict keys, file names, errors.

``FORMAT_KEY``/``FORMAT_VERSION`` and the ``KEY_*`` keys of a checkpoint dict, the names of the files in
``checkpoint_dir`` (``step_%09d.ckpt``, ``best.ckpt``, the hidden temporaries of a write in flight) and
:class:`CheckpointError`. Apart because every other checkpoint module needs these and this one imports
nothing of trainkit: storage, inspection, the sharded directories and the Checkpointer share one
definition without import cycles. :mod:`trainkit.checkpoint` re-exports all of it.
"""

from __future__ import annotations

import re
import uuid

FORMAT_VERSION = 1
FORMAT_KEY = "trainkit_format"
BEST_NAME = "best.ckpt"
_REGULAR = re.compile(r"^step_(\d+)\.ckpt$")
# What temporary_name() makes (and a sharded save's hidden .trash- copy of the directory it replaces).
_TEMPORARY = re.compile(r"^\..+\.(tmp|trash)-[0-9a-f]{32}$")

# Keys of a checkpoint dict. Stable: outside code may read them.
KEY_MODEL = "model"
KEY_EMA = "ema"
KEY_OPTIMIZERS = "optimizers"
KEY_SCHEDULERS = "schedulers"
KEY_GRAD_SCALER = "grad_scaler"
KEY_TRAINER = "trainer"
KEY_CALLBACKS = "callbacks"
KEY_TASK = "task"
REQUIRED_KEYS = (FORMAT_KEY, KEY_MODEL, KEY_OPTIMIZERS, KEY_SCHEDULERS, KEY_TRAINER)


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that cannot be written or read safely; the message names the file and the reason."""


class CheckpointReadError(CheckpointError):
    """The bytes of a checkpoint could not be fetched (the store or the disk failed): nothing is known about
    its contents, so ``ckpt_path="last"`` raises it rather than skipping to an older checkpoint."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path or URL names no file (a ``ValueError`` for a bad argument, and a
    ``FileNotFoundError``)."""


def regular_name(step: int) -> str:
    return f"step_{step:09d}.ckpt"


def regular_step(name: str) -> int | None:
    match = _REGULAR.match(name)
    return int(match.group(1)) if match else None


def temporary_name(name: str) -> str:
    """The hidden name a write of ``name`` goes to before it is renamed into place:
    ``.<name>.tmp-<32 hex digits>``, unique per write."""
    return f".{name}.tmp-{uuid.uuid4().hex}"


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` (a base name) is a hidden name of trainkit's writes: one that ``temporary_name``
    makes, or ``.<name>.trash-<32 hex digits>`` (the old copy a sharded save moves aside)."""
    return _TEMPORARY.match(name) is not None


def first_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, without torch's advice on loading unsafely."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if "weights_only" in text or not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}"
