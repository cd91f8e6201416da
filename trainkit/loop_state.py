"""Where the loop is: counters and the position inside the current pass over the train loader.

``LoopState`` is the one object that knows how far training got and how to get back there. Its
``state_dict`` is the counting half of the checkpoint's ``"trainer"`` entry; restoring it re-opens an
interrupted pass at the same batch, in the same order, without loading the batches already trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from .data import sampler_generators, set_sampler_epoch, skip_batches
from .rng import get_generator_states, get_rng_state, set_generator_states, set_rng_state

END = object()  # what next_batch returns when the pass is over


class LoopState:
    """Counters (``global_step``: completed optimizer steps; ``epoch``: completed passes) and the data
    position (``batch_in_epoch``: batches fetched in the current pass) over ``train_loader``."""

    def __init__(self, train_loader: Any = None) -> None:
        self.train_loader = train_loader
        self.generators: list[torch.Generator] = sampler_generators(train_loader) if train_loader is not None else []
        try:
            self.num_batches: int | None = len(train_loader)
        except TypeError:
            self.num_batches = None
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.iterator: Iterator[Any] | None = None
        # What a shuffling sampler draws from at the start of the pass: saved so that a resume in the
        # middle of this pass re-creates the same order.
        self.epoch_start_rng: dict[str, Any] | None = None
        self._pending_rng: Any = None

    def begin_pass(self, on_epoch_start: Callable[[], None]) -> None:
        """``sampler.set_epoch(epoch)``, then the hook, then the pass's random state and its iterator."""
        set_sampler_epoch(self.train_loader, self.epoch)
        on_epoch_start()
        self.epoch_start_rng = {"torch": torch.get_rng_state(), "generators": get_generator_states(self.generators)}
        self.batch_in_epoch = 0
        self.iterator = iter(self.train_loader)

    def next_batch(self) -> Any:
        """The next batch of this pass, or ``END`` when the pass is over (``begin_pass`` first)."""
        batch = next(self.iterator, END)  # type: ignore[arg-type]
        if batch is not END:
            self.batch_in_epoch += 1
        return batch

    def close_pass(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.iterator = None

    @property
    def pass_known_done(self) -> bool:
        """The batch just fetched is the pass's last one, as far as the loader's length tells ahead."""
        return self.num_batches is not None and self.batch_in_epoch >= self.num_batches

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_start_rng": self.epoch_start_rng if self.batch_in_epoch > 0 else None,
            # At a pass boundary the next pass draws its order from the loader's generators as they are now.
            "generators": get_generator_states(self.generators),
            "rng": get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters now; the data position and RNG streams wait for :meth:`restore_position`,
        so that hooks run between the two (``on_load_checkpoint``) cannot shift the random streams."""
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
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
        loader, skipper = skip_batches(self.train_loader, skip)
        self.iterator = iter(loader)
        if skipper is not None:
            skipper.prime()
        else:  # an iterable dataset has no indices to skip: read and drop
            for _ in range(skip):
                next(self.iterator, None)
        self.batch_in_epoch = skip
        self.epoch_start_rng = start_rng

