"""Reading without trusting: what may go into a checkpoint, and what a file is before torch loads it.

``check_weights_only`` refuses, before anything is written, an entry that ``torch.load(weights_only=True)``
would refuse. ``inspect_file`` classifies a file (not a torch file, truncated or damaged, refers to
forbidden globals, not a trainkit checkpoint, a newer format) from its zip directory and pickle record
alone: the pickle is scanned with ``pickletools`` and unpickled with placeholders for tensors, so nothing
from the file is imported or run and no tensor data is read. ``read_file`` does that, then loads with
``weights_only=True``. Apart from storage because none of this knows where files live or how they are
fetched: it reads one open binary file (``read_file``: one fsspec path).
"""

from __future__ import annotations

import codecs
import copy
import io
import pickle
import pickletools
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import Counter, OrderedDict
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from .checkpoint_format import (
    FORMAT_KEY,
    FORMAT_VERSION,
    REQUIRED_KEYS,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    first_line,
)

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


# -- reading without trusting: classify a file by what is in it ------------------------------------------

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER: first pickle of a legacy file
# Allowed globals that a structure-only read builds for real (harmless builtins); the rest become placeholders.
_REAL = {
    "collections.OrderedDict": OrderedDict,
    "collections.Counter": Counter,
    "builtins.set": set,
    "builtins.complex": complex,
    "builtins.bytearray": bytearray,
    "_codecs.encode": codecs.encode,
}


def read_file(fs: fsspec.AbstractFileSystem, path: str, shown: str, map_location: Any) -> dict[str, Any]:
    if not fs.exists(path):
        raise CheckpointNotFoundError(f"checkpoint {shown!r} does not exist")
    local = isinstance(fs, LocalFileSystem)
    try:
        f: Any = open(path, "rb") if local else io.BytesIO(fs.cat_file(path))
    except Exception as exc:  # OSError, or the store client's own errors
        raise CheckpointReadError(f"checkpoint {shown!r} could not be read: {first_line(exc)}") from exc
    with f:
        inspect_file(f, shown)  # classifies garbage, damage and forbidden globals before torch sees a byte
        f.seek(0)
        try:
            obj = torch.load(path if local else f, map_location=map_location, weights_only=True)
        except Exception as exc:  # anything torch raises past the checks above means damaged contents
            raise CheckpointError(
                f"checkpoint {shown!r} is truncated or damaged: its records could not be read "
                f"({first_line(exc)})"
            ) from None
    check_entries(obj, shown)
    return obj


def _allowed_globals() -> set[str]:
    """The ``module.name`` globals that ``torch.load(weights_only=True)`` accepts, user-added ones included."""
    try:
        from torch import _weights_only_unpickler as wou

        return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())
    except (ImportError, AttributeError):  # private API moved: the documented defaults
        names = {f"torch._utils.{n}" for n in dir(torch._utils) if n.startswith("_rebuild_")}
        names |= {
            f"torch.{n}" for n in dir(torch) if isinstance(getattr(torch, n, None), (torch.dtype, type))
        }
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
    except CheckpointReadError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {shown!r} is {what}: {first_line(exc)}") from None
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
    except CheckpointReadError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {shown!r} is {what}: {first_line(exc)}") from None


def inspect_file(f: Any, shown: str) -> Any:
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
                raise CheckpointError(
                    f"checkpoint {shown!r} is not a torch file (a zip archive with no data.pkl)"
                )
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
                f"({first_line(exc)})"
            ) from None
        prefix = pkl[: -len("data.pkl")]
        skeleton, keys = _skeleton(
            io.BytesIO(record), shown, allowed, "truncated or damaged (its data.pkl does not unpickle)"
        )
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
    check_entries(skeleton, shown)
    return skeleton


def check_entries(obj: Any, shown: str) -> None:
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
