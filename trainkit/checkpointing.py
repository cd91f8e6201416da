"""What goes into a checkpoint, where it comes from, and where a resume starts.

A checkpoint is gathered from named pieces, each a ``Stateful`` (``state_dict``/``load_state_dict``)
under a fixed key (the ``KEY_*`` constants of :mod:`trainkit.checkpoint`)::

    "model"        the unwrapped TaskModule          "schedulers"   every LR scheduler, in order
    "ema"          the EMA shadow (or None)          "grad_scaler"  the 16-mixed GradScaler (or None)
    "optimizers"   the optimizer, as a list of one   "trainer"      loop counters, data position, RNG,
    "callbacks"    stateful callbacks by state_key                  history, best, early stop
    "task"         what on_save_checkpoint hooks add

Adding a piece is one entry in :func:`trainer_pieces`. Pieces are restored in
that order, then the ``on_load_checkpoint`` hooks run, then the loop re-opens its data position (which
sets the random streams last). Storage, names and safety are :mod:`trainkit.checkpoint`'s.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from .checkpoint import (
    BEST_NAME,
    FORMAT_KEY,
    FORMAT_VERSION,
    KEY_CALLBACKS,
    KEY_EMA,
    KEY_GRAD_SCALER,
    KEY_MODEL,
    KEY_OPTIMIZERS,
    KEY_SCHEDULERS,
    KEY_TASK,
    KEY_TRAINER,
    AsyncWriter,
    CheckpointError,
    CheckpointReadError,
    CheckpointStorage,
    complete_checkpoints,
    load_checkpoint,
    match_compile_keys,
    regular_name,
    regular_step,
    strip_compile_prefix,
)
from .checkpoint_storage import warn_skipped
from .distributed import DistContext

log = logging.getLogger("trainkit")
_RESUMING = "trainkit: ckpt_path='last': continuing at step %d, resuming from %s"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class StatefulList:
    """Several pieces of one kind (optimizers, schedulers) saved as a list, checked for count on load."""

    def __init__(self, items: Sequence[Any], what: str) -> None:
        self.items, self.what = list(items), what

    def state_dict(self) -> list[Any]:
        return [item.state_dict() for item in self.items]

    def load_state_dict(self, states: list[Any]) -> None:
        if len(states) != len(self.items):
            raise CheckpointError(
                f"checkpoint holds {len(states)} {self.what}(s); configure_optimizers() gave {len(self.items)}"
            )
        for item, state in zip(self.items, states):
            item.load_state_dict(state)


class OptionalPiece:
    """A piece the run may lack (EMA, GradScaler): saved as None without it; on load, ``missing`` says
    what to do when the run has it but the checkpoint does not."""

    def __init__(self, piece: Any, missing: Callable[[], None] | None = None) -> None:
        self.piece, self.missing = piece, missing

    def state_dict(self) -> Any:
        return self.piece.state_dict() if self.piece is not None else None

    def load_state_dict(self, state: Any) -> None:
        if self.piece is None:
            return
        if state:
            self.piece.load_state_dict(state)
        elif self.missing is not None:
            self.missing()


class Merged:
    """One dict entry filled by several pieces, each owning its own keys (the ``"trainer"`` entry)."""

    def __init__(self, *pieces: Any, extra: dict[str, Any] | None = None) -> None:
        self.pieces, self.extra = pieces, extra or {}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for piece in self.pieces:
            state.update(piece.state_dict())
        return {**state, **self.extra}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for piece in self.pieces:
            piece.load_state_dict(state)


class CallbackStates:
    """Stateful callbacks, each under its ``state_key``; one the checkpoint lacks is warned about."""

    def __init__(self, callbacks: Sequence[Any]) -> None:
        self.callbacks = list(callbacks)

    def state_dict(self) -> dict[str, Any]:
        return {cb.state_key: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        saved = saved or {}
        for cb in self.callbacks:
            if cb.state_key in saved:
                cb.load_state_dict(saved[cb.state_key])
            else:
                warnings.warn(f"the checkpoint has no state for callback {cb.state_key!r}", stacklevel=5)


class ModelState:
    """The module's state dict with ``torch.compile``'s ``_orig_mod.`` key components removed, so the file
    loads into the plain module; loading matches them back, whichever side is compiled."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return strip_compile_prefix(self.module.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(match_compile_keys(self.module, state))


class EMAState:
    """The EMA's state, its averaged module's keys treated as :class:`ModelState` treats the model's."""

    def __init__(self, ema: Any) -> None:
        self.ema = ema

    def state_dict(self) -> dict[str, Any]:
        state = self.ema.state_dict()
        return {**state, "state_dict": strip_compile_prefix(state["state_dict"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict({**state, "state_dict": match_compile_keys(self.ema.module, state["state_dict"])})


def _restart_ema(ema: Any) -> None:
    warnings.warn("the checkpoint has no EMA state; the EMA restarts from its weights", stacklevel=6)
    ema.reset()


def trainer_pieces(
    module: Any, ema: Any, optimizer: Any, schedulers: Sequence[Any],
    scaler: Any, loop_state: Any, evaluator: Any, callbacks: Sequence[Any], world_size: int,
) -> dict[str, Stateful]:
    """The named pieces of a Trainer's checkpoint, in restore order: the one place that lists them."""
    return {
        KEY_MODEL: ModelState(module),
        KEY_EMA: OptionalPiece(EMAState(ema) if ema is not None else None, missing=lambda: _restart_ema(ema)),
        KEY_OPTIMIZERS: StatefulList([optimizer], "optimizer"),
        KEY_SCHEDULERS: StatefulList(schedulers, "scheduler"),
        KEY_GRAD_SCALER: OptionalPiece(scaler),
        KEY_TRAINER: Merged(loop_state, evaluator, extra={"world_size": world_size}),
        KEY_CALLBACKS: CallbackStates([cb for cb in callbacks if hasattr(cb, "state_dict")]),
    }  # fmt: skip


def make_checkpointer(config: Any, storage: CheckpointStorage | None, options: dict[str, Any]) -> Checkpointer:
    """Single files written by rank 0, or under ``strategy="fsdp"`` sharded directories every rank writes."""
    if config.distributed and config.strategy == "fsdp":
        from .fsdp import ShardedCheckpointer

        return ShardedCheckpointer(storage, options)
    return Checkpointer(storage, options)


class Checkpointer:
    """Builds, writes, finds and restores checkpoints for one Trainer (rank 0 writes)."""

    def __init__(self, storage: CheckpointStorage | None, storage_options: dict[str, Any]) -> None:
        self.storage = storage
        self.storage_options = storage_options
        self.reset()

    def reset(self) -> None:
        self.pieces: dict[str, Stateful] = {}
        self.dist = DistContext()
        self.writer: AsyncWriter | None = None
        self.on_save: Callable[[dict[str, Any]], None] = lambda checkpoint: None
        self.on_load: Callable[[dict[str, Any]], None] = lambda checkpoint: None
        self.best_path: str | None = None
        self.last_saved_step: int | None = None
        self.last_saved_epoch: int | None = None  # completed passes when that file was written, if known

    def bind(
        self,
        pieces: dict[str, Stateful],
        dist: DistContext,
        async_writes: bool,
        on_save: Callable[[dict[str, Any]], None],
        on_load: Callable[[dict[str, Any]], None],
    ) -> None:
        """The pieces of this fit (see :func:`trainer_pieces`) and the hooks that see every checkpoint;
        then, before any step, :meth:`check_storage`."""
        self.pieces, self.dist, self.on_save, self.on_load = pieces, dist, on_save, on_load
        self.writer = AsyncWriter() if async_writes else None
        self.check_storage()

    def check_storage(self) -> None:
        """Rank 0 makes ``checkpoint_dir`` and writes and deletes a probe in it (see
        :meth:`CheckpointStorage.check_writable`), then removes what killed writes left there (see
        :meth:`remove_leftovers`); under DDP one broadcast gives every rank its verdict, so all ranks raise
        the same ValueError naming ``checkpoint_dir``, none is left waiting, and none writes before the
        leftovers are gone."""
        if self.storage is None:
            return
        problem: str | None = None
        if self.dist.is_main:
            try:
                self.storage.check_writable()
            except ValueError as exc:
                problem = str(exc)
            else:
                self.remove_leftovers()
        if self.dist.enabled:
            verdict = [problem]
            torch.distributed.broadcast_object_list(verdict, src=0)
            problem = verdict[0]
        if problem is not None:
            raise ValueError(problem if self.dist.is_main else f"{problem} (found by rank 0)")

    def remove_leftovers(self) -> list[str]:
        """Delete the hidden temporary files (and sharded directories) that killed writes left in
        ``checkpoint_dir``, trainkit's own names only (:meth:`CheckpointStorage.remove_temporaries`), with
        one WARNING naming them; nothing is logged when there are none. Returns their locations. A failure
        to remove is a warning too: leftovers are never read."""
        assert self.storage is not None
        try:
            removed = self.storage.remove_temporaries()
        except Exception as exc:
            log.warning("trainkit: could not remove the temporary files in %s: %s", self.storage.url, exc)
            return []
        if removed:
            log.warning(
                "trainkit: removed %d temporary file(s) that interrupted checkpoint writes left behind: %s",
                len(removed), ", ".join(removed),
            )  # fmt: skip
        return removed

    def close(self) -> BaseException | None:
        """Wait for an asynchronous write in flight; returns its failure, if any, for fit to raise."""
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except BaseException as exc:
                return exc
        return None

    # -- writing -----------------------------------------------------------------------------------------

    def build(self) -> dict[str, Any]:
        checkpoint: dict[str, Any] = {FORMAT_KEY: FORMAT_VERSION}
        for key, piece in self.pieces.items():
            checkpoint[key] = piece.state_dict()
        checkpoint[KEY_TASK] = {}
        self.on_save(checkpoint)
        return checkpoint

    def save_regular(self, step: int, epoch: int | None = None) -> str | None:
        """The regular checkpoint of ``step``; ``epoch`` (completed passes now) lets :meth:`save_final` see
        a pass that turned out complete after this save."""
        self.last_saved_step, self.last_saved_epoch = step, epoch
        return self._save(regular_name(step))

    def save_final(self, step: int, stop_reason: str | None, save_last: bool, epoch: int | None = None) -> None:
        """When fit stops: a regular checkpoint of ``step`` after a signal (so a requeued job continues),
        or with ``save_last``; never twice for one state. A file of this step written before its pass was
        found complete (a loader whose len() is missing or too large: the end shows at the next fetch, after
        the save) is written again, so the final file holds the closed pass and its evaluation."""
        if stop_reason is None or not (stop_reason == "signal" or save_last) or self.storage is None:
            return
        known = epoch is not None and self.last_saved_epoch is not None
        if step != self.last_saved_step or (known and epoch != self.last_saved_epoch):
            self.save_regular(step, epoch)

    def save_best(self) -> None:
        if self.storage is not None:
            self.best_path = self._save(BEST_NAME)

    def _save(self, name: str) -> str | None:
        """Write a checkpoint from rank 0 (others return at once); returns its location."""
        storage = self.storage
        if storage is None:
            return None
        if not self.dist.is_main:
            return storage.location(name)
        checkpoint = self.build()
        if self.writer is not None:
            frozen = self.writer.snapshot(checkpoint)  # host copies now; the write runs while training goes on
            self.writer.submit(lambda: storage.write(name, frozen))
            return storage.location(name)
        return storage.write(name, checkpoint)

    # -- resuming ----------------------------------------------------------------------------------------

    def resume(self, ckpt_path: str | os.PathLike[str] | None) -> bool:
        """Restore from ``ckpt_path`` (see :meth:`resolve`); True when a checkpoint was restored. Without
        ``ckpt_path``, warns once when ``checkpoint_dir`` already holds checkpoints this fit would mix with."""
        if ckpt_path is None:
            self._warn_if_occupied()
            return False
        checkpoint = self.resolve(ckpt_path)
        if checkpoint is not None:
            self.restore(checkpoint)
        return checkpoint is not None

    def _warn_if_occupied(self) -> None:
        storage = self.storage
        if storage is None or not self.dist.is_main:
            return
        found = [regular_name(step) for step in storage.regular_steps()]
        if len(found) > 2:
            found = [found[0], "...", found[-1]]
        if storage.exists(BEST_NAME):
            found.append(BEST_NAME)
        if found:
            warnings.warn(
                f"checkpoint_dir {storage.url!r} already holds checkpoints ({', '.join(found)}) and fit was "
                "given no ckpt_path: this run starts fresh and writes beside them (a file of the same step is "
                "replaced, best.ckpt too). Pass ckpt_path='last' to continue that run, or use another "
                "checkpoint_dir.",
                UserWarning,
                stacklevel=4,  # the user's fit() call
            )

    def resolve(self, ckpt_path: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The checkpoint dict to resume from: ``ckpt_path`` itself, or for ``"last"`` the newest complete
        one of the regular files and best.ckpt in ``checkpoint_dir`` (see :func:`complete_checkpoints`);
        damaged candidates are skipped with a warning naming them. None, with a log line, when there is
        no candidate; a CheckpointError when every candidate is damaged."""
        if ckpt_path != "last":
            return load_checkpoint(ckpt_path, storage_options=self.storage_options)
        storage = self.storage
        assert storage is not None
        # complete_checkpoints probes each candidate (zip directory and pickle record) and warns about a
        # damaged one; a candidate that passes the probe but fails the full read is warned about here.
        for name, step in complete_checkpoints(storage):
            try:
                checkpoint = storage.read(name)
            except CheckpointReadError:
                raise  # the store failed, the file may be fine: never fall back to an older one for that
            except CheckpointError as exc:
                warn_skipped(exc, stacklevel=3)
                continue
            # WARNING, so that it shows without any logging set up (Python's last-resort handler prints
            # it): a user who resumed another run by mistake sees which file and step it was.
            log.warning(_RESUMING, step, storage.location(name))
            return checkpoint
        candidates = [n for n in storage.names() if n == BEST_NAME or regular_step(n) is not None]
        if candidates:  # every one is damaged: starting fresh would silently throw the run away
            raise CheckpointError(
                f"ckpt_path='last' found no complete checkpoint in {storage.url!r}: {candidates} are all "
                "damaged (see the warnings); pass ckpt_path=<file> or move them aside to start fresh"
            )
        log.warning("trainkit: ckpt_path='last' found no checkpoint in %s; starting fresh", storage.url)
        return None

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Load every piece in order, then the ``on_load_checkpoint`` hooks."""
        for key, piece in self.pieces.items():
            piece.load_state_dict(checkpoint.get(key) if key == KEY_CALLBACKS else checkpoint[key])
        state = checkpoint["trainer"]
        if self.storage is not None and state["best"]["metric"] is not None and self.storage.exists(BEST_NAME):
            self.best_path = self.storage.location(BEST_NAME)
        self.on_load(checkpoint)
        self.last_saved_step, self.last_saved_epoch = int(state["global_step"]), int(state["epoch"])
