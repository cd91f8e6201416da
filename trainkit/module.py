"""The user's half of the split: what to compute. The Trainer owns everything else."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .callbacks import Callback

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer


class TaskModule(torch.nn.Module, Callback):
    """A ``torch.nn.Module`` that says how to train, evaluate and optimise itself.

    Override ``training_step`` (a loss tensor, or a mapping with ``"loss"``; other entries are logged as
    ``train_<name>``), ``validation_step`` (a mapping of metric name to scalar tensor or number, averaged
    over the loader weighted by batch size), optionally ``test_step`` (defaults to ``validation_step``),
    and ``configure_optimizers``. Every :class:`~trainkit.Callback` hook may be overridden here too, with
    the same signature ``hook(trainer, module, ...)``; they run before the Trainer's callbacks. The two
    checkpoint hooks are the exception: on a TaskModule they take only the checkpoint dict.

    Example::

        class Regressor(tk.TaskModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Linear(8, 1)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.mse_loss(self.net(x), y)

            def validation_step(self, batch, batch_idx):
                x, y = batch
                return {"loss": torch.nn.functional.mse_loss(self.net(x), y)}

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)
    """

    # A weak reference, so that ``copy.deepcopy`` (EMA) shares the trainer instead of copying it and a
    # module does not keep a finished Trainer alive.
    _trainer_ref: weakref.ReferenceType[Trainer] | None = None

    @property
    def trainer(self) -> Trainer:
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None:
            raise RuntimeError(
                f"{type(self).__name__} is not attached to a Trainer; self.trainer exists during fit"
            )
        return trainer

    @property
    def global_step(self) -> int:
        """Completed optimizer steps of the attached Trainer (0 when detached)."""
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        return trainer.global_step if trainer is not None else 0

    @property
    def current_epoch(self) -> int:
        """Completed passes over the train loader of the attached Trainer (0 when detached)."""
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        return trainer.current_epoch if trainer is not None else 0

    def _attach(self, trainer: Trainer | None) -> None:
        object.__setattr__(self, "_trainer_ref", weakref.ref(trainer) if trainer is not None else None)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | Mapping[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement training_step(batch, batch_idx)")

    def validation_step(self, batch: Any, batch_idx: int) -> Mapping[str, Any]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement validation_step(batch, batch_idx) to be evaluated"
        )

    def test_step(self, batch: Any, batch_idx: int) -> Mapping[str, Any]:
        return self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement configure_optimizers()")

    # On a TaskModule the checkpoint hooks take only the checkpoint dict: add (or read) your own keys.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # type: ignore[override]
        """Add task-specific state to ``checkpoint`` (tensors, numbers, strings, lists, tuples, dicts)."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # type: ignore[override]
        """Read back what :meth:`on_save_checkpoint` added."""


def training_loss(out: Any) -> torch.Tensor:
    """The loss in what ``training_step`` returned as a mapping; TypeError naming what came instead."""
    if isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    raise TypeError(
        f"training_step returned {type(out).__name__}"
        + (f" with keys {sorted(out)}" if isinstance(out, Mapping) else "")
        + "; expected a loss tensor or a mapping with a 'loss' tensor"
    )
