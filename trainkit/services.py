"""What one fit starts beside the loop and stops after it: the run logger, the progress display, the
profiler and the stop-signal handlers. Rank 0 logs, shows progress and profiles; every rank hears signals.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .config import TrainerConfig
from .loggers import TAG_EPOCH, TAG_TRAIN_LOSS, Progress, RunLogger, lr_tags
from .profiling import StepProfiler

log = logging.getLogger("trainkit")

SUMMARY_WRITER_DOC = """The ``torch.utils.tensorboard.SummaryWriter`` trainkit logs to: add images, histograms,
text ... to the same run (the same event file) as trainkit's scalars. Rank 0 only, from the start of fit
(``on_fit_start``) and after it; None on other ranks, without ``log_dir`` and before the first fit. It is
created on first use; fit closes it at its end, and its next ``add_*`` after fit opens a new event file in
the same directory (flush or close it yourself then). Each fit has its own writer."""


class FitServices:
    """Logger, progress, profiler and signal handlers for one fit. Until :meth:`start` every part is a
    disabled stand-in, so evaluations outside fit (``validate``/``test``) can use it as is."""

    def __init__(self) -> None:
        self.logger = RunLogger(None, {})
        self.progress = Progress(False, None)
        self.profiler: StepProfiler | None = None
        self.log_enabled = False
        self.signal: int | None = None  # the signal received, if any
        self.log_every_n_steps = 1
        self._last: tuple[int, int, Any, Any] | None = None  # (step, epoch, loss, optimizer) of the last step
        self._old_handlers: dict[int, Any] = {}

    def start(self, cfg: TrainerConfig, is_main: bool, num_batches: int | None, global_step: int) -> None:
        """``num_batches``: a pass's batches where certain (see ``trainkit.data.exact_length``), for the
        progress total; None shows no total unless ``max_steps`` gives one."""
        self.logger = RunLogger(
            os.fspath(cfg.log_dir) if (cfg.log_dir is not None and is_main) else None, cfg.hparams()
        )
        # No event file yet: the logger creates it at its first write, or when a user asks for the writer.
        total = cfg.max_steps
        if total is None and num_batches is not None and cfg.max_epochs is not None:
            total = cfg.max_epochs * math.ceil(num_batches / cfg.accumulate_grad_batches)
        self.progress = Progress(cfg.progress_bar and is_main, total, global_step)
        self.log_enabled = self.logger.log_dir is not None or self.progress.enabled
        self.log_every_n_steps = cfg.log_every_n_steps
        if cfg.use_profiler and is_main and cfg.log_dir is not None:
            self.profiler = StepProfiler(os.fspath(cfg.log_dir), dict(cfg.profiler_kwargs or {}))
            self.profiler.start()
        if cfg.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
                if sig is not None:
                    self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    @property
    def summary_writer(self) -> Any:
        return self.logger.summary_writer

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.warning("trainkit: received signal %s; stopping after the current optimizer step", signum)
        self.signal = signum

    def step_done(
        self, step: int, epoch: int, loss: torch.Tensor | None, out: Any, optimizer: Any,
        extra: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        """After every optimizer step (when logging is on): the progress bar moves; every
        ``log_every_n_steps`` steps :meth:`log_train` runs, with ``extra()`` (the GradScaler's scalars). The
        step is remembered (no sync) for the last frame."""
        self.progress.update()
        self._last = (step, epoch, loss, optimizer)
        if step % self.log_every_n_steps == 0:
            lrs = [float(g["lr"]) for g in optimizer.param_groups]
            self.log_train(step, epoch, loss, out, lrs, extra() if extra is not None else None)

    def log_train(
        self,
        step: int,
        epoch: int,
        loss: torch.Tensor | None,
        out: Any,
        lrs: list[float],
        extra: Mapping[str, float] | None = None,
    ) -> None:
        """Train loss, other scalar outputs of ``training_step``, learning rates, ``extra`` (the GradScaler's)
        and epoch at a log step."""
        value = float(loss.detach()) if loss is not None else None  # the one host sync per log step
        if self.logger.log_dir is not None:
            scalars: dict[str, float] = {}
            if value is not None:
                scalars[TAG_TRAIN_LOSS] = value
            if isinstance(out, Mapping):
                for name, item in out.items():
                    if name != "loss" and isinstance(item, (torch.Tensor, int, float)):
                        if not isinstance(item, torch.Tensor) or item.numel() == 1:
                            scalars[f"train_{name}"] = float(item.detach() if isinstance(item, torch.Tensor) else item)
            scalars.update(dict(zip(lr_tags(len(lrs)), lrs)))
            scalars.update(extra or {})
            scalars[TAG_EPOCH] = float(epoch)
            self.logger.log_scalars(scalars, step)
        self.progress.show(step, epoch, value, lrs)

    def stop_listening(self) -> None:
        """Restore the signal handlers and stop the profiler (first thing at teardown)."""
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        if self.profiler is not None:
            with contextlib.suppress(Exception):
                summary = self.profiler.stop()
                if summary:
                    log.info("trainkit profiler summary:\n%s", summary)
            self.profiler = None

    def close(self, finished: bool = False) -> None:
        """Close the progress display (when fit ``finished`` without an exception, its last frame shows the
        final step's values) and the logger's files (``finished``: a run that never evaluated still records
        its settings, unless it took no step)."""
        if finished and self._last is not None and self.progress.stale(self._last[0]):
            step, epoch, loss, optimizer = self._last
            with contextlib.suppress(Exception):
                lrs = [float(g["lr"]) for g in optimizer.param_groups]
                self.progress.show(step, epoch, float(loss.detach()) if loss is not None else None, lrs)
        with contextlib.suppress(Exception):
            self.progress.close()
        with contextlib.suppress(Exception):
            # A fit that took no step (a resume of a concluded run) writes nothing, not even its settings.
            self.logger.close(finished=finished and self._last is not None)
