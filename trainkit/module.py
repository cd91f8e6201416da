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
    over the loader weighted by batch size; or a metric object with ``update``/``compute``/``reset``, such
    as a ``torchmetrics.Metric`` the step updates and returns, reported as ``compute()`` over the loader),
    optionally ``test_step`` (defaults to ``validation_step``) and ``predict_step`` (defaults to
    ``self(batch)``), and ``configure_optimizers``. There is no ``self.log``: return a dict. Every
    :class:`~trainkit.Callback` hook may be overridden here too, with the same signature
    ``hook(trainer, module, ...)``; they run before the Trainer's callbacks. The two checkpoint hooks are
    the exception: on a TaskModule they take only the checkpoint dict.

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

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        """What ``Trainer.predict`` collects for one batch (any tensors, or lists/tuples/dicts of them).

        Default: ``self(batch)``, the module's ``forward`` on the whole batch, as in Lightning. Override it to
        unpack the batch, e.g. ``x, _ = batch; return self.net(x).argmax(1)``.
        """
        if type(self).forward is torch.nn.Module.forward:
            raise NotImplementedError(
                f"{type(self).__name__} has no forward(): the default predict_step(batch, batch_idx) calls "
                "self(batch); define forward or override predict_step"
            )
        return self(batch)

    def configure_optimizers(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement configure_optimizers()")

    # Lightning's logging calls. trainkit logs what the steps return instead; a pointed error here beats
    # the bare AttributeError a Lightning habit would otherwise meet.
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Not supported: raises ``RuntimeError``. Return a dict from the step instead.

        ``training_step`` may return ``{"loss": loss, "acc": acc}`` (``acc`` is logged as ``train_acc``);
        ``validation_step`` returns ``{"loss": ..., "acc": ...}`` (reported as ``val_loss``, ``val_acc``).
        """
        raise RuntimeError(_log_message(f"self.log({name!r}, ...)"))

    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        """Not supported: raises ``RuntimeError``. Return the dict from the step instead."""
        raise RuntimeError(_log_message("self.log_dict(...)"))

    # On a TaskModule the checkpoint hooks take only the checkpoint dict: add (or read) your own keys.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # type: ignore[override]
        """Add task-specific state to ``checkpoint`` (tensors, numbers, strings, lists, tuples, dicts)."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # type: ignore[override]
        """Read back what :meth:`on_save_checkpoint` added."""


_LOSS_ALLOWED = "expected a floating-point scalar tensor (one element) that requires grad"


def training_loss(out: Any) -> torch.Tensor:
    """The loss in what ``training_step`` returned: the tensor itself, or the mapping's ``"loss"`` entry.

    Anything else is trainkit's own error naming ``training_step``, the key, the type or shape, and what is
    allowed: a ``TypeError`` for a value that is no tensor, a ``ValueError`` for a tensor that cannot be a
    loss (several elements, an integer or complex dtype, no grad). Reads metadata only: no host sync.
    """
    if isinstance(out, torch.Tensor):
        loss, what = out, "a loss"
    elif isinstance(out, Mapping):
        if "loss" not in out:
            raise TypeError(
                f"training_step returned a mapping with keys {sorted(map(repr, out))} and no 'loss'; "
                "expected a loss tensor or a mapping with a 'loss' tensor"
            )
        loss, what = out["loss"], "'loss'"
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"training_step returned 'loss' of type {type(loss).__name__}; {_LOSS_ALLOWED} "
                "(a tensor computed from the module's parameters)"
            )
    else:
        raise TypeError(
            f"training_step returned {type(out).__name__}; expected a loss tensor or a mapping with a 'loss' tensor"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"training_step returned {what} of shape {tuple(loss.shape)}; {_LOSS_ALLOWED}: reduce a "
            "per-sample loss, e.g. with .mean()"
        )
    if not loss.is_floating_point():
        raise ValueError(f"training_step returned {what} of dtype {loss.dtype}; {_LOSS_ALLOWED}")
    if not loss.requires_grad:
        raise ValueError(
            f"training_step returned {what} with requires_grad=False (was it detached, made from .item(), "
            f"or computed under torch.no_grad()?); {_LOSS_ALLOWED}"
        )
    return loss


def _log_message(call: str) -> str:
    return (
        f"{call}: trainkit has no self.log; return a dict from training_step/validation_step instead, e.g. "
        'return {"loss": loss, "acc": acc} (training_step entries are logged as train_<name>; '
        "validation_step/test_step entries are averaged into val_<name>/test_<name>)"
    )
