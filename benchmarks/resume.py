"""Resume cost against the position in the epoch: resuming at batch k must not read the k batches before it.

The data: 10,000 samples, batch 10, so 1,000 batches a pass; reading a sample takes 1 ms (``time.sleep``,
as a slow disk or network would), so reading one batch takes >= 10 ms and reading a whole pass >= 10 s.
The task is a tiny MLP, so the numbers are the cost of resuming, not of training.

For k = 0 (an epoch boundary), 500 and 999 (the last batch) of the second pass, a fast-data run writes a
checkpoint at that position (steps 1000, 1500 and 1999). Then, interleaved:

    trainkit resume   a new Trainer and task; ``fit(ckpt_path=..., max_steps=step + 1)`` with the slow data:
                      load, restore, re-open the pass at batch k, then read and train one batch.
                      ``to first batch`` is the time from the call to ``on_batch_start`` of that batch.
    read-and-drop     what a resume without index-level skipping pays on top: a fresh iterator over the
                      slow loader, ``next()`` k times (measured once per k: it takes k x 10 ms).

Target: trainkit's resume time does not grow with k (ratio of k=999 to k=0 close to 1).

    python benchmarks/resume.py [--repeats 5]
    python benchmarks/resume.py --smoke
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import Bench, fmt_stat, interleave, print_table, summarize
from torch.utils.data import DataLoader, Dataset

import trainkit as tk


class SlowData(Dataset):
    """``n`` samples of 8 features; ``__getitem__`` sleeps ``delay`` seconds when ``slow`` is set."""

    def __init__(self, n: int, delay: float, slow: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.delay, self.slow = delay, slow

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slow:
            time.sleep(self.delay)
        return self.x[i], self.y[i]


class Tiny(tk.TaskModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class FirstBatch(tk.Callback):
    def __init__(self, start: float) -> None:
        self.start, self.seconds = start, 0.0

    def on_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if not self.seconds:
            self.seconds = time.perf_counter() - self.start


def loader(n: int, batch: int, delay: float, slow: bool) -> DataLoader:
    return DataLoader(SlowData(n, delay, slow), batch_size=batch, shuffle=True)


def trainer(directory: str, max_steps: int, save_interval: int | None, callbacks: list[Any]) -> tk.Trainer:
    return tk.Trainer(
        run_mode="step", max_steps=max_steps, save_interval=save_interval, checkpoint_dir=directory,
        callbacks=callbacks, log_dir=None, progress_bar=False,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    bench = Bench("resume", __doc__, default_repeats=5, smoke_repeats=1, argv=argv)
    n, batch, delay = (400, 10, 0.001) if bench.smoke else (10_000, 10, 0.001)
    per_pass = n // batch
    positions = [0, per_pass // 2, per_pass - 1]
    bench.settings.update(
        samples=n, batch=batch, batches_per_pass=per_pass, read_delay_per_sample_s=delay, positions=positions,
        resumed_pass=1, measure="wall time of fit(ckpt_path, max_steps=step+1); time to the first batch",
    )  # fmt: skip
    root = tempfile.mkdtemp(prefix="tk-resume-bench-")
    try:
        checkpoints = {}
        for k in positions:  # fast data: the same order, no sleeping
            step = per_pass + k
            directory = os.path.join(root, f"k{k}")
            trainer(directory, step, step, []).fit(Tiny(), loader(n, batch, delay, slow=False))
            checkpoints[k] = (step, os.path.join(directory, f"step_{step:09d}.ckpt"))

        def resume(k: int) -> Any:
            step, path = checkpoints[k]

            def run() -> dict[str, float]:
                start = time.perf_counter()
                probe = FirstBatch(start)
                run_dir = tempfile.mkdtemp(dir=root)
                result = trainer(run_dir, step + 1, None, [probe]).fit(
                    Tiny(), loader(n, batch, delay, slow=True), ckpt_path=path
                )
                seconds = time.perf_counter() - start
                assert result.global_step == step + 1
                return {"total": seconds, "first_batch": probe.seconds}

            return run

        print("## trainkit resume", flush=True)
        times = interleave({f"k={k}": resume(k) for k in positions}, repeats=bench.repeats, warmup=1)

        print("## read-and-drop reference (once per k)", flush=True)
        dropped: dict[int, float] = {}
        for k in positions:
            slow = loader(n, batch, delay, slow=True)
            start = time.perf_counter()
            iterator = iter(slow)
            for _ in range(k):
                next(iterator)
            dropped[k] = time.perf_counter() - start

        table = []
        base = summarize([t["total"] for t in times[f"k={positions[0]}"]])["median"]
        for k in positions:
            total = summarize([t["total"] for t in times[f"k={k}"]])
            first = summarize([t["first_batch"] for t in times[f"k={k}"]])
            ratio = total["median"] / base
            bench.add_row(
                {"k": k, "step": checkpoints[k][0], "resume_total_s": total, "to_first_batch_s": first,
                 "ratio_to_k0": ratio, "read_and_drop_s": dropped[k]}
            )  # fmt: skip
            table.append(
                [k, f"{k / per_pass:.3f}", fmt_stat(total, 1e3), fmt_stat(first, 1e3), f"{ratio:.3f}x",
                 f"{dropped[k] * 1e3:.0f}"]
            )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print()
    print_table(
        ["k (batch)", "k / pass", "resume ms median (min-max)", "to first batch ms", "vs k=0",
         "read-and-drop ms (avoided)"],
        table,
    )  # fmt: skip
    bench.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
