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
