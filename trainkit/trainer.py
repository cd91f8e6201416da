"""The Trainer: the one training loop, and everything around it.

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
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import distributed as dist_utils
from .callbacks import Callback
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
    CheckpointStorage,
    load_checkpoint,
    regular_name,
)
from .config import TrainerConfig
from .data import (
    move_to_device,
    sampler_generators,
    set_sampler_epoch,
    shard_eval_loader,
    shard_train_loader,
    skip_batches,
)
from .distributed import DistContext, GradientVote, StopVote
from .early_stopping import EarlyStopChecker, MetricTracker
from .ema import EMA
from .evaluation import run_eval_loop
from .loggers import TAG_EPOCH, TAG_TRAIN_LOSS, Progress, RunLogger, lr_tags
from .module import TaskModule
from .optim import parse_optimizers
from .profiling import StepProfiler
from .rng import get_generator_states, get_rng_state, set_generator_states, set_rng_state

log = logging.getLogger("trainkit")

__all__ = ["Trainer", "FitResult", "EvalRecord", "MetricNotFoundError"]

_END = object()
_NO_SYNC = contextlib.nullcontext()  # reusable: no context object is built on steps that sync gradients


class MetricNotFoundError(ValueError, KeyError):
    """A metric named by ``early_stop``, ``monitor`` or a plateau scheduler was not produced."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class EvalRecord(dict):
    """One evaluation: ``record["step"]``, ``record["epoch"]``, ``record["metrics"]`` (also as attributes)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns."""

    global_step: int
    epoch: int
    best_metric: float | None
    best_step: int | None
    best_epoch: int | None
    best_checkpoint: str | None
    stopped_early: bool
    stop_reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[EvalRecord] = field(default_factory=list)


class _TrainingStepForward(torch.nn.Module):
    """Routes DDP's ``forward`` to ``training_step``, so DDP sees the step's outputs and syncs gradients;
    with a ``GradientVote``, the stop flags ride along as one more gradient."""

    def __init__(self, task: TaskModule, vote: GradientVote | None) -> None:
        super().__init__()
        self.task = task
        self.vote = vote
        if vote is not None:
            self.stop_flags = vote.carrier

    def forward(self, batch: Any, batch_idx: int) -> Any:
        out = self.task.training_step(batch, batch_idx)
        return out if self.vote is None else self.vote.attach(out)


def _overridden(obj: Any, name: str) -> bool:
    base = Callback if not isinstance(obj, TaskModule) else TaskModule
    return getattr(type(obj), name) is not getattr(base, name)


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
        run_mode: str = "epoch",
        eval_interval: int = 1,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        save_interval: int | None = None,
        early_stop: Mapping[str, Any] | None = None,
        clip_grad: float | None = None,
        use_ema: bool = False,
        ema_decay: float = 0.999,
        ema_warmup: bool = False,
        distributed: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        backend: str | None = None,
        init_method: str | None = None,
        find_unused_parameters: bool = False,
        use_profiler: bool = False,
        profiler_kwargs: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callback] = (),
        checkpoint_dir: str | os.PathLike[str] | None = "checkpoints",
        storage_options: Mapping[str, Any] | None = None,
        async_checkpoint: bool = False,
        log_dir: str | os.PathLike[str] | None = "runs",
        log_every_n_steps: int = 50,
        progress_bar: bool = True,
        monitor: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        precision: str | int = "32",
        accumulate_grad_batches: int = 1,
        handle_signals: bool = True,
    ) -> None:
        self.config = TrainerConfig(
            run_mode=run_mode, eval_interval=eval_interval, max_epochs=max_epochs, max_steps=max_steps,
            save_interval=save_interval, early_stop=early_stop, clip_grad=clip_grad, use_ema=use_ema,
            ema_decay=ema_decay, ema_warmup=ema_warmup, distributed=distributed, rank=rank,
            world_size=world_size, backend=backend, init_method=init_method,
            find_unused_parameters=find_unused_parameters, use_profiler=use_profiler,
            profiler_kwargs=profiler_kwargs, checkpoint_dir=checkpoint_dir, storage_options=storage_options,
            async_checkpoint=async_checkpoint, log_dir=log_dir, log_every_n_steps=log_every_n_steps,
            progress_bar=progress_bar, monitor=monitor, device=device, precision=precision,
            accumulate_grad_batches=accumulate_grad_batches, handle_signals=handle_signals,
        )  # fmt: skip
        if isinstance(callbacks, Callback) or not isinstance(callbacks, Iterable):
            raise TypeError(
                f"callbacks={callbacks!r} is not valid; expected a list of trainkit.Callback objects"
            )
        self.callbacks: list[Callback] = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback) or isinstance(cb, TaskModule):
                raise TypeError(f"callbacks contains {cb!r}; expected trainkit.Callback instances")
        self._stateful_callbacks = [cb for cb in self.callbacks if hasattr(cb, "state_dict")]
        keys = [cb.state_key for cb in self._stateful_callbacks]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(
                f"callbacks: several stateful callbacks share state_key {duplicates}; give each a distinct state_key"
            )
        dist_utils.check_launch(distributed, rank, world_size, init_method)
        self.storage = (
            CheckpointStorage(checkpoint_dir, dict(storage_options or {}))
            if checkpoint_dir is not None
            else None
        )
        self.device = self.config.torch_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = DistContext()
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedulers: list[Any] = []
        self._ema: EMA | None = None
        self._module: TaskModule | None = None
        self._autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.config.precision)
        self._reset_state()

    # -- public helpers ----------------------------------------------------------------------------------

    @property
    def ema_module(self) -> TaskModule | None:
        """The averaged TaskModule (evaluate it, or save it for inference), or None without ``use_ema``."""
        return self._ema.module if self._ema is not None else None  # type: ignore[return-value]

    @property
    def is_global_zero(self) -> bool:
        return self.dist.rank == 0

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    # -- fit ---------------------------------------------------------------------------------------------

    def fit(
        self,
        module: TaskModule,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        *,
        test_loader: Iterable[Any] | None = None,
        ckpt_path: str | os.PathLike[str] | None = None,
    ) -> FitResult:
        """Train ``module``; resume from ``ckpt_path`` (a path, URL, or ``"last"``) when given."""
        self._check_fit_args(module, train_loader, val_loader, test_loader, ckpt_path)
        self._reset_state()
        failed = False
        try:
            self._setup(module, train_loader, val_loader, test_loader)
            if ckpt_path is not None:
                self._resume(ckpt_path)
            self._start_services()
            self._emit("on_fit_start")
            self._loop()
        except BaseException as exc:
            failed = True
            self._notify_exception(module, exc)
            raise
        finally:
            background_error = self._teardown(failed)
        if background_error is not None:  # the last asynchronous write failed
            self._notify_exception(module, background_error)
            raise background_error
        self._emit("on_fit_end")
        return self._result()

    def validate(self, module: TaskModule, loader: Iterable[Any]) -> dict[str, float]:
        """Evaluate ``module`` (and the EMA of it, when this trainer holds one) with ``validation_step``."""
        return self._standalone_eval(module, loader, "val")

    def test(self, module: TaskModule, loader: Iterable[Any]) -> dict[str, float]:
        """Evaluate ``module`` (and its EMA, when this trainer holds one) with ``test_step``."""
        return self._standalone_eval(module, loader, "test")

    # -- setup and teardown ------------------------------------------------------------------------------

    def _check_fit_args(self, module: Any, train: Any, val: Any, test: Any, ckpt_path: Any) -> None:
        if not isinstance(module, TaskModule):
            raise TypeError(f"module={type(module).__name__} is not valid; expected a trainkit.TaskModule")
        for name, loader in (("train_loader", train), ("val_loader", val), ("test_loader", test)):
            if loader is None and name != "train_loader":
                continue
            if not isinstance(loader, Iterable):
                raise TypeError(
                    f"{name}={loader!r} is not valid; expected an iterable of batches (a DataLoader)"
                )
        try:
            length = len(train)  # type: ignore[arg-type]
        except TypeError:
            length = None
        if length == 0:
            raise ValueError(
                "train_loader=<empty> is not valid; expected a loader that yields at least one batch"
            )
        if ckpt_path is not None:
            if not isinstance(ckpt_path, (str, os.PathLike)) or not os.fspath(ckpt_path):
                raise TypeError(f"ckpt_path={ckpt_path!r} is not valid; expected a path, URL or 'last'")
            if ckpt_path == "last" and self.storage is None:
                raise ValueError("ckpt_path='last' needs checkpoint_dir; checkpoint_dir=None was given")

    def _reset_state(self) -> None:
        """The state one fit builds up: public (read by users and hooks), then private."""
        self.global_step = 0
        self.current_epoch = 0
        self.history: list[EvalRecord] = []
        self.should_stop = False
        self.best_checkpoint_path: str | None = None
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.best_epoch: int | None = None
        self.latest_metrics: dict[str, float] = {}
        self.stop_reason: str | None = None
        self._batch_in_epoch = 0
        self._iterator: Iterator[Any] | None = None
        self._epoch_start_rng: dict[str, Any] | None = None
        self._signal: int | None = None
        self._early_reason: str | None = None
        self._warned_monitor = False
        self._best_pending = False
        self._last_saved_step: int | None = None
        self._last_out: Any = None
        self._last_loss: torch.Tensor | None = None
        self._writer: AsyncWriter | None = None
        self._profiler: StepProfiler | None = None
        self._progress = Progress(False, None)
        self._logger = RunLogger(None, {})
        self._old_handlers: dict[int, Any] = {}
        self._ddp: Any = None
        self._vote: StopVote | None = None

    def _setup(self, module: TaskModule, train: Any, val: Any, test: Any) -> None:
        cfg = self.config
        if cfg.distributed:
            self.dist, self.device = dist_utils.setup(
                device=cfg.torch_device, backend=cfg.backend, rank=cfg.rank, world_size=cfg.world_size,
                init_method=cfg.init_method,
            )  # fmt: skip
        else:
            self.dist = DistContext()
        module.to(self.device)
        module.train()
        module._attach(self)
        self._module = module
        setup = parse_optimizers(module.configure_optimizers())
        self.optimizer = setup.optimizer
        self._scheduler_configs = setup.schedulers
        self.schedulers = [s.scheduler for s in setup.schedulers]
        self._step_schedulers = [
            s.scheduler for s in setup.schedulers if s.interval == "step" and not s.on_plateau
        ]
        self._epoch_schedulers = [
            s.scheduler for s in setup.schedulers if s.interval == "epoch" and not s.on_plateau
        ]
        self._plateau_schedulers = [s for s in setup.schedulers if s.on_plateau]
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._clip_params = list(module.parameters())
        self._scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "16-mixed" else None
        self._best = MetricTracker(cfg.monitor_rule.mode, cfg.monitor_rule.min_delta)
        rule = cfg.early_stop_rule
        self._stopper = (
            EarlyStopChecker(rule.patience, rule.mode, rule.min_delta, rule.check_finite)
            if rule is not None
            else None
        )
        # Loaders: under DDP each rank reads its own shard of every loader.
        self._train_loader: Any = train
        self._val_loader: Any = val
        self._test_loader: Any = test
        if self.dist.enabled:
            ws, rank = self.dist.world_size, self.dist.rank
            if isinstance(train, torch.utils.data.DataLoader):
                self._train_loader, changed = shard_train_loader(train, ws, rank)
                if not changed and not isinstance(train.sampler, torch.utils.data.DistributedSampler):
                    warnings.warn(
                        "train_loader has a custom sampler, batch sampler or iterable dataset: trainkit cannot "
                        "shard it, so each rank reads what it yields", stacklevel=3,
                    )  # fmt: skip
            for attr in ("_val_loader", "_test_loader"):
                loader = getattr(self, attr)
                if isinstance(loader, torch.utils.data.DataLoader):
                    setattr(self, attr, shard_eval_loader(loader, ws, rank))
        try:
            self._num_batches: int | None = len(self._train_loader)
        except TypeError:
            self._num_batches = None
        self._generators = sampler_generators(self._train_loader)
        self._move = self.device.type != "cpu"
        # DDP wraps a forwarder built from the *unwrapped* module; EMA, checkpoints and evaluation keep
        # using the unwrapped module.
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self._vote = dist_utils.stop_vote(self.dist.world_size, self.device, module, self._local_flags)
            carrier = self._vote if isinstance(self._vote, GradientVote) else None
            self._ddp = DistributedDataParallel(
                _TrainingStepForward(module, carrier),
                device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        # After the wrap: DDP has broadcast rank 0's weights, so every rank's EMA starts from the same copy.
        self._ema = EMA(module, cfg.ema_decay, cfg.ema_warmup) if cfg.use_ema else None
        self._writer = AsyncWriter() if cfg.async_checkpoint else None
        self.optimizer.zero_grad(set_to_none=True)

    def _start_services(self) -> None:
        cfg = self.config
        main = self.dist.is_main
        self._logger = RunLogger(
            os.fspath(cfg.log_dir) if (cfg.log_dir is not None and main) else None, cfg.hparams()
        )
        if self._logger.log_dir is not None:
            _ = self._logger.writer  # event file and hparams at fit start
        total = cfg.max_steps
        if total is None and self._num_batches is not None and cfg.max_epochs is not None:
            total = cfg.max_epochs * math.ceil(self._num_batches / cfg.accumulate_grad_batches)
        self._progress = Progress(cfg.progress_bar and main, total, self.global_step)
        self._log_enabled = self._logger.log_dir is not None or self._progress.enabled
        self._profiler = StepProfiler(os.fspath(cfg.log_dir), dict(cfg.profiler_kwargs or {})) if (
            cfg.use_profiler and main and cfg.log_dir is not None
        ) else None  # fmt: skip
        if self._profiler is not None:
            self._profiler.start()
        if cfg.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
                if sig is not None:
                    self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        # Hooks that are no-ops everywhere are skipped on the per-batch path.
        participants: list[Any] = [self._module, *self.callbacks]
        self._batch_start_hooks = [p.on_batch_start for p in participants if _overridden(p, "on_batch_start")]
        self._batch_end_hooks = [p.on_batch_end for p in participants if _overridden(p, "on_batch_end")]
        # Under DDP, a stop requested after a step's gradients went out takes a blocking vote before the
        # next step. on_batch_end runs there every step; ranks may hold different callbacks, so they agree.
        self._late_hooks = bool(self._batch_end_hooks)
        if self._vote is not None:
            self._late_hooks = self._vote.any_rank(self._late_hooks)

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.warning("trainkit: received signal %s; stopping after the current optimizer step", signum)
        self._signal = signum

    def _local_flags(self) -> tuple[bool, bool]:
        """This rank's stop requests, as the DDP stop vote reads them."""
        return bool(self.should_stop), self._signal is not None

    def _notify_exception(self, module: TaskModule, exc: BaseException) -> None:
        for hook in [module.on_exception] + [cb.on_exception for cb in self.callbacks]:
            with contextlib.suppress(Exception):
                hook(self, module, exc)

    def _teardown(self, failed: bool) -> BaseException | None:
        """Release everything fit acquired; returns a background write's failure for fit to raise."""
        errors: list[BaseException] = []
        self._iterator = None  # lets a multi-worker loader shut its workers down now
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        if self._profiler is not None:
            with contextlib.suppress(Exception):
                summary = self._profiler.stop()
                if summary:
                    log.info("trainkit profiler summary:\n%s", summary)
            self._profiler = None
        if self._writer is not None:
            try:
                self._writer.close()
            except BaseException as exc:  # a background write failed: surface it unless already failing
                errors.append(exc)
            self._writer = None
        for closeable in (self._progress, self._logger):
            with contextlib.suppress(Exception):
                closeable.close()
        if self.dist.enabled and not failed and not errors:
            self.dist.barrier()  # files rank 0 wrote exist when fit returns on every rank
        # The DDP wrapper must go before its group: a reducer freed after destroy_process_group can hang
        # in its destructor (gloo), e.g. when the garbage collector reaches it during a second fit.
        if self._vote is not None and not failed:
            self._vote.close()
        self._ddp = self._vote = None
        self.dist.destroy()
        return errors[0] if errors and not failed else None

    # -- the loop ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        cfg = self.config
        module = self._module
        assert module is not None and self.optimizer is not None
        optimizer = self.optimizer
        forward = self._ddp if self._ddp is not None else module.training_step
        accumulate = cfg.accumulate_grad_batches
        scaler, clip, ema = self._scaler, cfg.clip_grad, self._ema
        vote = self._vote
        micro = 0
        self._check_stop()
        while self.stop_reason is None:
            if self._iterator is None:
                self._begin_pass()
            batch = next(self._iterator, _END)  # type: ignore[arg-type]
            if batch is _END:
                if self._batch_in_epoch == 0:
                    raise ValueError("train_loader yielded no batches; expected at least one batch per pass")
                if micro:  # a partial accumulation at the end of a pass still makes a step
                    micro = 0
                    if self._ddp is not None:  # its micro-steps ran under no_sync: the end came unannounced
                        dist_utils.average_gradients(list(self._ddp.parameters()))
                    self._optimizer_step(optimizer, scaler, clip, ema)
                    self._after_step(pass_done=True)
                else:
                    self._close_pass()
                    self._after_pass_eval_and_hooks()
                    self._write_best()
                    self._check_stop()
                continue
            batch_idx = self._batch_in_epoch
            self._batch_in_epoch += 1
            if self._move:
                batch = move_to_device(batch, self.device)
            for hook in self._batch_start_hooks:
                hook(self, module, batch, batch_idx)
            micro += 1
            pass_done = self._num_batches is not None and self._batch_in_epoch >= self._num_batches
            boundary = micro == accumulate or pass_done
            sync = _NO_SYNC if (boundary or self._ddp is None) else self._ddp.no_sync()
            with sync:
                if self._autocast_dtype is None:
                    out = forward(batch, batch_idx)
                else:
                    with torch.autocast(self.device.type, dtype=self._autocast_dtype):
                        out = forward(batch, batch_idx)
                if vote is not None and boundary:
                    vote.send()  # this rank's stop flags, as training_step left them, go out with the step
                loss = out if isinstance(out, torch.Tensor) else self._loss_of(out)
                if accumulate > 1:
                    loss = loss / accumulate
                    self._last_loss = loss.detach() if micro == 1 else self._last_loss + loss.detach()  # type: ignore[operator]
                else:
                    self._last_loss = loss
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            self._last_out = out
            if boundary:
                micro = 0
                self._optimizer_step(optimizer, scaler, clip, ema)
                for hook in self._batch_end_hooks:
                    hook(self, module, out, batch, batch_idx)
                self._after_step(pass_done)
            else:
                for hook in self._batch_end_hooks:
                    hook(self, module, out, batch, batch_idx)

    @staticmethod
    def _loss_of(out: Any) -> torch.Tensor:
        if isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
            return out["loss"]
        raise TypeError(
            f"training_step returned {type(out).__name__}"
            + (f" with keys {sorted(out)}" if isinstance(out, Mapping) else "")
            + "; expected a loss tensor or a mapping with a 'loss' tensor"
        )

    def _optimizer_step(
        self, optimizer: torch.optim.Optimizer, scaler: Any, clip: float | None, ema: EMA | None
    ) -> None:
        """backward is done; now unscale -> clip -> step -> schedulers -> EMA -> zero_grad, in that order."""
        if scaler is not None:
            if clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(self._clip_params, clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(self._clip_params, clip)
            optimizer.step()
        for scheduler in self._step_schedulers:
            scheduler.step()
        if ema is not None:
            ema.update()
        optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _after_step(self, pass_done: bool) -> None:
        cfg = self.config
        step = self.global_step
        if pass_done:
            self._close_pass()
        evaluated = cfg.run_mode == "step" and step % cfg.eval_interval == 0 and self._evaluate_and_decide()
        if pass_done:
            self._after_pass_eval_and_hooks()
        self._write_best()
        if self._log_enabled:  # after evaluating, so the progress line shows this step's metrics
            self._progress.update()
            if step % cfg.log_every_n_steps == 0:
                self._log_train(step)
        saved = cfg.save_interval is not None and step % cfg.save_interval == 0
        if saved:
            self._save(regular_name(step))
        # Only a step after which no user code ran (no hook, evaluation or save) may skip the blocking vote.
        self._check_stop(late_code=self._late_hooks or pass_done or evaluated or saved)
        if self._profiler is not None:
            self._profiler.step()  # the profiled step spans everything done after this optimizer step too

    def _begin_pass(self) -> None:
        set_sampler_epoch(self._train_loader, self.current_epoch)
        self._emit("on_epoch_start")
        # What a shuffling sampler draws from at the start of the pass: saved so that a resume in the
        # middle of this pass re-creates the same order.
        self._epoch_start_rng = {
            "torch": torch.get_rng_state(),
            "generators": get_generator_states(self._generators),
        }
        self._batch_in_epoch = 0
        self._iterator = iter(self._train_loader)

    def _close_pass(self) -> None:
        self.current_epoch += 1
        self._batch_in_epoch = 0
        self._iterator = None
        for scheduler in self._epoch_schedulers:
            scheduler.step()

    def _after_pass_eval_and_hooks(self) -> None:
        cfg = self.config
        if cfg.run_mode == "epoch" and self.current_epoch % cfg.eval_interval == 0:
            self._evaluate_and_decide()
        self._emit("on_epoch_end")

    def _check_stop(self, late_code: bool = True) -> None:
        """Decide whether fit ends here. ``late_code``: user code (a hook, an evaluation, a save) ran after
        this step's ``training_step``, or this is not a step's end at all."""
        cfg = self.config
        requested, signalled = self._local_flags()
        # These follow from counters and reduced metrics, so every rank reaches the same answer alone.
        early = self._early_reason is not None
        at_limit = (cfg.max_steps is not None and self.global_step >= cfg.max_steps) or (
            cfg.max_epochs is not None and self.current_epoch >= cfg.max_epochs
        )
        if self._vote is not None:
            # What every rank had asked by the end of its training_step came back with this step. A
            # request made later, and the final reason when stopping anyway, take one blocking vote; all
            # inputs to this choice are the same on every rank.
            heard = self._vote.collect() or (False, False)
            if late_code or early or at_limit or any(heard):
                agreed = self._vote.now()
                requested, signalled = heard[0] or agreed[0], heard[1] or agreed[1]
            else:
                requested = signalled = False  # a signal that came after training_step: next step
        if early:
            self.stop_reason = self._early_reason
        elif signalled:
            self.stop_reason = "signal"
            if self.global_step != self._last_saved_step and self.storage is not None:
                self._save(regular_name(self.global_step))
        elif requested:
            self.stop_reason = "should_stop"
        elif at_limit:
            self.stop_reason = "max_steps" if (
                cfg.max_steps is not None and self.global_step >= cfg.max_steps
            ) else "max_epochs"  # fmt: skip
        if requested:
            self.should_stop = True  # under DDP another rank may have asked

    # -- logging -----------------------------------------------------------------------------------------

    def _log_train(self, step: int) -> None:
        assert self.optimizer is not None
        loss = (
            float(self._last_loss.detach()) if self._last_loss is not None else None
        )  # the one sync per log step
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        if self._logger.log_dir is not None:
            scalars: dict[str, float] = {}
            if loss is not None:
                scalars[TAG_TRAIN_LOSS] = loss
            out = self._last_out
            if isinstance(out, Mapping):
                for name, value in out.items():
                    if name != "loss" and isinstance(value, (torch.Tensor, int, float)):
                        if not isinstance(value, torch.Tensor) or value.numel() == 1:
                            scalars[f"train_{name}"] = float(value)
            scalars.update(dict(zip(lr_tags(len(lrs)), lrs)))
            scalars[TAG_EPOCH] = float(self.current_epoch)
            self._logger.log_scalars(scalars, step)
        self._progress.show(step, self.current_epoch, loss, lrs)

    # -- evaluation and decisions ------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _eval_model(self, model: TaskModule, loader: Any, stage: str, prefix: str) -> dict[str, float]:
        step_fn = model.validation_step if stage == "val" else model.test_step
        bar = (
            self._progress.eval_bar(_len_or_none(loader), f"{prefix}{stage}")
            if hasattr(self, "_progress")
            else None
        )
        iterable = loader if bar is None else _tick(loader, bar)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            return run_eval_loop(
                step_fn, iterable, prefix=f"{prefix}{stage}_", device=self.device, autocast=self._autocast,
                dist_ctx=self.dist, step_name="validation_step" if stage == "val" else "test_step",
            )  # fmt: skip
        finally:
            for m, was_training in modes.items():
                m.training = was_training
            if bar is not None:
                bar.close()

    def _evaluate(self, module: TaskModule, loaders: list[tuple[str, Any]]) -> dict[str, float]:
        self._emit("on_eval_start")
        metrics: dict[str, float] = {}
        models: list[tuple[str, TaskModule]] = [("", module)]
        if self._ema is not None and self._ema.model is module:
            models.append(("ema_", self._ema.module))  # type: ignore[arg-type]
        # Evaluation draws from the global RNG (every DataLoader iterator takes a seed from it). Forking it
        # keeps training independent of when and how often it evaluates, with or without EMA.
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for prefix, model in models:
                for stage, loader in loaders:
                    metrics.update(self._eval_model(model, loader, stage, prefix))
        self._emit("on_eval_end", metrics)
        return metrics

    def _evaluate_and_decide(self) -> bool:
        """Evaluate, then the best check and early stopping; False when there is nothing to evaluate."""
        loaders = [
            (s, ld) for s, ld in (("val", self._val_loader), ("test", self._test_loader)) if ld is not None
        ]
        if not loaders:
            return False
        assert self._module is not None
        metrics = self._evaluate(self._module, loaders)
        self.latest_metrics = metrics
        record = EvalRecord(step=self.global_step, epoch=self.current_epoch, metrics=dict(metrics))
        self.history.append(record)
        self._logger.log_eval(self.global_step, self.current_epoch, metrics)
        self._progress.eval_done(metrics)
        for cfg in self._plateau_schedulers:
            cfg.scheduler.step(self._metric(metrics, cfg.monitor, "lr_scheduler monitor"))
        improved = self._update_best(metrics)
        if self._stopper is not None:
            value = self._metric(metrics, self.config.early_stop_rule.target, "early_stop target")  # type: ignore[union-attr]
            if self._stopper.update(value) and self._early_reason is None:
                self._early_reason = self._stopper.reason
                log.info("trainkit: early stop at step %d (%s)", self.global_step, self._stopper.reason)
                self._emit("on_early_stop")
        # Written once the step's evaluation and epoch-end hooks are done (see _write_best), so the file
        # holds the same state a regular checkpoint of this step would.
        self._best_pending = improved and self.storage is not None
        return True

    def _write_best(self) -> None:
        if self._best_pending:
            self._best_pending = False
            self.best_checkpoint_path = self._save(BEST_NAME)

    def _metric(self, metrics: dict[str, float], name: str, what: str) -> float:
        if name not in metrics:
            raise MetricNotFoundError(
                f"{what} {name!r} was not produced by the evaluation; available metrics: {sorted(metrics)}"
            )
        return metrics[name]

    def _update_best(self, metrics: dict[str, float]) -> bool:
        rule = self.config.monitor_rule
        if rule.target not in metrics:
            if self.config.monitor_explicit:
                # The rule comes from monitor, or else from early_stop: name the setting the user wrote.
                what = "monitor target" if self.config.monitor is not None else "early_stop target"
                self._metric(metrics, rule.target, what)
            if not self._warned_monitor:
                self._warned_monitor = True
                warnings.warn(
                    f"no {rule.target!r} metric to pick the best checkpoint (available: {sorted(metrics)}); "
                    "no best checkpoint is written. Set monitor={'target': ...} to choose one.",
                    stacklevel=2,
                )
            return False
        value = metrics[rule.target]
        if not self._best.update(value):
            return False
        self.best_metric, self.best_step, self.best_epoch = value, self.global_step, self.current_epoch
        return True

    # -- checkpoints -------------------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epoch": self.current_epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "epoch_start_rng": self._epoch_start_rng if self._batch_in_epoch > 0 else None,
            # At a pass boundary the next pass draws its order from the loader's generators as they are now.
            "generators": get_generator_states(self._generators),
            "latest_metrics": dict(self.latest_metrics),
            "history": [dict(r) for r in self.history],
            "best": {
                "metric": self.best_metric,
                "step": self.best_step,
                "epoch": self.best_epoch,
                "tracker": self._best.state_dict(),
            },
            "early_stop": self._stopper.state_dict() if self._stopper is not None else None,
            "rng": get_rng_state(),
            "world_size": self.dist.world_size,
        }

    def _build_checkpoint(self) -> dict[str, Any]:
        assert self._module is not None and self.optimizer is not None
        checkpoint: dict[str, Any] = {
            FORMAT_KEY: FORMAT_VERSION,
            KEY_MODEL: self._module.state_dict(),
            KEY_EMA: self._ema.state_dict() if self._ema is not None else None,
            KEY_OPTIMIZERS: [self.optimizer.state_dict()],
            KEY_SCHEDULERS: [s.state_dict() for s in self.schedulers],
            KEY_GRAD_SCALER: self._scaler.state_dict() if self._scaler is not None else None,
            KEY_TRAINER: self._trainer_state(),
            KEY_CALLBACKS: {cb.state_key: cb.state_dict() for cb in self._stateful_callbacks},  # type: ignore[attr-defined]
            KEY_TASK: {},
        }
        self._module.on_save_checkpoint(checkpoint)
        for cb in self.callbacks:
            cb.on_save_checkpoint(self, self._module, checkpoint)
        return checkpoint

    def _save(self, name: str) -> str | None:
        """Write a checkpoint from rank 0 (others return at once); returns its location."""
        if name != BEST_NAME:  # a signal still writes a regular file at a step that only wrote best
            self._last_saved_step = self.global_step
        if self.storage is None or not self.dist.is_main:
            return self.storage.location(name) if self.storage is not None else None
        checkpoint = self._build_checkpoint()
        storage = self.storage
        if self._writer is not None:
            frozen = self._writer.snapshot(checkpoint)  # host copies now; the write runs while training goes on
            self._writer.submit(lambda: storage.write(name, frozen))
            return storage.location(name)
        return storage.write(name, checkpoint)

    def _resolve_ckpt(self, ckpt_path: str | os.PathLike[str]) -> dict[str, Any] | None:
        if ckpt_path != "last":
            return load_checkpoint(ckpt_path, storage_options=dict(self.config.storage_options or {}))
        storage = self.storage
        assert storage is not None
        steps = storage.regular_steps()
        best: dict[str, Any] | None = storage.read(BEST_NAME) if storage.exists(BEST_NAME) else None
        newest = steps[-1] if steps else None
        # On a tie the regular file is the newer one: it is written after on_epoch_end, best before.
        if best is not None and (newest is None or best[KEY_TRAINER]["global_step"] > newest):
            log.info("trainkit: resuming from %s", storage.location(BEST_NAME))
            return best
        if newest is not None:
            log.info("trainkit: resuming from %s", storage.location(regular_name(newest)))
            return storage.read(regular_name(newest))
        log.warning("trainkit: ckpt_path='last' found no checkpoint in %s; starting fresh", storage.url)
        return None

    def _resume(self, ckpt_path: str | os.PathLike[str]) -> None:
        checkpoint = self._resolve_ckpt(ckpt_path)
        if checkpoint is None:
            return
        module, optimizer = self._module, self.optimizer
        assert module is not None and optimizer is not None
        module.load_state_dict(checkpoint[KEY_MODEL])
        if self._ema is not None:
            if checkpoint.get(KEY_EMA):
                self._ema.load_state_dict(checkpoint[KEY_EMA])
            else:
                warnings.warn(
                    "the checkpoint has no EMA state; the EMA restarts from its weights", stacklevel=3
                )
                self._ema.reset()
        saved_opts, saved_scheds = checkpoint[KEY_OPTIMIZERS], checkpoint[KEY_SCHEDULERS]
        if len(saved_opts) != 1 or len(saved_scheds) != len(self.schedulers):
            raise CheckpointError(
                f"checkpoint holds {len(saved_opts)} optimizer(s) and {len(saved_scheds)} scheduler(s); "
                f"configure_optimizers() gave 1 and {len(self.schedulers)}"
            )
        optimizer.load_state_dict(saved_opts[0])
        for scheduler, state in zip(self.schedulers, saved_scheds):
            scheduler.load_state_dict(state)
        if self._scaler is not None and checkpoint.get(KEY_GRAD_SCALER):
            self._scaler.load_state_dict(checkpoint[KEY_GRAD_SCALER])
        state = checkpoint[KEY_TRAINER]
        self.global_step = int(state["global_step"])
        self.current_epoch = int(state["epoch"])
        self.latest_metrics = dict(state["latest_metrics"])
        self.history = [EvalRecord(r) for r in state["history"]]
        best = state["best"]
        self.best_metric, self.best_step, self.best_epoch = best["metric"], best["step"], best["epoch"]
        self._best.load_state_dict(best["tracker"])
        if self.storage is not None and best["metric"] is not None and self.storage.exists(BEST_NAME):
            self.best_checkpoint_path = self.storage.location(BEST_NAME)
        if self._stopper is not None and state["early_stop"] is not None:
            self._stopper.load_state_dict(state["early_stop"])
        saved_callbacks = checkpoint.get(KEY_CALLBACKS) or {}
        for cb in self._stateful_callbacks:
            if cb.state_key in saved_callbacks:
                cb.load_state_dict(saved_callbacks[cb.state_key])  # type: ignore[attr-defined]
            else:
                warnings.warn(f"the checkpoint has no state for callback {cb.state_key!r}", stacklevel=3)
        module.on_load_checkpoint(checkpoint)
        for cb in self.callbacks:
            cb.on_load_checkpoint(self, module, checkpoint)
        self._last_saved_step = self.global_step
        batch_in_epoch = int(state["batch_in_epoch"])
        if batch_in_epoch > 0:
            self._resume_pass(batch_in_epoch, state["epoch_start_rng"])
        elif state.get("generators") is not None:
            set_generator_states(self._generators, state["generators"])
        set_rng_state(state["rng"])

    def _resume_pass(self, skip: int, start_rng: dict[str, Any] | None) -> None:
        """Re-open the interrupted pass at batch ``skip`` with the order it had: the sampler draws from the
        generator states of the pass's start; the skipped batches' indices are drawn but never loaded."""
        set_sampler_epoch(self._train_loader, self.current_epoch)
        if start_rng is not None:
            torch.set_rng_state(start_rng["torch"])
            set_generator_states(self._generators, start_rng["generators"])
        loader, skipper = skip_batches(self._train_loader, skip)
        self._iterator = iter(loader)
        if skipper is not None:
            skipper.prime()
        else:  # an iterable dataset has no indices to skip: read and drop
            for _ in range(skip):
                next(self._iterator, None)
        self._batch_in_epoch = skip
        self._epoch_start_rng = start_rng

    # -- small helpers -----------------------------------------------------------------------------------

    def _emit(self, name: str, *args: Any) -> None:
        module = self._module
        getattr(module, name)(self, module, *args)
        for cb in self.callbacks:
            getattr(cb, name)(self, module, *args)

    def _standalone_eval(self, module: TaskModule, loader: Iterable[Any], stage: str) -> dict[str, float]:
        if not isinstance(module, TaskModule):
            raise TypeError(f"module={type(module).__name__} is not valid; expected a trainkit.TaskModule")
        if not isinstance(loader, Iterable):
            raise TypeError(f"loader={loader!r} is not valid; expected an iterable of batches")
        if self.config.distributed and torch.distributed.is_initialized():
            self.dist = DistContext(True, torch.distributed.get_rank(), torch.distributed.get_world_size())
            if isinstance(loader, torch.utils.data.DataLoader):
                loader = shard_eval_loader(loader, self.dist.world_size, self.dist.rank)
        module.to(self.device)
        previous = self._module
        self._module = module
        try:
            return self._evaluate(module, [(stage, loader)])
        finally:
            self._module = previous

    def _result(self) -> FitResult:
        return FitResult(
            global_step=self.global_step,
            epoch=self.current_epoch,
            best_metric=self.best_metric,
            best_step=self.best_step,
            best_epoch=self.best_epoch,
            best_checkpoint=self.best_checkpoint_path,
            stopped_early=self.stop_reason in ("early_stop", "non_finite"),
            stop_reason=self.stop_reason or "max_steps",
            metrics=dict(self.latest_metrics),
            history=list(self.history),
        )


def _len_or_none(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _tick(loader: Iterable[Any], bar: Any) -> Iterator[Any]:
    for batch in loader:
        yield batch
        bar.update(1)
