"""Checkpoint files: one layout, safe contents, atomic writes through fsspec.

Layout inside ``checkpoint_dir`` (any fsspec path or URL)::

    step_000000250.ckpt   regular checkpoints, one per ``save_interval`` steps, all kept;
    step_000000500.ckpt   zero-padded so that name order is step order
    best.ckpt             exactly one; replaced only once the new one is complete

Every file is a ``torch.save`` zip whose contents are tensors, numbers, strings, lists, tuples and dicts
only, so it loads with ``torch.load(..., weights_only=True)``; trainkit refuses to write anything else and
never loads without ``weights_only=True``.

Atomicity: on a local disk the bytes go to a hidden temporary name in the same directory, are flushed
and fsynced, then renamed over the final name (and the directory fsynced). On object stores (S3, GCS,
Azure, memory://) one ``pipe`` puts the whole object: a single PUT, or a multipart upload that the store
only makes visible when it completes. Other filesystems write a temporary name and move it.

Files. This module holds the reading entry points (``load_checkpoint``, ``load_weights``, the
``torch.compile`` key helpers) and re-exports the rest, so ``trainkit.checkpoint`` is the one import:
``checkpoint_format`` (format version, keys, file names, errors), ``checkpoint_inspect`` (what may be
written; classifying a file before torch loads it), ``checkpoint_storage`` (``CheckpointStorage``: the
atomic writes above, retries, temporaries; the step probe and ``find_last``) and ``checkpoint_async``
(``AsyncWriter``: background writes).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoint_async import AsyncWriter, snapshot
from .checkpoint_format import (
    BEST_NAME,
    FORMAT_KEY,
    FORMAT_VERSION,
    KEY_CALLBACKS,
    KEY_EMA,
    KEY_GRAD_SCALER,
    KEY_MODEL,
    KEY_OPTIMIZERS,
    KEY_SCHEDULERS,
    KEY_TASK,
    KEY_TRAINER,
    REQUIRED_KEYS,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    is_temporary_name,
    regular_name,
    regular_step,
    temporary_name,
)
from .checkpoint_inspect import check_weights_only, read_file
from .checkpoint_storage import CheckpointStorage, complete_checkpoints, find_last, probe_step, url_to_fs

__all__ = [
    "BEST_NAME",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "KEY_CALLBACKS",
    "KEY_EMA",
    "KEY_GRAD_SCALER",
    "KEY_MODEL",
    "KEY_OPTIMIZERS",
    "KEY_SCHEDULERS",
    "KEY_TASK",
    "KEY_TRAINER",
    "REQUIRED_KEYS",
    "AsyncWriter",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointStorage",
    "check_weights_only",
    "complete_checkpoints",
    "find_last",
    "is_temporary_name",
    "load_checkpoint",
    "load_weights",
    "match_compile_keys",
    "probe_step",
    "regular_name",
    "regular_step",
    "snapshot",
    "strip_compile_prefix",
    "temporary_name",
    "url_to_fs",
]


def load_checkpoint(
    path_or_url: str | os.PathLike[str],
    map_location: Any = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a trainkit checkpoint dict from any fsspec path or URL, always with ``weights_only=True``.

    A sharded checkpoint directory (``step_%09d/`` written under ``strategy="fsdp"``) is read here, in
    one plain process, with full (unsharded) tensors; ``map_location`` is then a device or device string.

    Example::

        ckpt = tk.load_checkpoint("s3://bucket/run1/best.ckpt",
                                  storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:5000"}})
        model.load_state_dict(ckpt["model"])          # or ckpt["ema"]["state_dict"] for the EMA weights
    """
    shown = os.fspath(path_or_url)
    fs, path = url_to_fs(shown, storage_options)
    if fs.isdir(path):  # a sharded (DCP) checkpoint directory: read in this process, full tensors
        from .dcp import load_checkpoint_dir

        return load_checkpoint_dir(shown, map_location, storage_options)
    return read_file(fs, path, shown, map_location)


# torch.compile wraps a module in an OptimizedModule that holds the original as ``_orig_mod``, so a compiled
# submodule's state-dict keys read ``net._orig_mod.weight``. Checkpoints hold the plain names.
_COMPILE_PART = "_orig_mod"


def strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every ``_orig_mod.`` path component removed from its keys (same order, same
    values): ``net._orig_mod.weight`` -> ``net.weight``. Keys without one are kept as they are; a
    ``state_dict``'s ``_metadata`` attribute is carried over without the component too.

    Example::

        model.net = torch.compile(model.net)
        plain = tk.checkpoint.strip_compile_prefix(model.state_dict())   # loads into an uncompiled model
    """
    out = type(state_dict)((_strip_key(k), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = type(metadata)((_strip_key(k), v) for k, v in metadata.items())  # type: ignore[attr-defined]
    return out


def _strip_key(key: str) -> str:
    if _COMPILE_PART not in key:
        return key
    return ".".join(part for part in key.split(".") if part != _COMPILE_PART)


def match_compile_keys(module: torch.nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` renamed to ``module``'s own keys, with ``_orig_mod.`` components ignored on both
    sides: a plain checkpoint then loads into a module holding ``torch.compile``d submodules and back."""
    target = {_strip_key(k): k for k in module.state_dict()}
    prefixes = {_strip_key(name): name for name, _ in module.named_modules()}
    state = strip_compile_prefix(state_dict)
    renamed = type(state)((target.get(k, k), v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # per-module versions (BatchNorm's), under the target's module names
        renamed._metadata = type(metadata)((prefixes.get(k, k), v) for k, v in metadata.items())  # type: ignore[attr-defined]
    return renamed


def load_weights(
    module: torch.nn.Module,
    path_or_url: str | os.PathLike[str],
    *,
    ema: bool = False,
    strict: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """Load trained weights (the raw ones, or with ``ema=True`` the averaged ones) into ``module``.

    ``path_or_url`` is a checkpoint file or a sharded checkpoint directory (only its weights are read).
    ``module`` may hold ``torch.compile``d submodules, or be compiled itself, whether or not the run that
    saved the checkpoint compiled them: ``_orig_mod.`` key components are matched away on both sides.

    Example::

        model = tk.load_weights(Classifier(), "runs/run1/checkpoints/best.ckpt", ema=True).eval()
    """
    ckpt = _load_weights_part(path_or_url, KEY_EMA if ema else KEY_MODEL, storage_options)
    if ema:
        if not ckpt.get(KEY_EMA):
            raise CheckpointError(
                f"checkpoint {os.fspath(path_or_url)!r} holds no EMA weights (use_ema was off)"
            )
        state = ckpt[KEY_EMA]["state_dict"]
    else:
        state = ckpt[KEY_MODEL]
    module.load_state_dict(match_compile_keys(module, state), strict=strict)
    return module


def _load_weights_part(
    path_or_url: str | os.PathLike[str], key: str, storage_options: dict[str, Any] | None
) -> dict[str, Any]:
    """The checkpoint for load_weights: from a sharded directory only the entry ``key`` is read."""
    fs, path = url_to_fs(os.fspath(path_or_url), storage_options)
    if fs.isdir(path):
        from .dcp import load_checkpoint_dir

        return load_checkpoint_dir(path_or_url, storage_options=storage_options, keys=(key,))
    return load_checkpoint(path_or_url, storage_options=storage_options)
