"""EMA cost: one trainkit.EMA.update() against one optimizer step, per training step.

For each model, with gradients in place, these run interleaved (A, B, C, ... per round, after a warm-up):

    sgd step     torch.optim.SGD(momentum=0.9).step()
    adamw step   torch.optim.AdamW.step()
    ema update   trainkit.EMA.update()  (one torch._foreach_lerp_ over the float parameters, buffers copied)
    swa_utils    AveragedModel.update_parameters() with get_ema_multi_avg_fn (PyTorch's own EMA, reference)
    train step   forward + backward + SGD step + zero_grad on one batch (what a whole step costs)

Each measurement is the mean time of one call over ``calls`` back-to-back calls; a row reports the median
(min-max) over the rounds, and each ratio is the median of the per-round ratios. One intra-op thread
(``torch.set_num_threads(1)``), CPU.

    python benchmarks/ema_cost.py [--repeats 7]
    python benchmarks/ema_cost.py --smoke
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import Bench, fmt_ratio, fmt_stat, interleave, print_table, summarize
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import trainkit as tk


def mlp(width: int, depth: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def cnn_bn(channels: int, depth: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, channels, 3, padding=1)]
    for _ in range(depth):
        layers += [
            torch.nn.Conv2d(channels, channels, 3, padding=1),
            torch.nn.BatchNorm2d(channels),
            torch.nn.ReLU(),
        ]
    return torch.nn.Sequential(
        *layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 10)
    )


def narrow_deep(width: int, depth: int) -> torch.nn.Module:
    """Many small tensors: per-tensor overhead dominates."""
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


# name, builder, input shape (batch 32), calls per measurement (full run)
MODELS: list[tuple[str, Callable[[], torch.nn.Module], tuple[int, ...], int]] = [
    ("mlp 4x256", lambda: mlp(256, 4), (32, 256), 200),
    ("mlp 4x1024", lambda: mlp(1024, 4), (32, 1024), 20),
    ("mlp 4x2048", lambda: mlp(2048, 4), (32, 2048), 5),
    ("narrow 64x64+LN", lambda: narrow_deep(64, 64), (32, 64), 50),
    ("cnn 8x64 + BN", lambda: cnn_bn(64, 8), (32, 3, 16, 16), 10),
]


def per_call(fn: Callable[[], Any], calls: int) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    return run


def contenders(model: torch.nn.Module, shape: tuple[int, ...], calls: int) -> dict[str, Callable[[], float]]:
    torch.manual_seed(0)
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    F.cross_entropy(model(x), y).backward()  # gradients in place for the bare optimizer steps
    grads = {p: p.grad.clone() for p in model.parameters()}
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ema = tk.EMA(model, decay=0.999)
    swa = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    swa.update_parameters(model)  # the first call only copies; later calls average

    def train_step() -> None:
        F.cross_entropy(model(x), y).backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)
        for p, g in grads.items():  # leave gradients in place for the bare steps
            p.grad = g

    return {
        "sgd step": per_call(sgd.step, calls),
        "adamw step": per_call(adamw.step, calls),
        "ema update": per_call(ema.update, calls),
        "swa_utils ema": per_call(lambda: swa.update_parameters(model), calls),
        "train step": per_call(train_step, max(1, calls // 4)),
    }


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def main() -> None:
    torch.set_num_threads(1)  # before Bench, which records the thread count
    bench = Bench("ema_cost", __doc__, default_repeats=7, smoke_repeats=1)
    bench.settings.update({"threads": 1, "batch": 32, "decay": 0.999, "device": "cpu"})
    table = []
    for name, build, shape, calls in MODELS:
        calls = 1 if bench.smoke else calls
        model = build()
        params = sum(p.numel() for p in model.parameters())
        tensors = sum(1 for _ in model.parameters())
        buffers = sum(1 for _ in model.buffers())
        times = interleave(contenders(model, shape, calls), repeats=bench.repeats, warmup=1)
        stats = {k: summarize(v) for k, v in times.items()}
        ratios = {
            "ema/sgd": ratio(times, "ema update", "sgd step"),
            "ema/adamw": ratio(times, "ema update", "adamw step"),
            "ema/train_step": ratio(times, "ema update", "train step"),
            "ema/swa_utils": ratio(times, "ema update", "swa_utils ema"),
        }
        bench.add_row(
            {
                "model": name,
                "params": params,
                "param_tensors": tensors,
                "buffers": buffers,
                "calls_per_measurement": calls,
                "seconds_per_call": stats,
                "ratios": ratios,
            }
        )
        table.append(
            [
                name,
                f"{params / 1e6:.2f} M / {tensors}",
                fmt_stat(stats["sgd step"], 1e3, 3),
                fmt_stat(stats["adamw step"], 1e3, 3),
                fmt_stat(stats["ema update"], 1e3, 3),
                fmt_stat(stats["swa_utils ema"], 1e3, 3),
                fmt_stat(stats["train step"], 1e3, 2),
                fmt_ratio(ratios["ema/sgd"]),
                fmt_ratio(ratios["ema/adamw"]),
                f"{100 * ratios['ema/train_step']:.1f}%",
            ]
        )
    print_table(
        [
            "model",
            "params / tensors",
            "SGD step ms",
            "AdamW step ms",
            "EMA update ms",
            "swa_utils ms",
            "train step ms",
            "EMA / SGD",
            "EMA / AdamW",
            "EMA / train step",
        ],
        table,
    )
    bench.note("times in ms: median (min-max) over rounds; ratios: median of per-round ratios")
    bench.finish()


if __name__ == "__main__":
    main()
