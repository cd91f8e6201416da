"""Where the loop is: counters and the position inside the current pass over the train loader.

``LoopState`` is the one object that knows how far training got and how to get back there. Its
``state_dict`` is the counting half of the checkpoint's ``"trainer"`` entry; restoring it re-opens an
interrupted pass at the same batch, in the same order, without loading the batches already trained on.

A pass is what ``for batch in train_loader`` yields (see :class:`~trainkit.data.PassIterator`): ``len()``
only says when to ask the iterator early whether the pass is over. When that early question brings a
batch instead, a checkpoint taken before the batch is trained holds the RNG state from before it was read,
so a resumed run reads it again with the same random draws (augmentations in the main process).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .data import (
    END_OF_PASS,
    PassIterator,
    exact_length,
    len_hint,
    open_pass,
    sampler_generators,
    set_sampler_epoch,
)
from .rng import get_generator_states, get_rng_state, set_generator_states, set_rng_state

END = END_OF_PASS  # what next_batch returns when the pass is over


class LoopState:
    """Counters (``global_step``: completed optimizer steps; ``epoch``: completed passes) and the data
    position (``batch_in_epoch``: batches fetched in the current pass) over ``train_loader``."""

    def __init__(self, train_loader: Any = None) -> None:
        self.train_loader = train_loader
        self.generators: list[torch.Generator] = (
            sampler_generators(train_loader) if train_loader is not None else []
        )
        self.hint = len_hint(train_loader)  # batches a pass has, by len(): only a hint
        self.exact_batches = exact_length(train_loader)  # ... where torch guarantees it, else None
        self.global_step = 0
        self.epoch = 0
        self.iterator: PassIterator | None = None
        # What a shuffling sampler draws from at the start of the pass: saved so that a resume in the
        # middle of this pass re-creates the same order.
        self.epoch_start_rng: dict[str, Any] | None = None
        self._rng_before_peek: dict[str, Any] | None = None
        self._skipped: torch.Tensor | None = None  # GradScaler-skipped steps, on the device
        self._skipped_before = 0  # ... counted by the run this one resumed
        self._pending_rng: Any = None

    @property
    def batch_in_epoch(self) -> int:
        """Batches of the current pass handed to the loop (0 between passes)."""
        return self.iterator.taken if self.iterator is not None else 0

    def begin_pass(self, on_epoch_start: Callable[[], None]) -> None:
        """``sampler.set_epoch(epoch)``, then the hook, then the pass's random state and its iterator."""
        set_sampler_epoch(self.train_loader, self.epoch)
        on_epoch_start()
        self.epoch_start_rng = {
            "torch": torch.get_rng_state(),
            "generators": get_generator_states(self.generators),
        }
        self.iterator = PassIterator(iter(self.train_loader), self.hint)

    def next_batch(self) -> Any:
        """The next batch of this pass, or ``END`` when the pass is over (``begin_pass`` first)."""
        return self.iterator.next_batch()  # type: ignore[union-attr]

    @property
    def pass_may_end(self) -> bool:
        """``len()`` says the batch just handed out may be the pass's last: free, asks nothing."""
        return self.iterator is not None and self.iterator.expects_end()

    def confirm_pass_end(self) -> bool:
        """Ask the iterator now whether the pass is over, as a ``for`` loop does after its last body."""
        assert self.iterator is not None
        if not self.iterator.pending:
            self._rng_before_peek = get_rng_state()
        return self.iterator.ended()

    def close_pass(self) -> None:
        self.epoch += 1
        self.iterator = None

    def count_skipped(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        """Between ``scaler.step`` and ``scaler.update``: count this step if the scaler skipped it, on the
        device (no host sync)."""
        found = list(scaler._found_inf_per_device(optimizer).values())  # 1.0 per device that saw inf/NaN
        if self._skipped is None:
            self._skipped = torch.zeros_like(found[0])
        if len(found) == 1:
            self._skipped.add_(found[0])  # in place: nothing allocated per step
        else:  # one skipped step, however many devices saw it
            self._skipped.add_(torch.stack([f.to(self._skipped.device) for f in found]).amax(0))

    @property
    def skipped_steps(self) -> int:
        """GradScaler-skipped steps in the run so far (a host sync: log steps and saves only)."""
        return self._skipped_before + (int(self._skipped.item()) if self._skipped is not None else 0)

    def amp_scalars(self, scaler: Any) -> dict[str, float]:
        """What a log step shows of the GradScaler: the loss scale and the skipped steps so far."""
        if scaler is None:
            return {}
        return {
            "train_loss_scale": float(scaler.get_scale()),
            "train_skipped_steps": float(self.skipped_steps),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_start_rng": self.epoch_start_rng if self.batch_in_epoch > 0 else None,
            # At a pass boundary the next pass draws its order from the loader's generators as they are now.
            "generators": get_generator_states(self.generators),
            # A batch read ahead (see the module docstring) is read again after a resume, from this state.
            "rng": self._rng_before_peek
            if self.iterator is not None and self.iterator.pending
            else get_rng_state(),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters now; the data position and RNG streams wait for :meth:`restore_position`,
        so that hooks run between the two (``on_load_checkpoint``) cannot shift the random streams."""
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self._skipped_before, self._skipped = int(state.get("skipped_steps", 0)), None
        self._pending_rng = state

    def restore_position(self) -> None:
        state, self._pending_rng = self._pending_rng, None
        if state is None:
            return
        skip = int(state["batch_in_epoch"])
        if skip > 0:
            self._resume_pass(skip, state["epoch_start_rng"])
        elif state.get("generators") is not None:
            set_generator_states(self.generators, state["generators"])
        set_rng_state(state["rng"])

    def _resume_pass(self, skip: int, start_rng: dict[str, Any] | None) -> None:
        """Re-open the interrupted pass at batch ``skip`` with the order it had: the sampler draws from the
        generator states of the pass's start; the skipped batches' indices are drawn but never loaded."""
        set_sampler_epoch(self.train_loader, self.epoch)
        if start_rng is not None:
            torch.set_rng_state(start_rng["torch"])
            set_generator_states(self.generators, start_rng["generators"])
        self.iterator = PassIterator(open_pass(self.train_loader, skip), self.hint, taken=skip)
        self.epoch_start_rng = start_rng
