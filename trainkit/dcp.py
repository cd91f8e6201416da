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
non-tensor entries with torch.load and ``weights_only=False``: either runs code from the checkpoint. trainkit
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

Files. This module holds the operations (save, load, load_full, conversion) and re-exports the rest, so
``trainkit.dcp`` is the one import: ``dcp_dirs`` (names, locations, completeness, listing, deletion, atomic
publication), ``dcp_layout`` (flattening and the nesting restored), ``dcp_io`` (the restricted
``.metadata`` reader, the safe reader and planner, the writer, DCP's errors as CheckpointError).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Collection
from typing import Any

import fsspec
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
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
from .checkpoint_inspect import read_file as _load_file
from .dcp_dirs import (
    METADATA_NAME,
    best_dir_name,
    check_name,
    complete_checkpoints,
    delete_checkpoint_dir,
    is_complete,
    is_sharded_checkpoint,
    latest_complete,
    publish_local,
    regular_dir_name,
    remove_stale_temporaries,
    resolve_dir,
    sharded_step,
)
from .dcp_io import (
    SafeLoadPlanner,
    SafeReader,
    Writer,
    dcp_errors,
    distributed_rank,
    quiet_no_dist,
    read_metadata,
)
from .dcp_layout import LAYOUT_KEY, flatten, layout_from_planner_data, tensor_leaves, to_device, unflatten

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
    check_name(name)
    if not isinstance(storage, CheckpointStorage):
        raise TypeError(f"storage={storage!r} is not valid; expected a trainkit CheckpointStorage")
    flat, layout = flatten(state_dict)
    flat[LAYOUT_KEY] = layout
    distributed, rank = distributed_rank(process_group)
    fs = storage.fs
    final = storage.path(name)
    shown = storage.location(name)

    if storage.is_local:
        token = [uuid.uuid4().hex if rank == 0 else None]
        if rank == 0:
            remove_stale_temporaries(storage, name)
        if distributed:
            dist.broadcast_object_list(token, group=process_group, group_src=0)
        target = storage.path(f".{name}.tmp-{token[0]}")
    else:
        if rank == 0 and is_complete(fs, final):
            fs.rm(f"{final}/{METADATA_NAME}")  # an old complete copy must not count while it is rewritten
        if distributed:
            dist.barrier(group=process_group)
        target = final

    writer = Writer(fs, target, durable=storage.is_local)
    planner = DefaultSavePlanner(
        flatten_state_dict=False, flatten_sharded_tensors=False, dedup_save_to_lowest_rank=True
    )
    try:
        with dcp_errors("written", shown), quiet_no_dist():
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
            publish_local(storage, target, name)
        if distributed:
            dist.barrier(group=process_group)
    else:
        fs.invalidate_cache(storage.root)
    return shown


# -- load -------------------------------------------------------------------------------------------------


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
    fs, path, shown = resolve_dir(storage_or_url, name_or_path, storage_options)
    distributed, _ = distributed_rank(process_group)
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
    fs, path, shown = resolve_dir(url_or_path, None, storage_options)
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
    ours = dict(tensor_leaves(target))
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
    reader = SafeReader(fs, path, md)
    planner = SafeLoadPlanner(shown)
    with dcp_errors("read", shown), quiet_no_dist():
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
        layout = layout_from_planner_data(md)
    if keys is not None and isinstance(layout, dict):
        layout = type(layout)((k, v) for k, v in layout.items() if k in keys)
    try:
        result = unflatten(layout, values)
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
        ckpt = to_device(ckpt, torch.device(map_location))
    return ckpt


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
