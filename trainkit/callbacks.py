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
