"""The Trainer: the one training loop, and the public face of everything around it.

The whole loop, as :meth:`Trainer.fit` runs it::

    setup: device, process group, optimizers, EMA, restore ckpt_path (weights, counters, RNG, data position)
    while no stop reason:
        at the start of a pass: sampler.set_epoch(epoch); on_epoch_start; iterator = iter(train_loader)
        batch = next(iterator)                      # exhausted -> the pass ends
        on_batch_start; loss = training_step(batch) (through DDP's forward); backward
        every accumulate_grad_batches batches (or at the end of a pass):
            unscale -> clip -> optimizer.step -> scheduler.step -> ema.update -> zero_grad; global_step += 1
            on_batch_end; every log_every_n_steps: log train loss and lr
            if the pass is complete: epoch += 1, epoch-interval schedulers step
            step mode: global_step % eval_interval == 0 | epoch mode: pass complete and epoch % eval_interval == 0
                -> evaluate (val, test; base and EMA) -> plateau schedulers -> best check -> early stop -> best file
            if the pass is complete: on_epoch_end
            global_step % save_interval == 0 -> regular checkpoint
            stop? early stop, signal, trainer.should_stop (agreed across ranks), max_steps, max_epochs

Who owns what: :mod:`~trainkit.loop_state` (counters, data position), :mod:`~trainkit.evaluator`
(evaluations, best, early stop), :mod:`~trainkit.checkpointing` (checkpoint contents, "last"),
:mod:`~trainkit.parallel` (one process or DDP), :mod:`~trainkit.services` (logging, progress, profiler,
signals). This file holds the public Trainer and the loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

import torch

from . import distributed as dist_utils
from .callbacks import Callback, Hooks, check_callbacks
from .checkpoint import CheckpointStorage
from .checkpointing import make_checkpointer, trainer_pieces
from .config import TrainerConfig, check_eval_args, check_fit_args, reject_unknown
from .data import move_to_device
from .distributed import DistContext
from .ema import EMA
from .evaluation import run_predict_loop
from .evaluator import EvalRecord, Evaluator, FitResult, MetricNotFoundError
from .loop_state import END, LoopState
from .module import TaskModule, training_loss
from .optim import parse_optimizers
from .parallel import SingleProcess, eval_share, make_parallel
from .services import SUMMARY_WRITER_DOC, FitServices

__all__ = ["Trainer", "FitResult", "EvalRecord", "MetricNotFoundError"]  # the last three live in evaluator


_NULL = contextlib.nullcontext()  # reusable: no context object is built per step


class Trainer:
    """Runs a :class:`~trainkit.TaskModule`'s training. Every parameter is keyword-only; see the README for
    the full table with defaults.

    Example::

        trainer = tk.Trainer(run_mode="step", max_steps=1000, eval_interval=100, use_ema=True,
                             checkpoint_dir="runs/run1/checkpoints", log_dir="runs/run1")
        result = trainer.fit(Classifier(), train_loader, val_loader)
        print(result.best_metric, result.best_checkpoint)
    """

    def __init__(
        self,
        *,
        run_mode: str = "epoch", eval_interval: int = 1, max_epochs: int | None = None,
        max_steps: int | None = None, save_interval: int | None = None,
        early_stop: Mapping[str, Any] | None = None, monitor: Mapping[str, Any] | None = None,
        clip_grad: float | None = None, accumulate_grad_batches: int = 1, precision: str | int = "32",
        use_ema: bool = False, ema_decay: float = 0.999, ema_warmup: bool = False,
        distributed: bool = False, rank: int | None = None, world_size: int | None = None,
        backend: str | None = None, init_method: str | None = None, find_unused_parameters: bool = False,
        strategy: str = "ddp", fsdp_units: Sequence[type[torch.nn.Module]] | None = None,
        device: str | torch.device | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = "checkpoints", save_last: bool = False,
        storage_options: Mapping[str, Any] | None = None, async_checkpoint: bool = False,
        log_dir: str | os.PathLike[str] | None = "runs", log_every_n_steps: int = 50, progress_bar: bool = True,
        use_profiler: bool = False, profiler_kwargs: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callback] = (), handle_signals: bool = True, **unknown: NoReturn,
    ) -> None:
        reject_unknown("Trainer()", unknown, Trainer.__init__)  # a pointed TypeError for Lightning's names
        # Every argument but the live objects is a setting: checked once, in one place.
        settings = {k: v for k, v in locals().items() if k not in ("self", "callbacks", "unknown")}
        self.config = TrainerConfig(**settings)
        self.callbacks = check_callbacks(callbacks)
        dist_utils.check_launch(distributed, rank, world_size, init_method)
        options = dict(storage_options or {})
        self.storage = CheckpointStorage(checkpoint_dir, options) if checkpoint_dir is not None else None
        cfg = self.config
        self.device = cfg.torch_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = DistContext()
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedulers: list[Any] = []
        self._ema: EMA | None = None
        self._module: TaskModule | None = None  # set by fit
        self._autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(cfg.precision)
        self._evaluator = Evaluator(self.config)
        self._checkpointer = make_checkpointer(self.config, self.storage, options)
        self._reset_state()

    # -- public state ------------------------------------------------------------------------------------

    ema_module = property(
        lambda self: self._ema.module if self._ema is not None else None,
        doc="The averaged TaskModule (evaluate it, or save it for inference), or None without ``use_ema``.",
    )
    is_global_zero = property(lambda self: self.dist.rank == 0)
    rank = property(lambda self: self.dist.rank)
    world_size = property(lambda self: self.dist.world_size)

    global_step = property(lambda self: self._loop_state.global_step, doc="Completed optimizer steps.")
    current_epoch = property(lambda self: self._loop_state.epoch, doc="Completed passes over the train loader.")
    history = property(lambda self: self._evaluator.history, doc="One EvalRecord per evaluation.")
    latest_metrics = property(lambda self: self._evaluator.latest_metrics, doc="The last evaluation's metrics.")
    best_metric = property(lambda self: self._evaluator.best_metric)
    best_step = property(lambda self: self._evaluator.best_step)
    best_epoch = property(lambda self: self._evaluator.best_epoch)
    best_checkpoint_path = property(lambda self: self._checkpointer.best_path, doc="Location of best.ckpt.")
    summary_writer = property(lambda self: self._services.summary_writer, doc=SUMMARY_WRITER_DOC)

    # -- fit ---------------------------------------------------------------------------------------------

    def fit(
        self,
        module: TaskModule,
        train_loader: Iterable[Any] | None = None,  # required; None only so that Lightning's names get a hint
        val_loader: Iterable[Any] | None = None,
        *,
        test_loader: Iterable[Any] | None = None,
        ckpt_path: str | os.PathLike[str] | None = None, **unknown: NoReturn,
    ) -> FitResult:
        """Train ``module``; resume from ``ckpt_path`` (a path, URL, or ``"last"``) when given."""
        check_fit_args(self.config, module, train_loader, val_loader, test_loader, ckpt_path, unknown)
        self._reset_state()
        self._hooks = hooks = Hooks(self, module, self.callbacks)
        failed = False
        try:
            self._setup(module, train_loader, val_loader, test_loader)
            if self._checkpointer.resume(ckpt_path):  # without ckpt_path: warns if checkpoint_dir has files
                self._loop_state.restore_position()
            self._start_services()
            hooks.emit("on_fit_start")
            self._loop()
        except BaseException as exc:
            failed = True
            hooks.exception(exc)
            raise
        finally:
            background_error = self._teardown(failed)
        if background_error is not None:  # the last asynchronous write failed
            hooks.exception(background_error)
            raise background_error
        hooks.emit("on_fit_end")
        return self._evaluator.result(self.global_step, self.current_epoch, self.best_checkpoint_path,
                                      self.stop_reason or "max_steps")

    def validate(self, module: TaskModule, loader: Iterable[Any]) -> dict[str, float]:
        """``validation_step`` over a loader, or a mapping of named sets, for ``module`` (and its EMA)."""
        return self._standalone_eval(module, loader, "val")

    def test(self, module: TaskModule, loader: Iterable[Any]) -> dict[str, float]:
        """``test_step`` over a loader, or a mapping of named sets, for ``module`` (and its EMA)."""
        return self._standalone_eval(module, loader, "test")

    def predict(self, module: TaskModule, loader: Iterable[Any]) -> list[Any]:
        """``module.predict_step`` outputs, one per batch in loader order, on the CPU (see run_predict_loop)."""
        check_eval_args(module, loader, sets=False)
        return run_predict_loop(module.to(self.device), loader, device=self.device, autocast=self._autocast)

    # -- setup and teardown ------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        """The state one fit builds up: public (read by users and hooks), then private."""
        self.should_stop = False
        self.stop_reason: str | None = None
        self._loop_state = LoopState()
        self._evaluator.reset()
        self._checkpointer.reset()
        self._services = FitServices()
        self._parallel: SingleProcess = make_parallel(self.config)
        self._last_out: Any = None
        self._last_loss: torch.Tensor | None = None

    def _setup(self, module: TaskModule, train: Any, val: Any, test: Any) -> None:
        cfg, parallel = self.config, self._parallel
        self.dist, self.device = parallel.setup(self.device)
        module._attach(self)
        parallel.place(module, self.device)  # moves it (FSDP: shards it, and the EMA's copy, onto the device)
        module.train()
        self._module = module
        setup = parse_optimizers(module.configure_optimizers())
        self.optimizer = setup.optimizer
        self.schedulers = [s.scheduler for s in setup.schedulers]
        self._step_schedulers, self._epoch_schedulers = setup.stepped_every("step"), setup.stepped_every("epoch")
        self._clip_params = list(module.parameters())
        self._clip_foreach = parallel.clip_foreach(self._clip_params)  # decided once, not every step
        self._scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "16-mixed" else None
        train, val, test = parallel.prepare_loaders(train, val, test)
        self._loop_state = LoopState(train)
        self._move = self.device.type != "cpu"
        self._forward = parallel.wrap(module, self._local_flags, self.device)
        # After the wrap: DDP has broadcast rank 0's weights, so every rank's EMA starts from the same copy.
        self._ema = EMA(module, cfg.ema_decay, cfg.ema_warmup, shadow=parallel.ema_shadow) if cfg.use_ema else None
        ev = self._evaluator
        ev.device, ev.dist, ev.autocast, ev.services = self.device, self.dist, self._autocast, self._services
        ev.emit, ev.plateau_schedulers = self._hooks.emit, setup.on_plateau
        ev.models, ev.loaders = ev.models_of(module, self._ema), ev.loaders_of(val, test)
        self._checkpointer.bind(
            trainer_pieces(
                module, self._ema, self.optimizer, self.schedulers, self._scaler,
                self._loop_state, ev, self.callbacks, self.dist.world_size,
            ),
            self.dist, cfg.async_checkpoint, self._hooks.save_checkpoint, self._hooks.load_checkpoint,
        )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)

    def _start_services(self) -> None:
        self._services.start(self.config, self.dist.is_main, self._loop_state.exact_batches, self.global_step)
        self._batch_start_hooks = self._hooks.overridden("on_batch_start")  # no-ops are skipped per batch
        self._batch_end_hooks = self._hooks.overridden("on_batch_end")
        # Under DDP, a stop requested after a step's gradients went out takes a blocking vote before the
        # next step. on_batch_end runs there every step; ranks may hold different callbacks, so they agree.
        vote = self._parallel.vote
        self._late_hooks = vote.any_rank(bool(self._batch_end_hooks)) if vote else bool(self._batch_end_hooks)

    def _local_flags(self) -> tuple[bool, bool]:  # this rank's stop requests, as the DDP stop vote reads them
        return bool(self.should_stop), self._services.signal is not None

    def _teardown(self, failed: bool) -> BaseException | None:
        """Release everything fit acquired; returns a background write's failure for fit to raise."""
        self._loop_state.iterator = None  # lets a multi-worker loader shut its workers down now
        self._services.stop_listening()
        error = self._checkpointer.close()  # waits for an asynchronous write in flight
        self._services.close(finished=not failed)
        self._parallel.close(clean=not failed and error is None, failed=failed)
        return None if failed else error

    # -- the loop ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        module, optimizer, state, parallel = self._module, self.optimizer, self._loop_state, self._parallel
        assert module is not None and optimizer is not None
        forward, vote, accumulate = self._forward, parallel.vote, self.config.accumulate_grad_batches
        autocast = self._autocast_dtype
        micro = 0
        self._check_stop()
        while self.stop_reason is None:
            if state.iterator is None:
                state.begin_pass(lambda: self._hooks.emit("on_epoch_start"))
            batch = state.next_batch()
            if batch is END:
                if state.batch_in_epoch == 0:
                    raise ValueError("train_loader yielded no batches; expected at least one batch per pass")
                if micro:  # a partial accumulation at the end of a pass still makes a step
                    micro = 0
                    parallel.finish_accumulation()
                    self._optimizer_step()
                    self._after_step(pass_done=True)
                else:
                    self._close_pass()
                    self._after_pass_eval_and_hooks()
                    self._write_best()
                    self._check_stop()
                continue
            batch_idx = state.batch_in_epoch - 1
            if self._move:
                batch = move_to_device(batch, self.device)
            for hook in self._batch_start_hooks:
                hook(self, module, batch, batch_idx)
            micro += 1
            may_end = state.pass_may_end  # len() says this batch may end the pass: sync its gradients
            with _NULL if micro == accumulate or may_end else parallel.no_sync():
                if autocast is None:
                    out = forward(batch, batch_idx)
                else:
                    with torch.autocast(self.device.type, dtype=autocast):
                        out = forward(batch, batch_idx)
                if vote is not None and (micro == accumulate or may_end):
                    vote.send()  # this rank's stop flags, as training_step left them, go out with the step
                loss = training_loss(out)  # checked (metadata only): a scalar floating tensor with grad
                if accumulate > 1:
                    loss = loss / accumulate
                    self._last_loss = loss.detach() if micro == 1 else self._last_loss + loss.detach()  # type: ignore[operator]
                else:
                    self._last_loss = loss
                (self._scaler.scale(loss) if self._scaler is not None else loss).backward()
            self._last_out = out
            pass_done = may_end and state.confirm_pass_end()  # asks the iterator now, as a for loop would
            boundary = micro == accumulate or pass_done
            if boundary:
                micro = 0
                self._optimizer_step()
            for hook in self._batch_end_hooks:
                hook(self, module, out, batch, batch_idx)
            if boundary:
                self._after_step(pass_done)

    def _optimizer_step(self) -> None:
        """backward is done; now unscale -> clip -> step -> schedulers -> EMA -> zero_grad, in that order."""
        optimizer, scaler, clip = self.optimizer, self._scaler, self.config.clip_grad
        assert optimizer is not None
        if scaler is not None and clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self._clip_params, clip, foreach=self._clip_foreach)
        if scaler is not None:
            scaler.step(optimizer)  # skips the step when a gradient is not finite; it still counts as one
            self._loop_state.count_skipped(scaler, optimizer)  # on the device, logged at log steps
            scaler.update()
        else:
            optimizer.step()
        for scheduler in self._step_schedulers:
            scheduler.step()
        if self._ema is not None:
            self._ema.update()
        optimizer.zero_grad(set_to_none=True)
        self._loop_state.global_step += 1

    def _after_step(self, pass_done: bool) -> None:
        cfg, step = self.config, self._loop_state.global_step
        if pass_done:
            self._close_pass()
        evaluated = cfg.run_mode == "step" and step % cfg.eval_interval == 0
        evaluated = evaluated and self._evaluator.evaluate_and_decide(step, self.current_epoch)
        if pass_done:
            self._after_pass_eval_and_hooks()
        self._write_best()
        if self._services.log_enabled:  # after evaluating, so the progress line shows this step's metrics
            self._services.step_done(step, self.current_epoch, self._last_loss, self._last_out, self.optimizer,
                                     lambda: self._loop_state.amp_scalars(self._scaler))
        saved = cfg.save_interval is not None and step % cfg.save_interval == 0
        if saved:
            self._checkpointer.save_regular(step, self.current_epoch)
        # Only a step after which no user code ran (no hook, evaluation or save) may skip the blocking vote.
        self._check_stop(late_code=self._late_hooks or pass_done or evaluated or saved)
        if self._services.profiler is not None:
            self._services.profiler.step()  # the profiled step spans everything done after this step too

    def _close_pass(self) -> None:
        self._loop_state.close_pass()
        for scheduler in self._epoch_schedulers:
            scheduler.step()

    def _after_pass_eval_and_hooks(self) -> None:  # epoch mode evaluates here, then on_epoch_end
        if self.config.run_mode == "epoch" and self.current_epoch % self.config.eval_interval == 0:
            self._evaluator.evaluate_and_decide(self.global_step, self.current_epoch)
        self._hooks.emit("on_epoch_end")

    def _check_stop(self, late_code: bool = True) -> None:
        """Decide whether fit ends here. ``late_code``: user code (a hook, an evaluation, a save) ran after
        this step's ``training_step``, or this is not a step's end at all."""
        cfg, vote, step = self.config, self._parallel.vote, self._loop_state.global_step
        # These follow from counters and reduced metrics, so every rank reaches the same answer alone.
        early = self._evaluator.early_reason
        max_steps = cfg.max_steps is not None and step >= cfg.max_steps
        at_limit = max_steps or (cfg.max_epochs is not None and self._loop_state.epoch >= cfg.max_epochs)
        # Under DDP the ranks agree on requests only one of them may have seen (see StopVote.agree).
        requested, signalled = vote.agree(late_code or bool(early) or at_limit) if vote else self._local_flags()
        if early:
            self.stop_reason = early
        elif signalled:
            self.stop_reason = "signal"
        elif requested:
            self.stop_reason = "should_stop"
        elif at_limit:
            self.stop_reason = "max_steps" if max_steps else "max_epochs"
        if self.stop_reason is not None:  # after a signal (a requeued job continues), or with save_last
            self._checkpointer.save_final(step, self.stop_reason, cfg.save_last, self.current_epoch)
        if requested:
            self.should_stop = True  # under DDP another rank may have asked

    # -- evaluation and checkpoints ----------------------------------------------------------------------

    def _write_best(self) -> None:  # after the step's evaluation and epoch-end hooks: a regular file's state
        if self._evaluator.best_pending:
            self._evaluator.best_pending = False
            self._checkpointer.save_best()

    # -- small helpers -----------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return _NULL
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _standalone_eval(self, module: TaskModule, loader: Iterable[Any], stage: str) -> dict[str, float]:
        check_eval_args(module, loader)
        if self.config.distributed:  # evaluating inside a process group set up by the user or a fit
            self.dist, loader = eval_share(loader)
        module.to(self.device)
        ev = self._evaluator
        ev.device, ev.dist, ev.autocast = self.device, self.dist, self._autocast
        ev.emit = Hooks(self, module, self.callbacks).emit
        return ev.evaluate(ev.models_of(module, self._ema), [(stage, loader)])
