"""Sharded checkpoints: ``torch.distributed.checkpoint`` (DCP) directories through fsspec, read safely.

Layout inside ``checkpoint_dir`` (any fsspec path or URL)::

    step_000000250/       a regular sharded checkpoint (one per save_interval steps, all kept)
        .metadata         written last, by rank 0, once every rank's data is written
        __0_0.distcp      rank 0's shards (and the entries that are not sharded)
        __1_0.distcp      rank 1's shards
    best_step_000000500/  the best one (exactly one after every best save)

A directory is complete iff its ``.metadata`` exists. On a local disk it is written under a hidden
temporary name (``.step_000000250.tmp-<hex>``) and renamed by rank 0 once ``.metadata`` is there; on an
object store (no atomic directory rename) it is written in place and counts only once ``.metadata`` exists.

Contents. The nested checkpoint dict (tensors, DTensors, numbers, strings, lists, tuples, dicts) is stored
flat, one DCP entry per tensor, keyed ``"model.layer.weight"``, ``"optimizers.0.state.0.exp_avg"`` ...;
every sub-tree without tensors (``trainer.history``, a scheduler's state ...) is one entry, written with
``torch.save`` and read back with ``weights_only=True``. One more entry, ``__trainkit_layout__``, records
the nesting (dict key types, lists, tuples, empty containers), so that loading gives back the same dict.
Entries that are not DTensors (plain tensors and python values) are written once, by the lowest rank
that holds them: as in the single-file checkpoint, which rank 0 writes, they are rank 0's values.

Safety. DCP's own reader unpickles ``.metadata`` with plain ``pickle`` and its default planner reads
non-tensor entries with ``torch.load(weights_only=False)``: either runs code from the checkpoint. trainkit
reads ``.metadata`` with an unpickler that admits only DCP's metadata classes and torch's basic types,
and every entry with ``weights_only=True``; anything else raises :class:`CheckpointError` and runs nothing.

From a trainer (every rank)::

    save_dcp(checkpoint, storage, regular_dir_name(step))          # DTensors: each rank writes its shards
    # resume: make the optimizer's state exist first (e.g. get_optimizer_state_dict, or DCP's
    # _init_optim_state), so that its DTensors are there to be filled, then
    loaded = load_dcp(template, storage, latest_complete(storage))  # template: the pieces' state dicts
    model.load_state_dict(loaded["model"]); optimizer.load_state_dict(loaded["optimizers"][0]) ...

Values that differ per rank (each rank's RNG state) must go under per-rank keys: a key every rank holds
is written once, with the lowest rank's value.
"""

from __future__ import annotations

import os
import pickle
import re
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import fsspec
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as _FsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.tensor import DTensor

from .checkpoint import (
    FORMAT_KEY,
    FORMAT_VERSION,
    REQUIRED_KEYS,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointStorage,
    check_weights_only,
    url_to_fs,
)
from .checkpoint import _load as _load_file

METADATA_NAME = ".metadata"
LAYOUT_KEY = "__trainkit_layout__"
_SHARDED = re.compile(r"^(best_)?step_(\d+)$")
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"

__all__ = [
    "METADATA_NAME",
    "best_dir_name",
    "complete_checkpoints",
    "convert_checkpoint",
    "delete_checkpoint_dir",
    "is_complete",
    "is_sharded_checkpoint",
    "latest_complete",
    "load_checkpoint_dir",
    "load_dcp",
    "load_full",
    "read_metadata",
    "regular_dir_name",
    "save_dcp",
    "sharded_step",
]


# -- names ------------------------------------------------------------------------------------------------


def regular_dir_name(step: int) -> str:
    """``step_%09d``: the directory of the regular sharded checkpoint of ``step``."""
    return f"step_{step:09d}"


def best_dir_name(step: int) -> str:
    """``best_step_%09d``: the directory of the best sharded checkpoint, reached at ``step``."""
    return f"best_step_{step:09d}"


def sharded_step(name: str) -> int | None:
    """The step in a ``step_%09d`` or ``best_step_%09d`` name, else ``None``."""
    match = _SHARDED.match(name)
    return int(match.group(2)) if match else None


def is_complete(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether the sharded checkpoint directory ``path`` on ``fs`` is complete: its ``.metadata`` exists."""
    target = f"{path.rstrip('/')}/{METADATA_NAME}"
    fs.invalidate_cache(path.rstrip("/"))  # object stores list through a cache another writer made stale
    return bool(fs.exists(target))


def is_sharded_checkpoint(
    path_or_url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> bool:
    """Whether ``path_or_url`` is a directory (not a file) that holds a DCP ``.metadata``."""
    fs, path = url_to_fs(os.fspath(path_or_url), storage_options)
    return not fs.isfile(path) and is_complete(fs, path)


def complete_checkpoints(storage: CheckpointStorage) -> dict[str, int]:
    """The complete sharded checkpoints in ``storage``: ``{"step_000000008": 8, "best_step_000000006": 6}``.

    Only ``step_%09d`` and ``best_step_%09d`` directories whose ``.metadata`` exists count; hidden
    temporary directories and directories of a save that did not finish never do."""
    storage.fs.invalidate_cache(storage.root)
    found: dict[str, int] = {}
    for name in storage.names():
        step = sharded_step(name)
        if step is not None and is_complete(storage.fs, storage.path(name)):
            found[name] = step
    return found


def latest_complete(storage: CheckpointStorage) -> str | None:
    """The name of the newest complete sharded checkpoint in ``storage`` (``None`` if there is none).

    On a tie the regular ``step_`` directory wins over ``best_step_`` (they hold the same state)."""
    found = complete_checkpoints(storage)
    if not found:
        return None
    return max(found, key=lambda name: (found[name], not name.startswith("best_")))


def delete_checkpoint_dir(storage: CheckpointStorage, name: str) -> None:
    """Delete the sharded checkpoint ``name`` from ``storage`` (call it on one rank).

    It stops counting first: locally the directory is renamed to a hidden name and then removed; on an
    object store ``.metadata`` goes first. Deleting a name that does not exist does nothing."""
    _check_name(name)
    path = storage.path(name)
    if not storage.fs.exists(path):
        return
    if storage.is_local:
        trash = storage.path(f".{name}.trash-{uuid.uuid4().hex}")
        os.rename(path, trash)
        _fsync_dir(storage.root)
        storage.fs.rm(trash, recursive=True)
    else:
        meta = f"{path}/{METADATA_NAME}"
        if storage.fs.exists(meta):
            storage.fs.rm(meta)
        storage.fs.rm(path, recursive=True)
        storage.fs.invalidate_cache(storage.root)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(
            f"name={name!r} is not valid; expected a plain directory name such as 'step_000000008' "
            "(no '/', not starting with '.')"
        )


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- flattening -------------------------------------------------------------------------------------------


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v) for v in obj)
    return False


def _flatten(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """``state_dict`` as DCP entries ``{fqn: tensor or python value}`` and the layout that nests them again.

    The layout is the same nesting of dicts, lists and tuples with each entry replaced by its fqn (a str).
    Raises TypeError (naming the entry) for anything ``torch.load(weights_only=True)`` would refuse, and
    ValueError when two paths give the same fqn."""
    flat: dict[str, Any] = {}

    def visit(obj: Any, path: tuple[Any, ...]) -> Any:
        where = "state_dict" + "".join(f"[{k!r}]" for k in path)
        if isinstance(obj, torch.Tensor):
            if not isinstance(obj, DTensor) and type(obj) not in (torch.Tensor, torch.nn.Parameter):
                raise TypeError(
                    f"{where} is a {type(obj).__name__}; sharded checkpoints hold plain tensors and DTensors"
                )
            return leaf(obj.detach(), path)
        container = type(obj) in (dict, OrderedDict, list, tuple)
        if not container or (path and not _holds_tensor(obj)):  # a sub-tree without tensors: one entry
            check_weights_only(obj, where)
            return leaf(obj, path)
        if type(obj) in (list, tuple):
            return type(obj)(visit(value, (*path, i)) for i, value in enumerate(obj))
        out = type(obj)()
        for key, value in obj.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use strings or ints")
            out[key] = visit(value, (*path, key))
        return out

    def leaf(value: Any, path: tuple[Any, ...]) -> str:
        fqn = ".".join(str(k) for k in path)
        if fqn in flat or fqn == LAYOUT_KEY:
            raise ValueError(f"two entries of the state_dict have the same flat name {fqn!r}; rename one")
        flat[fqn] = value
        return fqn

    if type(state_dict) not in (dict, OrderedDict):
        raise TypeError(f"state_dict is a {type(state_dict).__name__}; expected a dict")
    layout = visit(state_dict, ())
    return flat, layout


def _tensor_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested dict/list/tuple with the fqn :func:`_flatten` gives it."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensor_leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensor_leaves(value, f"{prefix}.{i}" if prefix else str(i))


def _unflatten(layout: Any, values: dict[str, Any]) -> Any:
    if isinstance(layout, str):
        return values[layout]
    if type(layout) in (dict, OrderedDict):
        return type(layout)((k, _unflatten(v, values)) for k, v in layout.items())
    if type(layout) in (list, tuple):
        return type(layout)(_unflatten(v, values) for v in layout)
    raise CheckpointError(f"the layout entry holds a {type(layout).__name__}; it is corrupt")


def _layout_from_planner_data(md: dcp_md.Metadata) -> dict[str, Any]:
    """The nesting of a DCP checkpoint written by other code (no trainkit layout): DCP's own mapping of
    flat names to paths (string keys, integer list indices), or the flat names themselves."""
    layout: dict[str, Any] = {}
    mapping = md.planner_data if isinstance(md.planner_data, dict) else {}
    for fqn in md.state_dict_metadata:
        path = mapping.get(fqn, (fqn,))
        if not isinstance(path, (tuple, list)) or not path:
            path = (fqn,)
        node: Any = layout
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"DCP planner data for {fqn!r} is inconsistent")
        node[path[-1]] = fqn
    return _lists_from_int_keys(layout)


def _lists_from_int_keys(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: _lists_from_int_keys(v) for k, v in node.items()}
    if out and all(type(k) is int for k in out) and sorted(out) == list(range(len(out))):
        return [out[i] for i in range(len(out))]
    return out


# -- safe reading -----------------------------------------------------------------------------------------


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


class _SafeReader(FsspecReader):
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


class _Writer(FsspecWriter):
    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, durable: bool) -> None:
        super().__init__(path, sync_files=False, overwrite=True)
        self.fs = _BoundFileSystem(fs, durable)  # type: ignore[assignment]
        self.path = path


class _SafeLoadPlanner(DefaultLoadPlanner):
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
def _dcp_errors(action: str, shown: str) -> Iterator[None]:
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
def _quiet_no_dist() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint")
        yield


def _distributed(process_group: Any) -> tuple[bool, int]:
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(process_group)
    if process_group is not None:
        raise ValueError("process_group was given but torch.distributed is not initialised")
    return False, 0


# -- save -------------------------------------------------------------------------------------------------


def save_dcp(
    state_dict: dict[str, Any],
    storage: CheckpointStorage,
    name: str,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> str:
    """Write ``state_dict`` as the sharded checkpoint directory ``name`` in ``storage``; returns its location.

    Collective: every rank of ``process_group`` (default: the world; none: one plain process) calls it with
    its own ``state_dict`` (same keys; DTensors hold each rank's shards). Values may be tensors, DTensors,
    numbers, strings, None, and dicts (str/int keys), lists and tuples of them; anything else is a
    TypeError raised on the spot, before anything is written. Entries that are not DTensors are written
    once, by the lowest rank (rank 0's values count, as in a single-file checkpoint).

    Atomic: locally the directory is written under a hidden temporary name and renamed once every rank's
    data and ``.metadata`` are written (an existing ``name`` is replaced); on an object store it is written
    in place (an old ``.metadata`` under ``name`` is removed first) and is complete once ``.metadata`` is
    there. A local ``checkpoint_dir`` must be the same directory for every rank (one machine or a shared
    filesystem). Failure on any rank raises CheckpointError on every rank and leaves no complete ``name``
    behind that was not there before.
    """
    _check_name(name)
    if not isinstance(storage, CheckpointStorage):
        raise TypeError(f"storage={storage!r} is not valid; expected a trainkit CheckpointStorage")
    flat, layout = _flatten(state_dict)
    flat[LAYOUT_KEY] = layout
    distributed, rank = _distributed(process_group)
    fs = storage.fs
    final = storage.path(name)
    shown = storage.location(name)

    if storage.is_local:
        token = [uuid.uuid4().hex if rank == 0 else None]
        if rank == 0:
            _remove_stale_temporaries(storage, name)
        if distributed:
            dist.broadcast_object_list(token, group=process_group, group_src=0)
        target = storage.path(f".{name}.tmp-{token[0]}")
    else:
        if rank == 0 and is_complete(fs, final):
            fs.rm(f"{final}/{METADATA_NAME}")  # an old complete copy must not count while it is rewritten
        if distributed:
            dist.barrier(group=process_group)
        target = final

    writer = _Writer(fs, target, durable=storage.is_local)
    planner = DefaultSavePlanner(
        flatten_state_dict=False, flatten_sharded_tensors=False, dedup_save_to_lowest_rank=True
    )
    try:
        with _dcp_errors("written", shown), _quiet_no_dist():
            state_dict_saver.save(
                flat,
                storage_writer=writer,
                planner=planner,
                process_group=process_group,
                no_dist=not distributed,
            )
    except BaseException:
        if storage.is_local and rank == 0 and os.path.exists(target):
            fs.rm(target, recursive=True)
        raise

    if storage.is_local:
        if rank == 0:
            _publish_local(storage, target, name)
        if distributed:
            dist.barrier(group=process_group)
    else:
        fs.invalidate_cache(storage.root)
    return shown


def _remove_stale_temporaries(storage: CheckpointStorage, name: str) -> None:
    """What an earlier save of ``name`` that was killed left behind (hidden, never counted)."""
    if not os.path.isdir(storage.root):
        return
    for entry in os.listdir(storage.root):
        if entry.startswith((f".{name}.tmp-", f".{name}.trash-")):
            storage.fs.rm(storage.path(entry), recursive=True)


def _publish_local(storage: CheckpointStorage, tmp: str, name: str) -> None:
    _fsync_dir(tmp)  # every file was fsynced once closed; this makes their names durable too
    final = storage.path(name)
    old = None
    if os.path.exists(final):
        old = storage.path(f".{name}.trash-{uuid.uuid4().hex}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(storage.root)
    if old is not None:
        storage.fs.rm(old, recursive=True)


# -- load -------------------------------------------------------------------------------------------------


def _resolve(
    storage_or_url: CheckpointStorage | str | os.PathLike[str],
    name_or_path: str | None,
    storage_options: dict[str, Any] | None,
) -> tuple[fsspec.AbstractFileSystem, str, str]:
    if isinstance(storage_or_url, CheckpointStorage):
        if name_or_path is None:
            raise ValueError(
                "name_or_path=None is not valid with a CheckpointStorage; give the directory name"
            )
        _check_name(name_or_path)
        return storage_or_url.fs, storage_or_url.path(name_or_path), storage_or_url.location(name_or_path)
    if not isinstance(storage_or_url, (str, os.PathLike)):
        raise TypeError(
            f"storage_or_url={storage_or_url!r} is not valid; expected a CheckpointStorage, a path or a URL"
        )
    url = os.fspath(storage_or_url)
    if name_or_path is not None:
        url = f"{url.rstrip('/')}/{name_or_path}"
    fs, path = url_to_fs(url, storage_options)
    return fs, path.rstrip("/"), url


def load_dcp(
    state_dict: dict[str, Any],
    storage_or_url: CheckpointStorage | str | os.PathLike[str],
    name_or_path: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Load a sharded checkpoint into ``state_dict`` in place (collective when a process group exists).

    The checkpoint is ``storage_or_url`` (a CheckpointStorage) with the directory ``name_or_path``, or the
    directory path/URL ``storage_or_url`` itself (``name_or_path``, if given, joined under it).

    Afterwards ``state_dict`` holds exactly the checkpoint's entries, nested as they were saved. A tensor
    that ``state_dict`` already holds at the same place is filled in place and kept: a DTensor receives its
    own shards whatever world size wrote them (DCP reshards), a plain tensor of the saved shape is copied
    into. Every other entry (python values, tensors ``state_dict`` lacks) is new, on CPU. Returns
    ``state_dict``.

    Raises CheckpointNotFoundError (no such directory), CheckpointError (incomplete, unsafe or corrupt
    contents: no code from the checkpoint is ever run; a DTensor whose global shape differs from the saved
    one).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict={type(state_dict).__name__} is not valid; expected a dict")
    fs, path, shown = _resolve(storage_or_url, name_or_path, storage_options)
    distributed, _ = _distributed(process_group)
    loaded = _load_into(state_dict, fs, path, shown, process_group, distributed)
    state_dict.clear()
    state_dict.update(loaded)
    return state_dict


def load_full(
    url_or_path: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    keys: Collection[str] | None = None,
) -> dict[str, Any]:
    """Read a sharded checkpoint in this one process (no process group needed) with full tensors on CPU.

    Gives the same nested dict the checkpoint was saved from (tensors unsharded, DTensors as plain
    tensors). ``keys``: only these top-level entries (e.g. ``("model",)``), to spare memory. Raises
    CheckpointNotFoundError / CheckpointError as :func:`load_dcp` does.
    """
    fs, path, shown = _resolve(url_or_path, None, storage_options)
    return _load_into({}, fs, path, shown, None, False, keys=keys)


def _load_into(
    target: dict[str, Any],
    fs: fsspec.AbstractFileSystem,
    path: str,
    shown: str,
    process_group: Any,
    distributed: bool,
    keys: Collection[str] | None = None,
) -> dict[str, Any]:
    md = read_metadata(fs, path, shown)
    ours = dict(_tensor_leaves(target))
    kept: dict[str, torch.Tensor] = {}
    request: dict[str, Any] = {}
    for fqn, item in md.state_dict_metadata.items():
        if keys is not None and fqn != LAYOUT_KEY and fqn.split(".", 1)[0] not in keys:
            continue
        if isinstance(item, dcp_md.BytesStorageMetadata):
            request[fqn] = None
            continue
        mine = ours.get(fqn)
        if isinstance(mine, DTensor):
            if mine.shape != item.size:
                raise CheckpointError(
                    f"entry {fqn!r} of {shown!r} has shape {tuple(item.size)}; the state_dict's DTensor has "
                    f"{tuple(mine.shape)}"
                )
            request[fqn] = kept[fqn] = mine
        elif mine is not None and mine.shape == item.size and mine.dtype == item.properties.dtype:
            request[fqn] = kept[fqn] = mine
        else:
            request[fqn] = torch.empty(item.size, dtype=item.properties.dtype)
    reader = _SafeReader(fs, path, md)
    planner = _SafeLoadPlanner(shown)
    with _dcp_errors("read", shown), _quiet_no_dist():
        state_dict_loader.load(
            request,
            storage_reader=reader,
            planner=planner,
            process_group=process_group,
            no_dist=not distributed,
        )
    values = {fqn: planner.objects.get(fqn, value) for fqn, value in request.items()}
    values.update(kept)  # the caller's own tensors, filled in place, stay those very objects
    layout = values.pop(LAYOUT_KEY, None)
    if layout is None:
        layout = _layout_from_planner_data(md)
    if keys is not None and isinstance(layout, dict):
        layout = type(layout)((k, v) for k, v in layout.items() if k in keys)
    try:
        result = _unflatten(layout, values)
    except KeyError as exc:
        raise CheckpointError(
            f"sharded checkpoint {shown!r} lacks the entry {exc.args[0]!r} its layout names"
        ) from None
    if not isinstance(result, dict):
        raise CheckpointError(f"sharded checkpoint {shown!r} does not hold a dict")
    return result


def load_checkpoint_dir(
    path_or_url: str | os.PathLike[str],
    map_location: Any = "cpu",
    storage_options: dict[str, Any] | None = None,
    keys: Collection[str] | None = None,
) -> dict[str, Any]:
    """:func:`load_full` for ``tk.load_checkpoint``: checks that it is a trainkit checkpoint and moves the
    tensors to ``map_location`` (a device or device string)."""
    shown = os.fspath(path_or_url)
    ckpt = load_full(shown, storage_options, keys=None if keys is None else (*keys, FORMAT_KEY))
    if FORMAT_KEY not in ckpt:
        raise CheckpointError(f"{shown!r} is not a trainkit checkpoint (no {FORMAT_KEY!r} entry)")
    if ckpt[FORMAT_KEY] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {shown!r} has format {ckpt[FORMAT_KEY]}, newer than this trainkit reads ({FORMAT_VERSION})"
        )
    wanted = REQUIRED_KEYS if keys is None else [k for k in (FORMAT_KEY, *keys) if k in REQUIRED_KEYS]
    missing = [k for k in wanted if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {shown!r} lacks the entries {missing}")
    if map_location not in (None, "cpu") and map_location != torch.device("cpu"):
        if not isinstance(map_location, (str, torch.device)):
            raise TypeError(
                f"map_location={map_location!r} is not valid for a sharded checkpoint; give a device or a string"
            )
        ckpt = _to_device(ckpt, torch.device(map_location))
    return ckpt


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, _to_device(v, device)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# -- conversion -------------------------------------------------------------------------------------------


def _split_parent(url: str) -> tuple[str, str]:
    if "://" not in url:
        head, name = os.path.split(os.path.abspath(url))
        return head, name
    head, _, name = url.rstrip("/").rpartition("/")
    if not name or head.endswith(":/"):  # "s3://bucket" alone has no parent to write into
        raise ValueError(f"dst={url!r} is not valid; expected a name inside a directory or bucket")
    return head, name


def convert_checkpoint(src: str, dst: str, storage_options: dict[str, Any] | None = None) -> str:
    """Convert a sharded checkpoint directory into one single-file checkpoint, or back; returns ``dst``.

    ``src`` a sharded directory (trainkit's, or any DCP checkpoint) → ``dst`` one file written atomically,
    loadable with ``torch.load(weights_only=True)``. ``src`` a trainkit single-file checkpoint → ``dst`` a
    sharded directory (one process writes every entry). ``storage_options`` apply to both. Raises
    CheckpointNotFoundError (no ``src``), FileExistsError (``dst`` exists: nothing is overwritten),
    CheckpointError (``src`` unsafe, incomplete or corrupt; nothing is written).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    src_fs, src_path = url_to_fs(src, storage_options)
    dst_fs, dst_path = url_to_fs(dst, storage_options)
    parent, name = _split_parent(dst)
    if dst_fs.exists(dst_path):
        raise FileExistsError(f"dst={dst!r} already exists; remove it or choose another name")
    if src_fs.isdir(src_path):
        obj = load_full(src, storage_options)
        check_weights_only(obj, "the converted checkpoint")
        return CheckpointStorage(parent, storage_options).write(name, obj)
    if not src_fs.exists(src_path):
        raise CheckpointNotFoundError(f"checkpoint {src!r} does not exist")
    obj = _load_file(src_fs, src_path, src, "cpu")
    return save_dcp(obj, CheckpointStorage(parent, storage_options), name)
