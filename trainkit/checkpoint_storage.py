"""A checkpoint directory on fsspec: atomic and retried writes, hidden temporaries, the complete files.

``CheckpointStorage`` writes (atomically, as :mod:`trainkit.checkpoint` describes; remote writes retried),
reads, lists and cleans one directory or URL prefix. ``probe_step``, ``complete_checkpoints`` and
``find_last`` tell which of its files are complete and what ``ckpt_path="last"`` resumes from, fetching
only the two ends of each candidate. Apart from :mod:`trainkit.checkpoint_inspect` because this is where
files live and how their bytes travel; what is in a file is judged there.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from .checkpoint_format import (
    BEST_NAME,
    KEY_TRAINER,
    CheckpointError,
    CheckpointReadError,
    first_line,
    is_temporary_name,
    regular_name,
    regular_step,
    temporary_name,
)
from .checkpoint_inspect import check_weights_only, inspect_file, read_file

log = logging.getLogger("trainkit")
# A remote write is retried after an OSError other than these, or an error of the store's client stack.
_PERMANENT_ERRORS = (
    FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError,
)  # fmt: skip
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
_PROBE_BLOCK = 64 * 1024  # a probe fetches this much from each end of a file


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
            raise ValueError(f"checkpoint_dir={self.url!r} is not writable: {first_line(exc)}") from exc
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
        return read_file(self.fs, self.path(name), self.location(name), map_location)


def _may_pass(exc: Exception) -> bool:
    """Whether a failed remote write is worth trying again: a dropped connection, a timeout or a server
    error may pass; a missing bucket, a refused permission or a bug in the call will not."""
    if isinstance(exc, _PERMANENT_ERRORS):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS  # e.g. an invalid bucket name: EINVAL
    return any(cls.__module__.split(".")[0] in _STORE_PACKAGES for cls in type(exc).__mro__)


# -- which files are complete: the cheap step probe --------------------------------------------------------


class _RangeReader(io.RawIOBase):
    """A seekable binary file over ``fs.cat_file(path, start, end)`` that fetches the first and the last
    ``_PROBE_BLOCK`` bytes once each (a torch zip's pickle record and its directory) and anything else
    with one ranged request per read: a probe costs two requests however large the file."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, size: int, shown: str) -> None:
        self.fs, self.path, self.size, self.pos, self.shown = fs, path, size, 0, shown
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
            data = self._fetch(self.pos, end)
        else:
            block = self.blocks[span]
            if block is None:
                block = self.blocks[span] = self._fetch(*span)
            data = block[self.pos - span[0] : end - span[0]]
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def _fetch(self, start: int, end: int) -> bytes:
        """One ranged read; a failure of the store (not of the contents) is a CheckpointReadError, which the
        parsers pass on unchanged instead of calling the file damaged."""
        try:
            return bytes(self.fs.cat_file(self.path, start=start, end=end))
        except Exception as exc:
            raise CheckpointReadError(f"checkpoint {self.shown!r} could not be read: {first_line(exc)}") from exc


def probe_step(storage: CheckpointStorage, name: str) -> int:
    """The ``trainer.global_step`` of checkpoint ``name``, after checking without reading its tensor data
    that it is a complete, safe trainkit file: its zip directory, its pickle record (unpickled with
    placeholders for tensors, under a restricted unpickler) and that every tensor record it refers to is
    listed. Reads 128 KiB in two requests however large the file (more only for a directory or pickle
    record larger than 64 KiB). Raises CheckpointError naming the file."""
    shown, path = storage.location(name), storage.path(name)
    try:
        size = int(storage.fs.size(path))
    except Exception as exc:  # OSError, or the store client's own errors
        raise CheckpointReadError(f"checkpoint {shown!r} could not be read: {first_line(exc)}") from exc
    with io.BufferedReader(_RangeReader(storage.fs, path, size, shown), buffer_size=4096) as f:
        try:
            skeleton = inspect_file(f, shown)
        except OSError as exc:
            raise CheckpointReadError(f"checkpoint {shown!r} could not be read: {first_line(exc)}") from exc
    step = skeleton[KEY_TRAINER].get("global_step") if isinstance(skeleton[KEY_TRAINER], dict) else None
    if type(step) is not int:
        raise CheckpointError(f"checkpoint {shown!r} is damaged: it holds no trainer.global_step")
    return step


def warn_skipped(exc: CheckpointError, stacklevel: int) -> None:
    """Say, on the log and as a RuntimeWarning, that ``ckpt_path="last"`` passes over a damaged file."""
    message = f"trainkit: ckpt_path='last' skips a damaged checkpoint: {exc}"
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def complete_checkpoints(storage: CheckpointStorage) -> Iterator[tuple[str, int]]:
    """``(name, step)`` of the complete checkpoints in ``storage``, newest first: regular files (whose
    names carry the step) and ``best.ckpt``; on a tie the regular file comes first (it is written after
    the best of the same step). Each is checked with :func:`probe_step` only when reached; a damaged one
    is skipped with a warning (``warnings.warn`` and the log) naming it and the reason. One that could not
    be read at all (the store failed: :class:`CheckpointReadError`) raises: it may be the newest complete
    one, and taking an older one would silently drop its steps."""

    def usable(name: str) -> int | None:
        try:
            return probe_step(storage, name)
        except CheckpointReadError:
            raise
        except CheckpointError as exc:
            warn_skipped(exc, stacklevel=4)
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
