"""Sharded checkpoint directories: names, completeness, listing, deletion and atomic local publication.

A directory is complete iff its ``.metadata`` exists; locally a save is published by renaming a hidden
temporary directory (see :mod:`trainkit.dcp` for the layout). Apart from :mod:`trainkit.dcp` because none
of this reads or writes checkpoint contents or calls DCP: it is file handling on fsspec, with which a
trainer finds, lists and prunes its checkpoints without loading any.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

import fsspec

from .checkpoint import CheckpointStorage, url_to_fs

METADATA_NAME = ".metadata"
_SHARDED = re.compile(r"^(best_)?step_(\d+)$")


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
    check_name(name)
    path = storage.path(name)
    if not storage.fs.exists(path):
        return
    if storage.is_local:
        trash = storage.path(f".{name}.trash-{uuid.uuid4().hex}")
        os.rename(path, trash)
        fsync_dir(storage.root)
        storage.fs.rm(trash, recursive=True)
    else:
        meta = f"{path}/{METADATA_NAME}"
        if storage.fs.exists(meta):
            storage.fs.rm(meta)
        storage.fs.rm(path, recursive=True)
        storage.fs.invalidate_cache(storage.root)


def resolve_dir(
    storage_or_url: CheckpointStorage | str | os.PathLike[str],
    name_or_path: str | None,
    storage_options: dict[str, Any] | None,
) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """``(fs, path, shown)`` of a checkpoint directory: ``name_or_path`` in a CheckpointStorage, or the
    path/URL ``storage_or_url`` (with ``name_or_path``, if given, joined under it)."""
    if isinstance(storage_or_url, CheckpointStorage):
        if name_or_path is None:
            raise ValueError(
                "name_or_path=None is not valid with a CheckpointStorage; give the directory name"
            )
        check_name(name_or_path)
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


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(
            f"name={name!r} is not valid; expected a plain directory name such as 'step_000000008' "
            "(no '/', not starting with '.')"
        )


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(storage: CheckpointStorage, name: str) -> None:
    """What an earlier save of ``name`` that was killed left behind (hidden, never counted)."""
    if not os.path.isdir(storage.root):
        return
    for entry in os.listdir(storage.root):
        if entry.startswith((f".{name}.tmp-", f".{name}.trash-")):
            storage.fs.rm(storage.path(entry), recursive=True)


def publish_local(storage: CheckpointStorage, tmp: str, name: str) -> None:
    fsync_dir(tmp)  # every file was fsynced once closed; this makes their names durable too
    final = storage.path(name)
    old = None
    if os.path.exists(final):
        old = storage.path(f".{name}.trash-{uuid.uuid4().hex}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(storage.root)
    if old is not None:
        storage.fs.rm(old, recursive=True)
