"""Learning-rate warmup in front of any ``torch.optim.lr_scheduler``."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau


class WarmupScheduler(LRScheduler):
    """Linear warmup for ``warmup_steps`` scheduler steps, then ``main_scheduler``.

    With ``t`` the number of ``step()`` calls so far (one per optimizer step under the Trainer's default
    ``interval="step"``)::

        t <  warmup_steps:  lr = base_lr * (warmup_factor + (1 - warmup_factor) * t / warmup_steps)
        t == warmup_steps:  lr = base_lr
        t >  warmup_steps:  main_scheduler.step() is called, its own count starting at 0 at t == warmup_steps

    Without ``main_scheduler`` the lr stays at ``base_lr`` after warmup. Because ``main_scheduler`` is
    built on the same optimizer before this wrapper, its initial lr is ``base_lr``; the wrapper then
    lowers it to the warmup value.

    Example::

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = WarmupScheduler(opt, warmup_steps=100, warmup_factor=0.1,
                                main_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=900))
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        warmup_factor: float = 0.0,
        main_scheduler: LRScheduler | None = None,
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} is not valid; expected an integer >= 0")
        if (
            isinstance(warmup_factor, bool)
            or not isinstance(warmup_factor, (int, float))
            or not (0.0 <= warmup_factor <= 1.0)
        ):
            raise ValueError(f"warmup_factor={warmup_factor!r} is not valid; expected a number in [0, 1]")
        if isinstance(main_scheduler, ReduceLROnPlateau):
            raise TypeError(
                "main_scheduler=ReduceLROnPlateau is not supported by WarmupScheduler: it steps on a metric; "
                "return it as a separate scheduler with interval and monitor"
            )
        if main_scheduler is not None and main_scheduler.optimizer is not optimizer:
            raise ValueError("main_scheduler must be built on the same optimizer as the WarmupScheduler")
        self.warmup_steps = warmup_steps
        self.warmup_factor = float(warmup_factor)
        self.main_scheduler = main_scheduler
        super().__init__(optimizer)

    def get_lr(self) -> list[Any]:  # type: ignore[override]
        t = self.last_epoch
        if t >= self.warmup_steps:
            return list(self.base_lrs)
        scale = self.warmup_factor + (1.0 - self.warmup_factor) * t / self.warmup_steps
        return [base_lr * scale for base_lr in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        if epoch is not None:
            raise ValueError("WarmupScheduler.step(epoch) is not supported; call step() once per step")
        if self.main_scheduler is not None and self.last_epoch >= self.warmup_steps:
            self.last_epoch += 1
            self.main_scheduler.step()
            self._last_lr = self.main_scheduler.get_last_lr()
            return
        super().step()

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "main_scheduler")}
        state["main_scheduler"] = None if self.main_scheduler is None else self.main_scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        main_state = state.pop("main_scheduler", None)
        self.__dict__.update(state)
        if self.main_scheduler is not None and main_state is not None:
            self.main_scheduler.load_state_dict(main_state)


# The spec's original name for the same class.
qWarmupScheduler = WarmupScheduler
