"""Per-step time of trainkit with TensorBoard logging and the progress display vs a hand-written loop.

Workload: MLP 32 -> 64 -> 10, batch 32, SGD (lr 0.05), one intra-op thread, CPU, batches from the same
in-memory DataLoader for every contender. Contenders:

- ``hand-written``: the plain PyTorch loop, no logging at all (the baseline);
- ``trainkit``: ``Trainer(log_dir=<tmp>, log_every_n_steps=50, progress_bar=True)``; timed around ``fit``,
  so setup (event file, hparams) and teardown (flush, close) are included;
- ``trainkit-quiet``: the same with ``log_dir=None, progress_bar=False``, to tell loop overhead from logging.

Runs are interleaved (A, B, C, C, B, A, ...) after a warm-up. Reported for wall time and for process CPU
time (steadier on a shared machine; it includes TensorBoard's writer thread): medians with min-max, the
ratio of medians to the baseline ("ratio"), the ratio of minima ("of min", the estimate least disturbed by
other load) and the median of each round's ratio ("paired", robust to drift between rounds).
The target is ``trainkit / hand-written <= 1.10``. Progress lines go to os.devnull unless ``--show-progress``.

    python benchmarks/logging_overhead.py [--steps 1000] [--repeats 15] [--out results/logging_overhead.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import trainkit as tk  # noqa: E402

LOG_EVERY = 50


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def make_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = 32 * 100
    data = TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=32, shuffle=False)


class Task(tk.TaskModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def hand_written(steps: int, show_progress: bool) -> tuple[float, float]:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    loader = make_loader()
    start, cpu_start = time.perf_counter(), time.process_time()
    done = 0
    while done < steps:
        for x, y in loader:
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def _trainkit(steps: int, show_progress: bool, logging_on: bool) -> tuple[float, float]:
    log_dir = tempfile.mkdtemp(prefix="trainkit-bench-") if logging_on else None
    trainer = tk.Trainer(
        run_mode="step", max_steps=steps, checkpoint_dir=None, log_dir=log_dir,
        log_every_n_steps=LOG_EVERY, progress_bar=logging_on,
    )  # fmt: skip
    task, loader = Task(), make_loader()
    sink = contextlib.nullcontext() if show_progress else open(os.devnull, "w")  # noqa: SIM115
    try:
        with sink as devnull, contextlib.redirect_stderr(devnull or sys.stderr):
            start, cpu_start = time.perf_counter(), time.process_time()
            result = trainer.fit(task, loader)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)
    assert result.global_step == steps
    return elapsed / steps, cpu / steps


def trainkit_logging(steps: int, show_progress: bool) -> tuple[float, float]:
    return _trainkit(steps, show_progress, logging_on=True)


def trainkit_quiet(steps: int, show_progress: bool) -> tuple[float, float]:
    return _trainkit(steps, show_progress, logging_on=False)


CONTENDERS: dict[str, Callable[[int, bool], tuple[float, float]]] = {
    "hand-written": hand_written,
    "trainkit": trainkit_logging,
    "trainkit-quiet": trainkit_quiet,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--show-progress", action="store_true", help="let the progress lines reach stderr")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "logging_overhead.json")
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for fn in CONTENDERS.values():  # warm-up: imports (tensorboard, tqdm), allocator, code paths
        fn(200, args.show_progress)
    wall: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    cpu: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for round_ in range(args.repeats):
        names = list(CONTENDERS) if round_ % 2 == 0 else list(reversed(CONTENDERS))  # no fixed position
        for name in names:
            w, c = CONTENDERS[name](args.steps, args.show_progress)
            wall[name].append(w)
            cpu[name].append(c)
    rows = []
    for clock, times in (("wall", wall), ("cpu", cpu)):
        base, base_min = statistics.median(times["hand-written"]), min(times["hand-written"])
        for name, ts in times.items():
            rows.append({
                "clock": clock, "contender": name, "us_per_step": statistics.median(ts) * 1e6,
                "min_us": min(ts) * 1e6, "max_us": max(ts) * 1e6, "ratio": statistics.median(ts) / base,
                "ratio_of_min": min(ts) / base_min,
                "paired_ratio": statistics.median(a / b for a, b in zip(ts, times["hand-written"])),
            })  # fmt: skip
    info = {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "steps": args.steps, "repeats": args.repeats,
        "log_every_n_steps": LOG_EVERY,
        "progress": "tqdm bar" if (args.show_progress and sys.stderr.isatty()) else "compact lines",
        "target_ratio": 1.10,
    }  # fmt: skip
    print(json.dumps(info))
    print(
        f"{'clock':<5} {'contender':<15} {'us/step':>9} {'min-max':>17} {'ratio':>6} {'of min':>7} {'paired':>7}"
    )
    for r in rows:
        print(
            f"{r['clock']:<5} {r['contender']:<15} {r['us_per_step']:9.1f} "
            f"{r['min_us']:8.1f}-{r['max_us']:<8.1f} {r['ratio']:6.3f} {r['ratio_of_min']:7.3f} {r['paired_ratio']:7.3f}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"info": info, "rows": rows, "raw_s_per_step": {"wall": wall, "cpu": cpu}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
