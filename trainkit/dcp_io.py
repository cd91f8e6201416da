"""DCP's reader, writer and load planner bound to fsspec and made safe; DCP's failures made CheckpointErrors.

Apart from :mod:`trainkit.dcp` because this is where checkpoint bytes meet code. DCP's own reader unpickles
``.metadata`` with plain ``pickle`` and its default planner reads non-tensor entries with
torch.load and ``weights_only=False``: either runs code from the checkpoint. Here :func:`read_metadata`
unpickles with an unpickler that admits only DCP's metadata classes and torch's basic types, then checks
what it got (entry kinds, shapes, files inside the directory); :class:`SafeReader` hands DCP only that
checked metadata; :class:`SafeLoadPlanner` reads every non-tensor entry with ``weights_only=True``.
Anything else raises :class:`CheckpointError` and runs nothing. :class:`Writer` shares the fsspec adaptor.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import fsspec
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as _FsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem

from .checkpoint import CheckpointError, CheckpointNotFoundError
from .dcp_dirs import METADATA_NAME

_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def _layout_by_name(name: str) -> torch.layout:
    """Stands in for ``torch.serialization._get_layout`` (how torch pickles a layout): a layout only."""
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.layout):
        raise pickle.UnpicklingError(f"{name!r} is not a torch layout")
    return value


_METADATA_CLASSES: dict[tuple[str, str], Any] = {
    ("torch.distributed.checkpoint.metadata", "Metadata"): dcp_md.Metadata,
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"): dcp_md.TensorStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"): dcp_md.BytesStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"): dcp_md.ChunkStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "TensorProperties"): dcp_md.TensorProperties,
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"): dcp_md.MetadataIndex,
    ("torch.distributed.checkpoint.metadata", "StorageMeta"): dcp_md.StorageMeta,
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): dcp_md._MEM_FORMAT_ENCODING,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _layout_by_name,
    ("collections", "OrderedDict"): OrderedDict,
    # DCP's FileSystemWriter records its directory as a path object in StorageMeta.checkpoint_id.
    ("pathlib", "PosixPath"): __import__("pathlib").PurePosixPath,
    ("pathlib", "PurePosixPath"): __import__("pathlib").PurePosixPath,
    ("pathlib", "WindowsPath"): __import__("pathlib").PureWindowsPath,
    ("pathlib", "PureWindowsPath"): __import__("pathlib").PureWindowsPath,
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata dataclasses, ``torch.Size``, dtypes and layouts, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _METADATA_CLASSES.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def read_metadata(fs: fsspec.AbstractFileSystem, path: str, shown: str | None = None) -> dcp_md.Metadata:
    """Read and check the ``.metadata`` of the sharded checkpoint ``path`` without running code from it.

    Raises CheckpointNotFoundError when ``path`` does not exist, CheckpointError when it is incomplete
    (no ``.metadata``), when ``.metadata`` names anything outside DCP's metadata classes and torch's basic
    types (nothing from it is run), or when it is malformed."""
    path = path.rstrip("/")
    shown = shown or path
    meta_path = f"{path}/{METADATA_NAME}"
    shown_meta = f"{shown.rstrip('/')}/{METADATA_NAME}"
    fs.invalidate_cache(path)
    if not fs.exists(meta_path):
        if fs.exists(path):
            raise CheckpointError(
                f"sharded checkpoint {shown!r} is incomplete: it has no {METADATA_NAME} (a save that did not "
                "finish leaves such a directory; or it is not a checkpoint at all)"
            )
        raise CheckpointNotFoundError(f"checkpoint {shown!r} does not exist")
    try:
        with fs.open(meta_path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused {shown_meta!r}: it names objects outside DCP's metadata classes, and no code from it "
            f"was run ({exc})"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as exc:
        raise CheckpointError(
            f"{shown_meta!r} is corrupt and could not be read: {type(exc).__name__}: {exc}"
        ) from None
    _check_metadata(md, shown_meta)
    return cast(dcp_md.Metadata, md)


def _check_metadata(md: Any, shown: str) -> None:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{shown!r} is not DCP metadata: {why}")

    if not isinstance(md, dcp_md.Metadata):
        raise bad(f"it holds a {type(md).__name__}")
    if not isinstance(md.state_dict_metadata, dict):
        raise bad("state_dict_metadata is not a dict")
    for fqn, item in md.state_dict_metadata.items():
        if not isinstance(fqn, str) or not isinstance(
            item, (dcp_md.TensorStorageMetadata, dcp_md.BytesStorageMetadata)
        ):
            raise bad(f"entry {fqn!r} is a {type(item).__name__}")
        if isinstance(item, dcp_md.TensorStorageMetadata) and (
            not isinstance(item.size, torch.Size)
            or not isinstance(getattr(item.properties, "dtype", None), torch.dtype)
        ):
            raise bad(f"tensor entry {fqn!r} has no size or dtype")
    if not isinstance(md.storage_data, dict):
        raise bad("storage_data is not a dict")
    for index, info in md.storage_data.items():
        if not isinstance(index, dcp_md.MetadataIndex) or not isinstance(info, _StorageInfo):
            raise bad(f"a storage entry is a {type(info).__name__}")
        rel = info.relative_path
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
            raise bad(f"entry {index.fqn!r} points to {rel!r}, outside its directory")


class _BoundFileSystem(_FsspecFileSystem):
    """DCP's fsspec filesystem adaptor on an existing fsspec filesystem (with its storage options).

    ``durable``: each file written is fsynced once closed (DCP's own ``sync_files`` fsyncs before it
    flushes Python's buffer, so the tail of a file could miss the disk); its directory entry is made
    durable by the fsync of the directory before the rename that publishes it."""

    def __init__(self, fs: fsspec.AbstractFileSystem, durable: bool = False) -> None:
        super().__init__()
        self.fs = fs
        self.durable = durable

    def init_path(self, path: str | os.PathLike[str], **kwargs: Any) -> str | os.PathLike[str]:
        return path

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str:
        return f"{os.fspath(path).rstrip('/')}/{suffix}"

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            yield stream
        if self.durable and "w" in mode:
            fd = os.open(os.fspath(path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class SafeReader(FsspecReader):
    """An FsspecReader whose metadata is the one :func:`read_metadata` checked (never ``pickle.load``)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, metadata: dcp_md.Metadata) -> None:
        super().__init__(path)
        self.fs = _BoundFileSystem(fs)  # type: ignore[assignment]
        self.path = path
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_md.Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError("rank-local DCP metadata is not supported")
        md = self._metadata
        if md.storage_meta is None:
            md.storage_meta = dcp_md.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class Writer(FsspecWriter):
    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, durable: bool) -> None:
        super().__init__(path, sync_files=False, overwrite=True)
        self.fs = _BoundFileSystem(fs, durable)  # type: ignore[assignment]
        self.path = path


class SafeLoadPlanner(DefaultLoadPlanner):
    """Loads into a flat ``{fqn: value}`` dict; non-tensor entries only with ``weights_only=True``."""

    def __init__(self, shown: str) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=False)
        self.shown = shown
        self.objects: dict[str, Any] = {}

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            detail = next((line for line in str(exc).splitlines() if "Unsupported" in line), "").strip()
            raise CheckpointError(
                f"refused entry {fqn!r} of {self.shown!r}: it holds pickled objects that weights_only "
                f"loading does not allow, and no code from it was run ({detail or exc})"
            ) from None
        except (RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(f"entry {fqn!r} of {self.shown!r} is corrupt: {exc}") from None
        self.objects[fqn] = obj


def _first_failure(exc: CheckpointException) -> BaseException:
    for _rank, failure in sorted(exc.failures.items()):
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            return inner
    rank, failure = min(exc.failures.items())
    return failure[0] if isinstance(failure, tuple) else failure


@contextmanager
def dcp_errors(action: str, shown: str) -> Iterator[None]:
    """DCP reports any rank's failure as a CheckpointException (a BaseException) on every rank: give the
    first one back as a CheckpointError naming the checkpoint."""
    try:
        yield
    except CheckpointException as exc:
        inner = _first_failure(exc)
        if isinstance(inner, CheckpointError):
            raise inner from None
        first = (str(inner).splitlines() or [""])[0]
        raise CheckpointError(
            f"sharded checkpoint {shown!r} could not be {action}: {type(inner).__name__}: {first}"
        ) from inner


@contextmanager
def quiet_no_dist() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint")
        yield


def distributed_rank(process_group: Any) -> tuple[bool, int]:
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(process_group)
    if process_group is not None:
        raise ValueError("process_group was given but torch.distributed is not initialised")
    return False, 0
