"""Reading ``configure_optimizers()`` into one optimizer and its schedulers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

_INTERVALS = ("step", "epoch")
_SCHEDULER_KEYS = {"scheduler", "interval", "monitor", "frequency", "name"}


@dataclass
class SchedulerConfig:
    """A scheduler and when to step it: every optimizer step, every epoch, or (plateau) every evaluation."""

    scheduler: Any
    interval: str = "step"
    monitor: str = "val_loss"

    @property
    def on_plateau(self) -> bool:
        return isinstance(self.scheduler, ReduceLROnPlateau)


@dataclass
class OptimizerSetup:
    optimizer: torch.optim.Optimizer
    schedulers: list[SchedulerConfig]

    def stepped_every(self, interval: str) -> list[Any]:
        """The schedulers the loop steps every ``"step"`` or every ``"epoch"`` (plateau ones step on metrics)."""
        return [s.scheduler for s in self.schedulers if s.interval == interval and not s.on_plateau]

    @property
    def on_plateau(self) -> list[SchedulerConfig]:
        return [s for s in self.schedulers if s.on_plateau]


def _one_optimizer(value: Any) -> torch.optim.Optimizer:
    if isinstance(value, torch.optim.Optimizer):
        return value
    if isinstance(value, Sequence) and len(value) == 1 and isinstance(value[0], torch.optim.Optimizer):
        return value[0]
    raise TypeError(
        f"configure_optimizers() gave optimizer={value!r}; expected one torch.optim.Optimizer "
        "(trainkit steps a single optimizer)"
    )


def _scheduler_config(value: Any, optimizer: torch.optim.Optimizer) -> SchedulerConfig:
    if isinstance(value, Mapping):
        unknown = set(value) - _SCHEDULER_KEYS
        if unknown or "scheduler" not in value:
            raise ValueError(
                f"configure_optimizers() gave lr_scheduler={dict(value)!r}; expected a dict with 'scheduler' "
                f"and optionally 'interval' ('step' or 'epoch') and 'monitor' (unknown keys: {sorted(unknown)})"
            )
        interval = value.get("interval", "step")
        if interval not in _INTERVALS:
            raise ValueError(f"lr_scheduler interval={interval!r} is not valid; expected 'step' or 'epoch'")
        frequency = value.get("frequency", 1)
        if frequency != 1:  # accepted for Lightning compatibility, but never silently ignored
            raise ValueError(
                f"lr_scheduler frequency={frequency!r} is not supported; expected 1 (one step per interval)"
            )
        monitor = value.get("monitor", "val_loss")
        if not isinstance(monitor, str):
            raise ValueError(f"lr_scheduler monitor={monitor!r} is not valid; expected a metric name")
        config = SchedulerConfig(value["scheduler"], interval, monitor)
    else:
        config = SchedulerConfig(value)
    if not isinstance(config.scheduler, (LRScheduler, ReduceLROnPlateau)):
        raise TypeError(
            f"configure_optimizers() gave lr_scheduler={config.scheduler!r}; expected a "
            "torch.optim.lr_scheduler scheduler"
        )
    if config.scheduler.optimizer is not optimizer:
        raise ValueError("configure_optimizers(): the lr_scheduler is not built on the returned optimizer")
    return config


def _scheduler_configs(value: Any, optimizer: torch.optim.Optimizer) -> list[SchedulerConfig]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [_scheduler_config(v, optimizer) for v in value]
    return [_scheduler_config(value, optimizer)]


def parse_optimizers(value: Any) -> OptimizerSetup:
    """Accepts ``opt``, ``(opt, sched)``, ``(opt, [sched, ...])``, ``([opt], [sched])`` or
    ``{"optimizer": opt, "lr_scheduler": sched | {"scheduler": sched, "interval": ..., "monitor": ...}}``."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"optimizer", "lr_scheduler"}
        if unknown or "optimizer" not in value:
            raise ValueError(
                f"configure_optimizers() returned a dict with keys {sorted(value)}; expected 'optimizer' and "
                "optionally 'lr_scheduler'"
            )
        optimizer = _one_optimizer(value["optimizer"])
        return OptimizerSetup(optimizer, _scheduler_configs(value.get("lr_scheduler"), optimizer))
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and not isinstance(value[1], torch.optim.Optimizer)
    ):
        optimizer = _one_optimizer(value[0])
        return OptimizerSetup(optimizer, _scheduler_configs(value[1], optimizer))
    return OptimizerSetup(_one_optimizer(value), [])
