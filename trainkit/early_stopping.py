"""The arithmetic of "did the metric improve?" and "should we stop?", apart from the loop that asks.

Both the best-checkpoint choice and early stopping use one rule: the first value sets the reference; a
later value improves only when it beats the best so far by strictly more than ``min_delta``
(``value < best - min_delta`` in ``"min"`` mode, ``value > best + min_delta`` in ``"max"`` mode). A NaN
or infinite value never improves.

Example::

    stopper = EarlyStopChecker(patience=2, mode="min", min_delta=0.1)
    [stopper.update(v) for v in [1.0, 0.95, 0.85, 0.86, 0.80]]
    # -> [False, False, False, False, True]
"""

from __future__ import annotations

import math
from typing import Any

_MODES = ("min", "max")


class MetricTracker:
    """Keeps the best value seen so far under the improvement rule above."""

    def __init__(self, mode: str = "min", min_delta: float = 0.0) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r} is not valid; expected 'min' or 'max'")
        if not isinstance(min_delta, (int, float)) or isinstance(min_delta, bool) or not min_delta >= 0:
            raise ValueError(f"min_delta={min_delta!r} is not valid; expected a number >= 0")
        self.mode = mode
        self.min_delta = float(min_delta)
        self.best: float | None = None

    def is_improvement(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float) -> bool:
        """Record ``value``; return whether it improved on the best so far."""
        improved = self.is_improvement(value)
        if improved:
            self.best = float(value)
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "min_delta": self.min_delta, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = None if state["best"] is None else float(state["best"])


class EarlyStopChecker:
    """Counts evaluations without improvement and says when ``patience`` is used up.

    ``update(value)`` returns True when fit should stop: the counter reached ``patience``, or (with
    ``check_finite``) the value is NaN or infinite. ``reason`` then says which.
    """

    def __init__(
        self, patience: int = 10, mode: str = "min", min_delta: float = 0.0, check_finite: bool = True
    ) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience={patience!r} is not valid; expected an integer >= 1")
        self.tracker = MetricTracker(mode, min_delta)
        self.patience = patience
        self.check_finite = bool(check_finite)
        self.wait = 0
        self.stopped = False
        self.reason: str | None = None

    @property
    def best(self) -> float | None:
        return self.tracker.best

    def update(self, value: float) -> bool:
        if self.tracker.update(value):
            self.wait = 0
        else:
            self.wait += 1
        if self.check_finite and not math.isfinite(value):
            self.stopped, self.reason = True, "non_finite"
        elif self.wait >= self.patience:
            self.stopped, self.reason = True, "early_stop"
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker.state_dict(),
            "wait": self.wait,
            "stopped": self.stopped,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counter and the best value. Whether that state means "stop" is decided again under
        this checker's own settings: a run stopped for patience 2 resumes training with ``patience=3``, and
        a non-finite stop holds only while ``check_finite`` is on."""
        self.tracker.load_state_dict(state["tracker"])
        self.wait = int(state["wait"])
        self.stopped, self.reason = False, None
        if state["reason"] == "non_finite" and self.check_finite:
            self.stopped, self.reason = True, "non_finite"
        elif self.wait >= self.patience:
            self.stopped, self.reason = True, "early_stop"
