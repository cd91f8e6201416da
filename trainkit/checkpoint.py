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

import codecs
import contextlib
import copy
import errno
import io
import logging
import os
import pickle
import pickletools
import re
import time
import uuid
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger("trainkit")
FORMAT_VERSION = 1
FORMAT_KEY = "trainkit_format"
BEST_NAME = "best.ckpt"
_REGULAR = re.compile(r"^step_(\d+)\.ckpt$")
# What temporary_name() makes (and a sharded save's hidden .trash- copy of the directory it replaces).
_TEMPORARY = re.compile(r"^\..+\.(tmp|trash)-[0-9a-f]{32}$")
# A remote write is retried after an OSError other than these, or an error of the store's client stack.
_PERMANENT_ERRORS = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)
_PERMANENT_ERRNOS = {
    errno.EINVAL, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EEXIST, errno.EISDIR, errno.ENOTDIR,
    errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
}  # fmt: skip
_STORE_PACKAGES = {
    "aiobotocore", "aiohttp", "botocore", "s3fs", "gcsfs", "google", "adlfs", "azure", "fsspec", "urllib3",
    "requests", "http", "ssl", "socket",
}  # fmt: skip
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


def temporary_name(name: str) -> str:
    """The hidden name a write of ``name`` goes to before it is renamed into place:
    ``.<name>.tmp-<32 hex digits>``, unique per write."""
    return f".{name}.tmp-{uuid.uuid4().hex}"


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` (a base name) is a hidden name of trainkit's writes: one that ``temporary_name``
    makes, or ``.<name>.trash-<32 hex digits>`` (the old copy a sharded save moves aside)."""
    return _TEMPORARY.match(name) is not None


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
    """Reads and atomically writes named checkpoint files under one directory or URL prefix.

    Writes to a remote store that fail for a reason that may pass (a dropped connection, a timeout, a
    server error: anything but a missing path or a refused permission) are retried as a whole, after the
    filesystem's own per-request retries gave up: ``write_attempts`` tries in all, sleeping
    ``retry_backoff_s`` seconds before the second and twice as long before each further one, each retry
    logged at WARNING. Local writes are not retried.
    """

    write_attempts = 4
    retry_backoff_s = 1.0

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

    def check_writable(self) -> None:
        """Make the directory and write, then delete, a tiny hidden probe object in it (named like
        trainkit's temporary files); local directories it had to make are removed again, so the tree is as
        it was. Raises ValueError naming ``checkpoint_dir`` and the reason when that fails: a path that is
        an existing file or lies under one, no permission, a bucket that is missing and cannot be created,
        a store that cannot be reached."""
        probe = self.path(f".write-check.tmp-{uuid.uuid4().hex}")
        made: list[str] = []  # local directories that do not exist yet, deepest first
        path = self.root
        while self.is_local and not os.path.lexists(path) and path != os.path.dirname(path):
            made.append(path)
            path = os.path.dirname(path)
        try:
            if self.is_local and os.path.exists(self.root) and not os.path.isdir(self.root):
                raise NotADirectoryError(f"{self.root!r} is an existing file, not a directory")
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:
            raise ValueError(f"checkpoint_dir={self.url!r} is not writable: {_first_line(exc)}") from exc
        finally:
            for directory in made:
                try:
                    os.rmdir(directory)
                except OSError:
                    break

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
            data = bytes(buffer.getbuffer())
            self._with_retries(name, lambda: self._put_remote(name, final, data))
        return self.location(name)

    def _put_remote(self, name: str, final: str, data: bytes) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        if self.single_put:
            self.fs.pipe_file(final, data)
            return
        tmp = self.path(temporary_name(name))
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
        finally:
            with contextlib.suppress(Exception):  # a store that is down: the next fit removes it
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)

    def _with_retries(self, name: str, put: Callable[[], None]) -> None:
        """Run ``put`` until it succeeds, at most ``write_attempts`` times; a ``CheckpointError`` naming the
        location when every try failed. Errors that retrying cannot fix are raised at once, unchanged."""
        attempts = max(1, int(self.write_attempts))
        delay = float(self.retry_backoff_s)
        for attempt in range(1, attempts + 1):
            try:
                put()
                return
            except Exception as exc:
                if not _may_pass(exc):
                    raise
                reason = f"{type(exc).__name__}: {exc}"
                if attempt == attempts:
                    raise CheckpointError(
                        f"could not write checkpoint {self.location(name)!r}: the store failed {attempts} "
                        f"times in a row (last: {reason}); earlier checkpoints are untouched"
                    ) from exc
                log.warning(
                    "trainkit: writing checkpoint %r failed (try %d of %d: %s); retrying in %.2g s",
                    self.location(name), attempt, attempts, reason, delay,
                )  # fmt: skip
                time.sleep(delay)
                delay *= 2

    def remove_temporaries(self) -> list[str]:
        """Delete the hidden temporary files (or sharded directories) that killed writes left in this
        directory and return their locations, sorted. Only trainkit's own names are touched (see
        ``is_temporary_name``); nothing hidden is ever taken by ``"last"``, so no checkpoint is lost. Call
        it only while nothing writes to this directory: a write in flight (in any process) keeps its bytes
        under such a name until it is renamed."""
        removed = []
        for name in self.names():
            if not is_temporary_name(name):
                continue
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile: nothing left to remove
                self.fs.rm(self.path(name), recursive=True)
                removed.append(self.location(name))
        return removed

    def _write_local(self, final: str, checkpoint: dict[str, Any]) -> None:
        directory = os.path.dirname(final)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, temporary_name(os.path.basename(final)))
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


def _may_pass(exc: Exception) -> bool:
    """Whether a failed remote write is worth trying again: a dropped connection, a timeout or a server
    error may pass; a missing bucket, a refused permission or a bug in the call will not."""
    if isinstance(exc, _PERMANENT_ERRORS):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS  # e.g. an invalid bucket name: EINVAL
    return any(cls.__module__.split(".")[0] in _STORE_PACKAGES for cls in type(exc).__mro__)


def _load(fs: fsspec.AbstractFileSystem, path: str, shown: str, map_location: Any) -> dict[str, Any]:
    if not fs.exists(path):
        raise CheckpointNotFoundError(f"checkpoint {shown!r} does not exist")
    local = isinstance(fs, LocalFileSystem)
    try:
        f: Any = open(path, "rb") if local else io.BytesIO(fs.cat_file(path))
    except OSError as exc:
        raise CheckpointError(f"checkpoint {shown!r} could not be read: {_first_line(exc)}") from exc
    with f:
        _inspect(f, shown)  # classifies garbage, damage and forbidden globals before torch sees a byte
        f.seek(0)
        try:
            obj = torch.load(path if local else f, map_location=map_location, weights_only=True)
        except Exception as exc:  # anything torch raises past the checks above means damaged contents
            raise CheckpointError(
                f"checkpoint {shown!r} is truncated or damaged: its records could not be read "
                f"({_first_line(exc)})"
            ) from None
    _check_entries(obj, shown)
    return obj


# -- reading without trusting: classify a file by what is in it ------------------------------------------

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER: first pickle of a legacy file
_PROBE_BLOCK = 64 * 1024  # a probe fetches this much from each end of a file
# Allowed globals that a structure-only read builds for real (harmless builtins); the rest become placeholders.
_REAL = {
    "collections.OrderedDict": OrderedDict,
    "collections.Counter": Counter,
    "builtins.set": set,
    "builtins.complex": complex,
    "builtins.bytearray": bytearray,
    "_codecs.encode": codecs.encode,
}


def _first_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, without torch's advice on loading unsafely."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if "weights_only" in text or not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _allowed_globals() -> set[str]:
    """The ``module.name`` globals that ``torch.load(weights_only=True)`` accepts, user-added ones included."""
    try:
        from torch import _weights_only_unpickler as wou

        return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())
    except (ImportError, AttributeError):  # private API moved: the documented defaults
        names = {f"torch._utils.{n}" for n in dir(torch._utils) if n.startswith("_rebuild_")}
        names |= {f"torch.{n}" for n in dir(torch) if isinstance(getattr(torch, n, None), (torch.dtype, type))}
        return names | set(_REAL) | {"torch.nn.parameter.Parameter", "torch.serialization._get_layout"}


def _global_name(module: str, name: str) -> str:
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    return f"{IMPORT_MAPPING.get(module, module)}.{name}"


def _scan_globals(f: Any) -> list[str]:
    """The globals one pickle names (GLOBAL and STACK_GLOBAL), read with ``pickletools.genops``: nothing
    is imported or run. Leaves ``f`` just past the pickle's STOP; raises ValueError if it is no pickle."""
    found: list[str] = []
    pushed: list[Any] = []  # the values of recent pushes where they are strings, for STACK_GLOBAL
    memo: dict[Any, Any] = {}
    for op, arg, _ in pickletools.genops(f):
        if op.name == "GLOBAL":
            found.append(_global_name(*str(arg).split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            module, name = pushed[-2:] if len(pushed) > 1 else [None, None]
            if isinstance(module, str) and isinstance(name, str):
                found.append(_global_name(module, name))
            else:
                found.append("<a global named by computed strings>")
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif op.name not in ("PROTO", "FRAME", "STOP"):
            pushed.append(arg if isinstance(arg, str) else None)
    return found


class _Placeholder:
    """Stands in for every tensor, storage and torch object when a pickle is read only for its structure."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _SkeletonUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint's structure: allowed globals become placeholders (or safe builtins), tensor
    data is never read; it records the storage records the pickle refers to."""

    def __init__(self, f: Any, allowed: set[str]) -> None:
        super().__init__(f)
        self.allowed = allowed
        self.storage_keys: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        full = _global_name(module, name)
        if full not in self.allowed:  # already refused by the scan; a second lock
            raise pickle.UnpicklingError(f"forbidden global {full}")
        return _REAL.get(full, _Placeholder)

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) > 2 and pid[0] == "storage":
            self.storage_keys.append(str(pid[2]))
        return _Placeholder()


def _skeleton(f: Any, shown: str, allowed: set[str], what: str) -> tuple[Any, list[str]]:
    """Scan the next pickle in ``f`` for forbidden globals, then unpickle its structure (placeholders for
    tensors). Returns the structure and the storage records it refers to; ``f`` ends past the pickle."""
    start = f.tell()
    try:
        names = _scan_globals(f)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {shown!r} is {what}: {_first_line(exc)}") from None
    forbidden = sorted({n for n in names if n not in allowed})
    if forbidden:
        raise CheckpointError(
            f"refused checkpoint {shown!r}: it refers to forbidden objects {', '.join(forbidden)}, which "
            "torch.load(weights_only=True) does not allow; nothing was loaded and no code from it was run"
        )
    f.seek(start)
    reader = _SkeletonUnpickler(f, allowed)
    try:
        return reader.load(), reader.storage_keys
    except Exception as exc:
        raise CheckpointError(f"checkpoint {shown!r} is {what}: {_first_line(exc)}") from None


def _inspect(f: Any, shown: str) -> Any:
    """Classify the file open as ``f`` (seekable, binary) without running anything from it; return its
    structure, tensors replaced by placeholders. Raises CheckpointError: not a torch file, truncated or
    damaged, refers to forbidden objects, or lacks required entries. Reads only the zip directory and the
    pickle record of a torch zip file (a legacy file: its pickles up to the tensor data)."""
    allowed = _allowed_globals()
    head = f.read(4)
    f.seek(0)
    if head in _ZIP_MAGIC:
        try:
            archive = zipfile.ZipFile(f)
            names = archive.namelist()
            pkl = next((n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")), None)
            if pkl is None:
                raise CheckpointError(f"checkpoint {shown!r} is not a torch file (a zip archive with no data.pkl)")
            info = copy.copy(archive.getinfo(pkl))
            # CRC 0: written with torch's crc32 option off; there is nothing to check.
            info.CRC = info.CRC or None  # type: ignore[assignment]
            with archive.open(info) as stream:
                record = stream.read()  # checks the record's CRC
        except CheckpointError:
            raise
        except Exception as exc:  # zipfile raises BadZipFile, struct.error, EOFError, ValueError ...
            raise CheckpointError(
                f"checkpoint {shown!r} is truncated or damaged: its zip records are unreadable "
                f"({_first_line(exc)})"
            ) from None
        prefix = pkl[: -len("data.pkl")]
        skeleton, keys = _skeleton(io.BytesIO(record), shown, allowed, "truncated or damaged (its data.pkl does not unpickle)")
        missing = sorted({k for k in keys if f"{prefix}data/{k}" not in names})
        if missing:
            raise CheckpointError(
                f"checkpoint {shown!r} is truncated or damaged: tensor records {missing[:5]} are missing"
            )
    else:  # a legacy torch file is a run of pickles; anything else is not a torch file
        magic, _ = _skeleton(f, shown, allowed, "not a torch file (neither a zip archive nor a pickle)")
        if type(magic) is not int or magic != _LEGACY_MAGIC:
            raise CheckpointError(
                f"checkpoint {shown!r} is not a torch file (a pickle without torch's header)"
            )
        for _ in range(2):  # protocol version and system info, then the object itself
            _skeleton(f, shown, allowed, "truncated or damaged (its pickles are cut or damaged)")
        skeleton, _ = _skeleton(f, shown, allowed, "truncated or damaged (its pickles are cut or damaged)")
    _check_entries(skeleton, shown)
    return skeleton


def _check_entries(obj: Any, shown: str) -> None:
    if not isinstance(obj, dict) or FORMAT_KEY not in obj:
        raise CheckpointError(f"{shown!r} is not a trainkit checkpoint (no {FORMAT_KEY!r} entry)")
    if not isinstance(obj[FORMAT_KEY], int):
        raise CheckpointError(f"checkpoint {shown!r} is damaged: its {FORMAT_KEY!r} is {obj[FORMAT_KEY]!r}")
    if obj[FORMAT_KEY] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {shown!r} has format {obj[FORMAT_KEY]}, newer than this trainkit reads ({FORMAT_VERSION})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {shown!r} lacks the entries {missing}")


class _RangeReader(io.RawIOBase):
    """A seekable binary file over ``fs.cat_file(path, start, end)`` that fetches the first and the last
    ``_PROBE_BLOCK`` bytes once each (a torch zip's pickle record and its directory) and anything else
    with one ranged request per read: a probe costs two requests however large the file."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, size: int) -> None:
        self.fs, self.path, self.size, self.pos = fs, path, size, 0
        tail = max(_PROBE_BLOCK, size - _PROBE_BLOCK)
        self.blocks: dict[tuple[int, int], bytes | None] = {(0, min(size, _PROBE_BLOCK)): None}
        if tail < size:
            self.blocks[(tail, size)] = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset + (0, self.pos, self.size)[whence])
        return self.pos

    def readinto(self, buffer: Any) -> int:
        end = min(self.size, self.pos + len(buffer))
        if end <= self.pos:
            return 0
        span = next(((a, b) for a, b in self.blocks if a <= self.pos and end <= b), None)
        if span is None:
            data = self.fs.cat_file(self.path, start=self.pos, end=end)
        else:
            block = self.blocks[span]
            if block is None:
                block = self.blocks[span] = self.fs.cat_file(self.path, start=span[0], end=span[1])
            data = block[self.pos - span[0] : end - span[0]]
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def probe_step(storage: CheckpointStorage, name: str) -> int:
    """The ``trainer.global_step`` of checkpoint ``name``, after checking without reading its tensor data
    that it is a complete, safe trainkit file: its zip directory, its pickle record (unpickled with
    placeholders for tensors, under a restricted unpickler) and that every tensor record it refers to is
    listed. Reads 128 KiB in two requests however large the file (more only for a directory or pickle
    record larger than 64 KiB). Raises CheckpointError naming the file."""
    shown, path = storage.location(name), storage.path(name)
    try:
        size = int(storage.fs.size(path))
    except (OSError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {shown!r} could not be read: {_first_line(exc)}") from exc
    with io.BufferedReader(_RangeReader(storage.fs, path, size), buffer_size=4096) as f:
        try:
            skeleton = _inspect(f, shown)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {shown!r} could not be read: {_first_line(exc)}") from exc
    step = skeleton[KEY_TRAINER].get("global_step") if isinstance(skeleton[KEY_TRAINER], dict) else None
    if type(step) is not int:
        raise CheckpointError(f"checkpoint {shown!r} is damaged: it holds no trainer.global_step")
    return step


def complete_checkpoints(storage: CheckpointStorage) -> Iterator[tuple[str, int]]:
    """``(name, step)`` of the complete checkpoints in ``storage``, newest first: regular files (whose
    names carry the step) and ``best.ckpt``; on a tie the regular file comes first (it is written after
    the best of the same step). Each is checked with :func:`probe_step` only when reached; a damaged one
    is skipped with a warning (``warnings.warn`` and the log) naming it and the reason."""

    def usable(name: str) -> int | None:
        try:
            return probe_step(storage, name)
        except CheckpointError as exc:
            message = f"trainkit: ckpt_path='last' skips a damaged checkpoint: {exc}"
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)
            return None

    names = storage.names()
    best_step = usable(BEST_NAME) if BEST_NAME in names else None
    for step in sorted((s for s in map(regular_step, names) if s is not None), reverse=True):
        if best_step is not None and best_step > step:
            yield BEST_NAME, best_step
            best_step = None
        if usable(regular_name(step)) is not None:
            yield regular_name(step), step
    if best_step is not None:
        yield BEST_NAME, best_step


def find_last(storage: CheckpointStorage) -> tuple[str, int] | None:
    """Name and step of the newest complete checkpoint in ``storage`` (what ``ckpt_path="last"`` resumes
    from), or None when there is none. Damaged candidates are skipped with a warning naming them; only
    the zip directory and pickle record of the candidates reached are read (see :func:`probe_step`)."""
    return next(complete_checkpoints(storage), None)


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
