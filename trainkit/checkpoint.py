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
"""

from __future__ import annotations

import io
import os
import pickle
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

FORMAT_VERSION = 1
FORMAT_KEY = "trainkit_format"
BEST_NAME = "best.ckpt"
_REGULAR = re.compile(r"^step_(\d+)\.ckpt$")
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"}
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}

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


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path or URL names no file (a ``ValueError`` for a bad argument, and a
    ``FileNotFoundError``)."""


def regular_name(step: int) -> str:
    return f"step_{step:09d}.ckpt"


def regular_step(name: str) -> int | None:
    match = _REGULAR.match(name)
    return int(match.group(1)) if match else None


def url_to_fs(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with a clear message when the filesystem's package is missing."""
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'trainkit[{extra}]'" if extra else "install the fsspec implementation for it"
        raise ImportError(
            f"checkpoint path {url!r} needs a filesystem package that is missing: {hint} ({exc})"
        ) from exc


# -- what may go into a file ------------------------------------------------------------------------------

_SAFE_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def check_weights_only(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry that ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(
                f"{where} is a {type(obj).__name__}; only plain tensors load with weights_only=True"
            )
        return
    if isinstance(obj, _SAFE_LEAVES):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use strings or numbers")
            check_weights_only(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_weights_only(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints may hold only tensors, "
        "numbers, strings, lists, tuples and dicts (so that they load with torch.load(weights_only=True))"
    )


def snapshot(obj: Any, copy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """A copy of a checkpoint dict whose tensors are fresh CPU copies (or ``copy(tensor)``): later training
    steps can't leak in."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True) if copy is None else copy(obj.detach())
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v, copy)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, copy) for v in obj)
    return obj


# -- storage ----------------------------------------------------------------------------------------------


class CheckpointStorage:
    """Reads and atomically writes named checkpoint files under one directory or URL prefix."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        self.url = os.fspath(url)
        self.fs, root = url_to_fs(self.url, storage_options)
        self.root = root.rstrip("/") or root
        self.is_local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.single_put = any(p in _OBJECT_STORES for p in protocols)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def location(self, name: str) -> str:
        """The user-facing path (local) or URL (remote) of ``name``."""
        return self.path(name) if self.is_local else self.fs.unstrip_protocol(self.path(name))

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.path(name)))

    def names(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def regular_steps(self) -> list[int]:
        return sorted(s for s in (regular_step(n) for n in self.names()) if s is not None)

    def write(self, name: str, checkpoint: dict[str, Any]) -> str:
        """Serialise and write ``checkpoint`` under ``name``; nothing appears under that name unless all of
        it was written. Returns the location."""
        final = self.path(name)
        if self.is_local:
            self._write_local(final, checkpoint)
        else:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            check_weights_only(checkpoint)
            data = buffer.getbuffer()
            self.fs.makedirs(self.root, exist_ok=True)
            if self.single_put:
                self.fs.pipe_file(final, bytes(data))
            else:
                tmp = self.path(f".{name}.tmp-{uuid.uuid4().hex}")
                try:
                    self.fs.pipe_file(tmp, bytes(data))
                    self.fs.mv(tmp, final)
                finally:
                    if self.fs.exists(tmp):
                        self.fs.rm(tmp)
        return self.location(name)

    def _write_local(self, final: str, checkpoint: dict[str, Any]) -> None:
        directory = os.path.dirname(final)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                check_weights_only(checkpoint)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, name: str, map_location: Any = "cpu") -> dict[str, Any]:
        return _load(self.fs, self.path(name), self.location(name), map_location)


def _load(fs: fsspec.AbstractFileSystem, path: str, shown: str, map_location: Any) -> dict[str, Any]:
    if not fs.exists(path):
        raise CheckpointNotFoundError(f"checkpoint {shown!r} does not exist")
    try:
        if isinstance(fs, LocalFileSystem):
            obj = torch.load(path, map_location=map_location, weights_only=True)
        else:
            obj = torch.load(io.BytesIO(fs.cat_file(path)), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line for line in reason if "Unsupported" in line), reason[0] if reason else "")
        if "Unsupported" in str(exc):
            raise CheckpointError(
                f"refused checkpoint {shown!r}: it holds pickled objects that weights_only loading does not "
                f"allow, and no code from it was run ({detail.strip()})"
            ) from None
        raise CheckpointError(
            f"checkpoint {shown!r} is corrupt or not a torch file ({detail.strip()})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]  # an EOFError may have no message
        raise CheckpointError(
            f"checkpoint {shown!r} is truncated or corrupt and could not be read: {first_line}"
        ) from None
    if not isinstance(obj, dict) or FORMAT_KEY not in obj:
        raise CheckpointError(f"{shown!r} is not a trainkit checkpoint (no {FORMAT_KEY!r} entry)")
    if obj[FORMAT_KEY] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {shown!r} has format {obj[FORMAT_KEY]}, newer than this trainkit reads ({FORMAT_VERSION})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {shown!r} lacks the entries {missing}")
    return obj


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
    return _load(fs, path, shown, map_location)


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
    module.load_state_dict(state, strict=strict)
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


class AsyncWriter:
    """Runs one write at a time in a background thread; a failure re-raises at the next submit or wait.

    ``snapshot`` copies a checkpoint into host buffers kept from the previous snapshot (same shape and
    dtype, in the same order): a plain memcpy on the training thread, without the allocation and page
    faults that make fresh copies of a large state several times slower."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainkit-ckpt")
        self._pending: Future[Any] | None = None
        self._buffers: list[torch.Tensor] = []

    def snapshot(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Host copies of ``checkpoint``'s tensors. Waits for the previous write, whose buffers it reuses."""
        self.wait()
        previous, self._buffers = iter(self._buffers), []

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.layout != torch.strided:  # sparse and other layouts: a fresh copy, not cached
                return tensor.to("cpu", copy=True)
            buffer = next(previous, None)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty_like(tensor, device="cpu")
            buffer.copy_(tensor)
            self._buffers.append(buffer)
            return buffer

        return snapshot(checkpoint, copy)

    def submit(self, fn: Callable[[], Any]) -> None:
        self.wait()
        self._pending = self._executor.submit(fn)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._buffers = []
            self._executor.shutdown(wait=True)
