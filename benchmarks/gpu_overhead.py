"""Per-step time of trainkit vs a hand-written loop on a CUDA device (skips without one).

Workload: MLP 256 -> 1024 -> 1024 -> 10, batch 128, AdamW, data in host memory moved to the GPU every
step (as a DataLoader would give it), in fp32 and in bf16 autocast, optionally with clip_grad + EMA.
Contenders run interleaved (A, B, A, B, ...) after a warm-up; medians with min-max are reported.

    python benchmarks/gpu_overhead.py [--steps 600] [--repeats 5] [--out results/gpu_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import trainkit as tk  # noqa: E402


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


def make_loader(steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = 128 * 50
    data = TensorDataset(torch.randn(n, 256, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=128, shuffle=True, pin_memory=True)


class Task(tk.TaskModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def hand_written(steps: int, precision: str, features: bool) -> float:
    device = torch.device("cuda")
    net = make_net().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ema_params = [p.detach().clone() for p in net.parameters()] if features else []
    params = list(net.parameters())
    loader = make_loader(steps)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    torch.cuda.synchronize()
    start = time.perf_counter()
    done = 0
    while done < steps:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if dtype is None:
                loss = F.cross_entropy(net(x), y)
            else:
                with torch.autocast("cuda", dtype=dtype):
                    loss = F.cross_entropy(net(x), y)
            loss.backward()
            if features:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if features:
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, params, 0.001)
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def with_trainkit(steps: int, precision: str, features: bool) -> float:
    trainer = tk.Trainer(
        run_mode="step", max_steps=steps, checkpoint_dir=None, log_dir=None, progress_bar=False,
        precision=precision, device="cuda", clip_grad=1.0 if features else None, use_ema=features,
    )  # fmt: skip
    task, loader = Task(), make_loader(steps)
    torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.fit(task, loader)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_overhead.json")
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    rows = []
    for precision in ("32", "bf16-mixed"):
        for features in (False, True):
            hand_written(50, precision, features), with_trainkit(50, precision, features)  # warm-up
            times: dict[str, list[float]] = {"hand-written": [], "trainkit": []}
            for _ in range(args.repeats):
                times["hand-written"].append(hand_written(args.steps, precision, features))
                times["trainkit"].append(with_trainkit(args.steps, precision, features))
            base = statistics.median(times["hand-written"])
            for name, ts in times.items():
                rows.append({
                    "precision": precision, "clip+ema": features, "contender": name,
                    "us_per_step": statistics.median(ts) * 1e6, "min_us": min(ts) * 1e6, "max_us": max(ts) * 1e6,
                    "ratio": statistics.median(ts) / base,
                })  # fmt: skip
    info = {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "device": torch.cuda.get_device_name(),
        "python": platform.python_version(), "steps": args.steps, "repeats": args.repeats,
    }  # fmt: skip
    print(json.dumps(info))
    print(f"{'precision':<11} {'clip+ema':<8} {'contender':<13} {'us/step':>9} {'min-max':>17} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['precision']:<11} {str(r['clip+ema']):<8} {r['contender']:<13} {r['us_per_step']:9.1f} "
            f"{r['min_us']:8.1f}-{r['max_us']:<8.1f} {r['ratio']:6.3f}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
