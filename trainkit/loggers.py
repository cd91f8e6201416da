"""What a run reports: TensorBoard scalars, ``metrics.jsonl``, and a progress display. Rank 0 only.

Everything here runs at log steps and evaluations, never on the other steps: the Trainer keeps the loss
as a device tensor and calls :meth:`RunLogger.log_train` only every ``log_every_n_steps`` steps, where the
one ``.item()`` (a host-device sync on GPUs) happens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

TAG_TRAIN_LOSS = "train_loss"
TAG_LR = "lr"
TAG_EPOCH = "epoch"
METRICS_FILE = "metrics.jsonl"


def lr_tags(num_groups: int) -> list[str]:
    """``lr`` for a single param group, else ``lr/pg0``, ``lr/pg1``, ..."""
    return [TAG_LR] if num_groups == 1 else [f"{TAG_LR}/pg{i}" for i in range(num_groups)]


class RunLogger:
    """TensorBoard event files and ``metrics.jsonl`` under ``log_dir`` (None: write nothing).

    The one ``SummaryWriter`` is created at the first write (or when a user asks for
    :attr:`summary_writer`), never before: a fit that fails before it logs anything leaves no event file.
    The hparams go out once per fit, at the first evaluation, with that evaluation's metric names as the
    HParams tab's metric columns; a fit that never evaluates writes them, without metric columns, when it
    closes (see :meth:`close`).
    """

    def __init__(self, log_dir: str | None, hparams: dict[str, Any]) -> None:
        self.log_dir = log_dir
        self.hparams = hparams
        self._writer: Any = None
        self._hparams_written = False
        self._epoch_step: int | None = None

    @property
    def writer(self) -> Any:
        """The run's ``SummaryWriter``, created on first use. Kept after :meth:`close`: a closed torch
        ``SummaryWriter`` opens a new event file in the same ``log_dir`` at its next write."""
        if self._writer is None:
            # Imported here: tensorboard costs about half a second to import and most imports of trainkit
            # never log.
            from torch.utils.tensorboard import SummaryWriter

            assert self.log_dir is not None
            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    @property
    def summary_writer(self) -> Any:
        """The ``torch.utils.tensorboard.SummaryWriter`` trainkit writes to, or None without ``log_dir``."""
        return None if self.log_dir is None else self.writer

    def write_hparams(self, metric_names: Sequence[str] = ()) -> None:
        """Write the settings once: TensorBoard's hparams session (with ``metric_names`` as the experiment's
        metric columns, read from this run's scalars of those tags) and a text table."""
        if self.log_dir is None or self._hparams_written:
            return
        self._hparams_written = True
        from torch.utils.tensorboard.summary import hparams

        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.hparams.items()}
        # Into this run's own event file: SummaryWriter.add_hparams would open a sub-run instead, whose
        # scalars are not the ones trainkit logs.
        exp, ssi, sei = hparams(clean, dict.fromkeys(metric_names), hparam_domain_discrete=None)
        file_writer = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        table = "\n".join(f"| {k} | {v} |" for k, v in clean.items())
        self.writer.add_text("hparams", "| parameter | value |\n|---|---|\n" + table, 0)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.log_dir is None:
            return
        writer = self.writer
        if TAG_EPOCH in scalars:
            if step == self._epoch_step:  # a log step that also evaluates: write the epoch once
                scalars = {k: v for k, v in scalars.items() if k != TAG_EPOCH}
            self._epoch_step = step
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)

    def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        if self.log_dir is None:
            return
        self.write_hparams(list(metrics))  # the first evaluation names the metric columns
        self.log_scalars({**metrics, TAG_EPOCH: float(epoch)}, step)
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "metrics": metrics}) + "\n")

    def close(self, finished: bool = False) -> None:
        """Flush and close the event file (the writer object stays: see :attr:`writer`). A run that never
        evaluated records its settings here (hparams without metric columns) when it ``finished`` or
        already has an event file; a fit that failed before writing anything leaves no file behind."""
        if self.log_dir is not None and not self._hparams_written and (finished or self._writer is not None):
            self.write_hparams()
        if self._writer is not None:
            self._writer.close()


class Progress:
    """A tqdm bar on a terminal; elsewhere one compact line per log interval (no redraw noise in logs)."""

    def __init__(self, enabled: bool, total: int | None, initial: int = 0) -> None:
        self.enabled = enabled
        self.is_tty = enabled and sys.stderr.isatty()
        self._bar: Any = None
        self._last_eval: dict[str, float] = {}
        self._shown: tuple[int, int] | None = None  # (step, evaluations seen) of the last show()
        self._evals = 0
        self._start = time.perf_counter()
        self._start_step = initial
        self.total = total
        if self.is_tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, leave=True)

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def show(self, step: int, epoch: int, loss: float | None, lrs: list[float]) -> None:
        if not self.enabled:
            return
        self._shown = (step, self._evals)
        fields = {"epoch": epoch}
        text = {k: f"{v}" for k, v in fields.items()}
        if loss is not None:
            text["loss"] = f"{loss:.4g}"
        if lrs:
            text["lr"] = f"{lrs[0]:.3g}"
        text.update({k: f"{v:.4g}" for k, v in self._last_eval.items()})
        if self._bar is not None:
            self._bar.set_postfix(text, refresh=False)
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rate = (step - self._start_step) / elapsed
        total = f"/{self.total}" if self.total else ""
        parts = " ".join(f"{k}={v}" for k, v in text.items())
        print(f"[trainkit] step {step}{total} {parts} {rate:.1f} steps/s", file=sys.stderr, flush=True)

    def eval_done(self, metrics: dict[str, float]) -> None:
        self._last_eval = {k: v for k, v in metrics.items() if k.startswith(("val_", "ema_val_"))}
        self._evals += 1

    def stale(self, step: int) -> bool:
        """True on a terminal when the bar does not show ``step``'s values after the latest evaluation: the
        caller then :meth:`show` s them once more before :meth:`close`, so the last frame is the final
        step's. (Elsewhere the log lines stand as printed: no extra line, no extra sync.)"""
        return self._bar is not None and self._shown != (step, self._evals)

    def eval_bar(self, total: int | None, desc: str) -> Any:
        """A transient bar for an evaluation pass on a terminal, else None."""
        if not self.is_tty:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
