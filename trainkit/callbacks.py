"""Listener hooks.

Every hook is called as ``hook(trainer, module, ...)``: first on the TaskModule (which inherits these
no-ops through :class:`~trainkit.module.TaskModule`), then on each callback in the order given to the
Trainer. Hooks are plain methods called by name from the loop, so a misspelled override is simply never
called; subclass :class:`Callback` and let your type checker catch it.

A callback that defines ``state_dict``/``load_state_dict`` is saved in checkpoints under
``checkpoint["callbacks"][callback.state_key]``; the key defaults to the class's qualified name, so two
callbacks of one class need distinct ``state_key`` values.

Example::

    class PrintLoss(tk.Callback):
        def on_eval_end(self, trainer, module, metrics):
            print(trainer.global_step, metrics["val_loss"])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .module import TaskModule
    from .trainer import Trainer


class Callback:
    """Base class of listener objects; every hook is a no-op."""

    @property
    def state_key(self) -> str:
        """Stable key of this callback's state inside ``checkpoint["callbacks"]``."""
        return type(self).__qualname__

    def on_fit_start(self, trainer: Trainer, module: TaskModule) -> None: ...

    def on_fit_end(self, trainer: Trainer, module: TaskModule) -> None: ...

    def on_epoch_start(self, trainer: Trainer, module: TaskModule) -> None: ...

    def on_epoch_end(self, trainer: Trainer, module: TaskModule) -> None: ...

    def on_batch_start(self, trainer: Trainer, module: TaskModule, batch: Any, batch_idx: int) -> None: ...

    def on_batch_end(
        self, trainer: Trainer, module: TaskModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None: ...

    def on_eval_start(self, trainer: Trainer, module: TaskModule) -> None: ...

    def on_eval_end(self, trainer: Trainer, module: TaskModule, metrics: dict[str, float]) -> None: ...

    def on_save_checkpoint(
        self, trainer: Trainer, module: TaskModule, checkpoint: dict[str, Any]
    ) -> None: ...

    def on_load_checkpoint(
        self, trainer: Trainer, module: TaskModule, checkpoint: dict[str, Any]
    ) -> None: ...

    def on_early_stop(self, trainer: Trainer, module: TaskModule) -> None: ...

    def on_exception(self, trainer: Trainer, module: TaskModule, exception: BaseException) -> None: ...


def check_callbacks(callbacks: Any) -> list[Callback]:
    """The Trainer's ``callbacks`` argument as a list; TypeError/ValueError for anything else."""
    from .module import TaskModule  # here: module.py imports this file

    if isinstance(callbacks, Callback) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks={callbacks!r} is not valid; expected a list of trainkit.Callback objects")
    checked: list[Callback] = list(callbacks)
    for cb in checked:
        if not isinstance(cb, Callback) or isinstance(cb, TaskModule):
            raise TypeError(f"callbacks contains {cb!r}; expected trainkit.Callback instances")
    keys = [cb.state_key for cb in checked if hasattr(cb, "state_dict")]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(
            f"callbacks: several stateful callbacks share state_key {duplicates}; give each a distinct state_key"
        )
    return checked


class Hooks:
    """Calls a hook on the TaskModule, then on each callback in order: ``hook(trainer, module, ...)``."""

    def __init__(self, trainer: Trainer, module: TaskModule | None, callbacks: list[Callback]) -> None:
        self.trainer, self.module, self.callbacks = trainer, module, callbacks

    def emit(self, name: str, *args: Any) -> None:
        getattr(self.module, name)(self.trainer, self.module, *args)
        for cb in self.callbacks:
            getattr(cb, name)(self.trainer, self.module, *args)

    def overridden(self, name: str) -> list[Any]:
        """The bound hooks that are not the base class's no-op (skipped on the per-batch path)."""
        from .module import TaskModule

        found = []
        for obj in (self.module, *self.callbacks):
            base = TaskModule if isinstance(obj, TaskModule) else Callback
            if getattr(type(obj), name) is not getattr(base, name):
                found.append(getattr(obj, name))
        return found

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``on_save_checkpoint``: on the TaskModule with the checkpoint alone, on callbacks as usual."""
        self.module.on_save_checkpoint(checkpoint)  # type: ignore[union-attr]
        for cb in self.callbacks:
            cb.on_save_checkpoint(self.trainer, self.module, checkpoint)  # type: ignore[arg-type]

    def load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.module.on_load_checkpoint(checkpoint)  # type: ignore[union-attr]
        for cb in self.callbacks:
            cb.on_load_checkpoint(self.trainer, self.module, checkpoint)  # type: ignore[arg-type]

    def exception(self, exc: BaseException) -> None:
        """``on_exception`` everywhere; a hook's own failure must not hide the original error."""
        for obj in (self.module, *self.callbacks):
            try:
                obj.on_exception(self.trainer, self.module, exc)  # type: ignore[union-attr,arg-type]
            except Exception:
                pass
