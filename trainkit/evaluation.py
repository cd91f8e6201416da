"""One evaluation pass: a step function over a loader, metrics averaged by batch size across ranks; and
one prediction pass (:func:`run_predict_loop`).

A step's value may also be a metric object (``update``/``compute``/``reset``, e.g. a
``torchmetrics.Metric``) that the step has updated itself; it is not averaged: after the loader it reports
``compute()`` (which syncs over ranks itself) and is ``reset()``.
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, TypeGuard

import torch
from torch.utils.data import DataLoader

from .data import batch_size_of, move_to_device
from .distributed import DistContext

# Marks metric-object names in the cross-rank union of names, so that a rank that saw no batch (and so no
# metric object) learns that others hold one and fails instead of leaving them waiting in compute().
_METRIC_MARK = "\x00metric:"


def is_metric_object(value: Any) -> bool:
    """A stateful metric: not a tensor or number, and with callable ``update``, ``compute`` and ``reset``."""
    if isinstance(value, (torch.Tensor, int, float)):
        return False
    return all(callable(getattr(value, attr, None)) for attr in ("update", "compute", "reset"))


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
    """Run ``step`` on every batch and return ``{prefix + name: value}``.

    A scalar value (tensor or number) is weighted by its batch size (leading dimension of its first
    tensor) and averaged over the loader. The running sums stay on the device in float64; the one host
    transfer happens after the loop, together with the cross-rank sum, so every rank returns the same
    numbers.

    A metric object (see :func:`is_metric_object`) is the step's own accumulator: the step updates it (e.g.
    ``self.val_f1.update(preds, y)``) and returns it, the same object every batch. After the loader its
    ``compute()`` is reported under ``prefix + name`` (a mapping result, as from a ``MetricCollection``, as
    ``prefix + name + "_" + key``), then ``reset()`` is called, also when the loop fails. Under DDP every
    rank must see at least one batch, since ``compute()`` syncs over ranks.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    metric_objects: dict[str, Any] = {}
    move = device.type != "cpu"
    try:
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
                        f"{step_name} returned {type(out).__name__}; expected a mapping of metric name to "
                        "scalar tensor, number or metric object (update/compute/reset)"
                    )
                for name, value in out.items():
                    if is_metric_object(value):
                        _remember_metric(metric_objects, sums, name, value, step_name)
                        continue
                    if name in metric_objects:
                        raise TypeError(
                            f"{step_name} metric {name!r} was a metric object on an earlier batch and is a "
                            f"{type(value).__name__} now; return the same kind every batch"
                        )
                    contribution = _scalar(value, step_name, name) * weight
                    contribution = contribution.to(device)
                    if name in sums:
                        sums[name] += contribution
                        counts[name] += weight
                    else:
                        sums[name] = contribution
                        counts[name] = float(weight)
        gathered = dist_ctx.union_of_names(list(sums) + [_METRIC_MARK + n for n in metric_objects])
        names = [n for n in gathered if not n.startswith(_METRIC_MARK)]
        object_names = sorted(n[len(_METRIC_MARK) :] for n in gathered if n.startswith(_METRIC_MARK))
        missing = [n for n in object_names if n not in metric_objects]
        if missing:
            raise RuntimeError(
                f"{step_name}: rank {dist_ctx.rank} saw no batch, so it holds no metric object for "
                f"{missing}, whose compute() the other ranks are syncing; give every rank at least one batch"
            )
        results: dict[str, float] = {}
        if names:
            zero = torch.zeros((), dtype=torch.float64, device=device)
            totals = torch.stack([sums.get(n, zero) for n in names])
            weights = torch.tensor([counts.get(n, 0.0) for n in names], dtype=torch.float64, device=device)
            packed = dist_ctx.all_reduce_sum(torch.cat([totals, weights]))
            values = (packed[: len(names)] / packed[len(names) :]).tolist()
            results = {f"{prefix}{name}": float(v) for name, v in zip(names, values)}
        with torch.no_grad():
            for name in object_names:  # the same order on every rank: compute() syncs
                results.update(_computed(metric_objects[name], f"{prefix}{name}", step_name))
        return results
    finally:
        for metric in metric_objects.values():
            metric.reset()


def _remember_metric(
    metric_objects: dict[str, Any], sums: dict[str, torch.Tensor], name: str, value: Any, step_name: str
) -> None:
    if name in sums:
        raise TypeError(
            f"{step_name} metric {name!r} was a scalar on an earlier batch and is a metric object now; "
            "return the same kind every batch"
        )
    known = metric_objects.setdefault(name, value)
    if known is not value:
        raise ValueError(
            f"{step_name} returned a different metric object for {name!r} than on an earlier batch; keep "
            f"one (e.g. self.val_f1 = torchmetrics.F1Score(...) in __init__), update it in {step_name} "
            "and return that same object every batch"
        )


def _computed(metric: Any, name: str, step_name: str) -> dict[str, float]:
    value = metric.compute()
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(_computed_scalar(item, f"{name}_{key}", step_name))
        return out
    return _computed_scalar(value, name, step_name)


def _computed_scalar(value: Any, name: str, step_name: str) -> dict[str, float]:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{step_name} metric object {name!r} computed a tensor of shape {tuple(value.shape)}; "
                "expected a scalar (average per-class results, e.g. torchmetrics average='macro')"
            )
        return {name: float(value.detach().reshape(()).item())}
    return {name: float(value)}


def run_predict_loop(
    module: torch.nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> list[Any]:
    """``module.predict_step(batch, batch_idx)`` for every batch, in loader order, each output (tensors, or
    lists/tuples/dicts of them) moved to the CPU.

    Runs in ``eval()`` mode under ``torch.inference_mode()`` and restores every submodule's mode after,
    also when a step fails. The whole loader runs in this process (under DDP each rank predicts all of it).
    """
    modes = {m: m.training for m in module.modules()}
    module.eval()
    cpu = torch.device("cpu")
    outputs: list[Any] = []
    try:
        with torch.inference_mode():
            for batch_idx, batch in enumerate(loader):
                if device.type != "cpu":
                    batch = move_to_device(batch, device)
                with autocast():
                    out = module.predict_step(batch, batch_idx)  # type: ignore[operator]
                outputs.append(move_to_device(out, cpu) if device.type != "cpu" else out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the copies to the host above may be asynchronous
    finally:
        for m, was_training in modes.items():
            m.training = was_training
    return outputs


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
        if is_list_of_loaders(value):
            # Lightning's list of validation loaders: each DataLoader would reach the step as a "batch".
            raise TypeError(
                f"{param} is a {type(value).__name__} of {len(value)} loaders, which is not valid; expected one "
                "loader, or a mapping of set names to loaders such as {'set0': loader_a, 'set1': loader_b} "
                "(Lightning numbers a list of loaders; trainkit names the sets: val_<set>_<metric>)"
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


def is_list_of_loaders(value: Any) -> TypeGuard[list[Any] | tuple[Any, ...]]:
    """A list or tuple holding DataLoaders (Lightning's habit for several loaders), never a list of batches."""
    return isinstance(value, (list, tuple)) and any(isinstance(v, DataLoader) for v in value)


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


_ALLOWED = "expected a scalar tensor (one element, real), a real number, or a metric object (update/compute/reset)"


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
