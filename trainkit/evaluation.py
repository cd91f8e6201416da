"""One evaluation pass: a step function over a loader, metrics averaged by batch size across ranks."""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch

from .data import batch_size_of, move_to_device
from .distributed import DistContext


def run_eval_loop(
    step: Callable[[Any, int], Any],
    loader: Iterable[Any],
    *,
    prefix: str,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
    dist_ctx: DistContext,
    step_name: str = "validation_step",
) -> dict[str, float]:
    """Run ``step`` on every batch and return ``{prefix + name: weighted mean}``.

    Each batch's metrics are weighted by its batch size (leading dimension of its first tensor). The
    running sums stay on the device in float64; the one host transfer happens after the loop, together
    with the cross-rank sum, so every rank returns the same numbers.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    move = device.type != "cpu"
    with torch.no_grad():
        for batch_idx, batch in enumerate(loader):
            if move:
                batch = move_to_device(batch, device)
            weight = batch_size_of(batch)
            with autocast():
                out = step(batch, batch_idx)
            if isinstance(out, torch.Tensor):
                out = {"loss": out}
            if not isinstance(out, Mapping):
                raise TypeError(
                    f"{step_name} returned {type(out).__name__}; expected a mapping of metric name to scalar "
                    "tensor or number"
                )
            for name, value in out.items():
                contribution = (_scalar(value, step_name, name) * weight).to(device)
                if name in sums:
                    sums[name] += contribution
                    counts[name] += weight
                else:
                    sums[name] = contribution
                    counts[name] = float(weight)
    names = dist_ctx.union_of_names(list(sums))
    if not names:
        return {}
    zero = torch.zeros((), dtype=torch.float64, device=device)
    totals = torch.stack([sums.get(n, zero) for n in names])
    weights = torch.tensor([counts.get(n, 0.0) for n in names], dtype=torch.float64, device=device)
    packed = dist_ctx.all_reduce_sum(torch.cat([totals, weights]))
    values = (packed[: len(names)] / packed[len(names) :]).tolist()
    return {f"{prefix}{name}": float(v) for name, v in zip(names, values)}


# -- several evaluation sets ------------------------------------------------------------------------------


def loader_sets(param: str, value: Any) -> list[tuple[str, Any]]:
    """``val_loader``/``test_loader`` as ``[(set_name, loader), ...]``: ``[]`` for None, ``[("", loader)]``
    for one loader (today's metric names), the mapping's items in its order for a mapping of set names to
    loaders.

    Raises ValueError (naming ``param``) for an empty mapping or a set name that is not a Python
    identifier, and TypeError for a loader that is not iterable. Nothing runs a batch before this.
    """
    if value is None:
        return []
    if not isinstance(value, Mapping):
        if not isinstance(value, Iterable):
            raise TypeError(
                f"{param}={value!r} is not valid; expected an iterable of batches (a DataLoader), or a mapping "
                "of set names to them"
            )
        return [("", value)]
    if not value:
        raise ValueError(
            f"{param}={dict(value)!r} is not valid; expected a loader, or a non-empty mapping of set names to "
            "loaders such as {'clean': loader_a, 'noisy': loader_b}"
        )
    sets: list[tuple[str, Any]] = []
    for name, loader in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"{param} has set name {name!r}, which is not valid; expected set names that are Python "
                f"identifiers (letters, digits and '_', not starting with a digit), given {list(value)!r}"
            )
        if isinstance(loader, Mapping) or not isinstance(loader, Iterable):
            raise TypeError(
                f"{param}[{name!r}]={loader!r} is not valid; expected an iterable of batches (a DataLoader)"
            )
        sets.append((name, loader))
    return sets


def metric_prefix(stage: str, set_name: str = "", model_prefix: str = "") -> str:
    """The prefix of one evaluation's metric names: ``val_``, ``test_``, ``val_<set>_``, ``ema_val_<set>_`` …
    (``model_prefix`` is ``""`` for the base model, ``"ema_"`` for the EMA)."""
    return f"{model_prefix}{stage}_{set_name + '_' if set_name else ''}"


def map_loaders(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to one loader, or to every loader of a mapping of named sets (a new dict, same order):
    e.g. each rank's shard of every evaluation set under DDP."""
    if isinstance(value, Mapping):
        return {name: fn(loader) for name, loader in value.items()}
    return fn(value)


def merge_set_metrics(into: dict[str, float], metrics: Mapping[str, float], where: str) -> None:
    """Add one set's metrics to ``into``; a name produced twice (set ``a`` metric ``b_loss`` and set ``a_b``
    metric ``loss`` both give ``val_a_b_loss``) is a ValueError rather than a silent overwrite."""
    clash = sorted(set(into) & set(metrics))
    if clash:
        raise ValueError(
            f"{where} produced metric names {clash} that another evaluation set already produced; rename a "
            "set in val_loader/test_loader so that val_<set>_<metric> names stay distinct"
        )
    into.update(metrics)


_ALLOWED = "expected a scalar tensor (one element, real) or a real number"


def _scalar(value: Any, step_name: str, name: Any) -> torch.Tensor:
    """One metric value as a float64 0-d tensor, on the device it came from. Anything else is a TypeError or
    ValueError naming the method, the key, the type or shape, and what is allowed. Reads only metadata
    (type, shape, dtype): no host sync."""
    if not isinstance(name, str):
        raise TypeError(
            f"{step_name} returned a metric keyed {name!r} ({type(name).__name__}); metric names must be str"
        )
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{step_name} metric {name!r} has shape {tuple(value.shape)}; {_ALLOWED}")
        if value.is_complex():
            raise TypeError(f"{step_name} metric {name!r} has dtype {value.dtype} (complex); {_ALLOWED}")
        return value.detach().reshape(()).to(torch.float64)
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(
        f"{step_name} metric {name!r} is {type(value).__name__} {reprlib.repr(value)}; {_ALLOWED}"
    )
