"""The flat DCP form of a nested checkpoint dict, and the nesting restored on load.

DCP stores a flat ``{fqn: tensor or object}``; a trainkit checkpoint is nested (dicts with str/int keys,
lists, tuples). :func:`flatten` gives one DCP entry per tensor (``"model.layer.weight"``) and one per
sub-tree without tensors, plus the layout: the same nesting with each entry replaced by its fqn, stored
as the entry ``LAYOUT_KEY`` so that :func:`unflatten` gives back the same dict. A DCP checkpoint written
by other code has no layout; :func:`layout_from_planner_data` rebuilds one from DCP's own records.
Apart from :mod:`trainkit.dcp` because it is pure data transformation: no files, processes or DCP calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.tensor import DTensor

from .checkpoint import CheckpointError, check_weights_only

LAYOUT_KEY = "__trainkit_layout__"


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v) for v in obj)
    return False


def flatten(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
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


def tensor_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested dict/list/tuple with the fqn :func:`flatten` gives it."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from tensor_leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensor_leaves(value, f"{prefix}.{i}" if prefix else str(i))


def unflatten(layout: Any, values: dict[str, Any]) -> Any:
    if isinstance(layout, str):
        return values[layout]
    if type(layout) in (dict, OrderedDict):
        return type(layout)((k, unflatten(v, values)) for k, v in layout.items())
    if type(layout) in (list, tuple):
        return type(layout)(unflatten(v, values) for v in layout)
    raise CheckpointError(f"the layout entry holds a {type(layout).__name__}; it is corrupt")


def layout_from_planner_data(md: dcp_md.Metadata) -> dict[str, Any]:
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


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, to_device(v, device)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
