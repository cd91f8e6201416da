"""How long a checkpoint save holds up the training loop: ``async_checkpoint=True`` against synchronous saves.

The state: an MLP of 4 Linear(2048, 2048) layers (16.8 M parameters, 67 MB), its SGD momentum (67 MB)
and its EMA (67 MB): a ~200 MB checkpoint, written to local disk (temp file, fsync, rename).

Each contender is one real ``fit`` of ``saves`` x ``save_interval`` steps (batch 64, one intra-op
thread, so the background writer has a core of its own on a 2-core machine). A probe callback times
every gap between the end of one optimizer step (``on_batch_end``) and the start of the next batch
(``on_batch_start``); the save sits in that gap. The stall of one save is its gap minus the median gap
of the steps without a save (which holds only the next batch's loading). The first save of each fit is a
warm-up and is dropped. ``save_interval`` is calibrated first (one short synchronous fit: the save's time
and the step's) so that about twice a save's time passes between saves: the background write then ends
before the next save, and the async stall is the snapshot on the training thread. (A shorter interval
adds the wait for the previous write: saving more often than the disk can write.)

Rounds alternate sync, async; a row reports the median (min-max) over all measured saves, the ratio is
the median of the per-round ratios of median stalls. Target: async stall <= 0.25x the synchronous one.
Also reported: the median step time (forward, backward, optimizer step, EMA) and the whole fit's time,
which show what the background write costs the steps that run beside it.

    python benchmarks/async_stall.py [--repeats 3]
    python benchmarks/async_stall.py --smoke
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch
from common import Bench, fmt_ratio, fmt_stat, interleave, print_table, summarize
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk

TARGET = 0.25


class Mlp(tk.TaskModule):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        blocks: list[torch.nn.Module] = []
        for _ in range(layers):
            blocks += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        self.net = torch.nn.Sequential(*blocks)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return (self.net(x) - x).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


class GapProbe(tk.Callback):
    """Per step: the compute time (batch start to batch end) and the gap after it (to the next batch)."""

    def __init__(self) -> None:
        self.gaps: dict[int, float] = {}
        self.steps: list[float] = []
        self._start = self._end = 0.0

    def on_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if trainer.global_step > 0:
            self.gaps[trainer.global_step] = now - self._end
        self._start = now

    def on_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._end = time.perf_counter()
        self.steps.append(self._end - self._start)


def run_fit(width: int, layers: int, batch: int, save_interval: int, saves: int, async_checkpoint: bool):
    directory = tempfile.mkdtemp(prefix="tk-stall-")
    try:
        probe = GapProbe()
        data = TensorDataset(torch.randn(batch * 4, width, generator=torch.Generator().manual_seed(0)))
        trainer = tk.Trainer(
            run_mode="step", max_steps=save_interval * saves + 1, save_interval=save_interval, use_ema=True,
            async_checkpoint=async_checkpoint, checkpoint_dir=directory, callbacks=[probe], log_dir=None,
            progress_bar=False,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(Mlp(width, layers), DataLoader(data, batch_size=batch))
        fit_seconds = time.perf_counter() - start
        save_steps = [save_interval * i for i in range(1, saves + 1)]
        plain = statistics.median(g for s, g in probe.gaps.items() if s not in save_steps)
        stalls = [probe.gaps[s] - plain for s in save_steps[1:]]  # the first save is a warm-up
        return {
            "stalls": stalls,
            "plain_gap": plain,
            "step": statistics.median(probe.steps),
            "fit": fit_seconds,
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    bench = Bench("async_stall", __doc__, default_repeats=3, smoke_repeats=1, argv=argv)
    width, layers, batch, saves = (256, 2, 8, 3) if bench.smoke else (2048, 4, 64, 5)
    params = layers * (width * width + width)
    calibration = run_fit(width, layers, batch, 4, 3, async_checkpoint=False)
    save_s = statistics.median(calibration["stalls"])
    period_s = calibration["step"] + calibration["plain_gap"]
    save_interval = max(4, math.ceil(2 * save_s / period_s))
    print(f"# calibration: sync save {save_s * 1e3:.0f} ms, step {period_s * 1e3:.1f} ms", flush=True)
    bench.settings.update(
        width=width, layers=layers, parameters=params, batch=batch, save_interval=save_interval,
        saves_per_fit=saves, measured_saves_per_fit=saves - 1, ema=True, optimizer="SGD(momentum=0.9)",
        checkpoint_tensor_mb=round(3 * params * 4 / 1e6, 1), threads=1,
        device=str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        calibration={"sync_save_s": save_s, "step_period_s": period_s},
    )  # fmt: skip

    def contender(async_checkpoint: bool):
        return lambda: run_fit(width, layers, batch, save_interval, saves, async_checkpoint)

    results = interleave(
        {"sync": contender(False), "async": contender(True)}, repeats=bench.repeats, warmup=0
    )
    ratios = [
        statistics.median(a["stalls"]) / statistics.median(s["stalls"])
        for s, a in zip(results["sync"], results["async"])
    ]
    ratio = statistics.median(ratios)
    table = []
    for name, runs in results.items():
        stalls = summarize([x for r in runs for x in r["stalls"]])
        step = summarize([r["step"] for r in runs])
        fit = summarize([r["fit"] for r in runs])
        bench.add_row(
            {"contender": name, "stall_per_save_s": stalls, "step_s": step, "fit_s": fit,
             "plain_gap_s": summarize([r["plain_gap"] for r in runs])}
        )  # fmt: skip
        table.append(
            [name, fmt_stat(stalls, 1e3), fmt_stat(step, 1e3), fmt_stat(fit, 1, 2),
             fmt_ratio(ratio, TARGET) if name == "async" else "1 (reference)"]
        )  # fmt: skip
    bench.add_row({"contender": "async / sync", "ratio": ratio, "ratios_per_round": ratios, "target": TARGET})
    print()
    print_table(["saves", "stall per save ms median (min-max)", "step ms", "fit s", "stall ratio"], table)
    bench.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
