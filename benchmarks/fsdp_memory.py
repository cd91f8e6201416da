"""Memory per rank and step time: trainkit with strategy="fsdp" against strategy="ddp", 2 gloo ranks on CPU.

The model is a stack of residual MLP blocks (LayerNorm, Linear d->4d, GELU, Linear 4d->d), the blocks
as ``fsdp_units``; AdamW and EMA on, so a rank holds parameters, gradients, two AdamW moments and the
EMA: five copies of the weights under DDP, a 1/world_size share of each under FSDP (plus the unit being
gathered, and DDP's gradient buckets under DDP).

    M1  d=1024, 8 blocks: 67.2M parameters, 269 MB of fp32 weights

Each contender runs in its own pair of processes (so that one's freed pages are not the other's peak),
alternating ddp, fsdp, ddp, ... for ``--repeats`` rounds. Per rank, three memory numbers:

- state: bytes of the tensors this rank holds after training (its parameters, AdamW state and EMA, each
  counted from the local shard under FSDP) plus the gradients, counted as the parameters' size;
- peak RSS while training: the process's resident-set high-water mark (VmHWM), reset through
  /proc/self/clear_refs once the first optimizer step is done (after ``malloc_trim`` has handed freed heap
  pages back, such as the whole model's before sharding), read after the last: everything resident while
  training (the interpreter and torch, ~0.3 GB, included: activations, communication buffers, slack);
- peak RSS over the whole run, model construction included: each rank builds the whole model before
  sharding it (trainkit takes the module as the user built it), so FSDP's construction peak is DDP's.

Step time is the steady state (from the start of the second step to the end of the last, the slower
rank), and the FSDP/DDP ratio is the median of the per-round ratios. On 2 CPU cores the ranks share the
cores, so the time ratio says what sharding costs in communication here, not on GPUs with fast links.

    python benchmarks/fsdp_memory.py               # about 2-3 minutes on an idle 2-core machine
    python benchmarks/fsdp_memory.py --smoke       # a tiny model, a few steps, for CI
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import socket
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from common import Bench, fmt_ratio, fmt_stat, print_table, summarize
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk

SEED = 0
WORLD = 2
MB = 1e6
SIZES = {"M1": dict(d=1024, blocks=8, batch=8, steps=6)}
SMOKE = {"M1": dict(d=64, blocks=2, batch=4, steps=3)}


class Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Stack(tk.TaskModule):
    fsdp_units = (Block,)

    def __init__(self, d: int, blocks: int) -> None:
        super().__init__()
        torch.manual_seed(SEED)
        self.blocks = torch.nn.Sequential(*(Block(d) for _ in range(blocks)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.blocks(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def vm_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert match is not None
    return int(match[1])


class Meter(tk.Callback):
    """Resets the RSS high-water mark after the first optimizer step; times the steps after it."""

    def __init__(self) -> None:
        self.start = 0.0
        self.hwm_before = 0

    def on_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 1 and not self.start:
            self.hwm_before = vm_kib("VmHWM")
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages (the whole model, before sharding) back
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.start = time.perf_counter()


def local_bytes(tensors: Any) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.to_local() if isinstance(t, DTensor) else t
            total += t.numel() * t.element_size()
    return total


def rank_main(rank: int, port: int, strategy: str, size: dict[str, int], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    d, n = size["d"], size["batch"] * size["steps"] * WORLD
    g = torch.Generator().manual_seed(SEED)
    data = TensorDataset(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g))
    task = Stack(d, size["blocks"])
    meter = Meter()
    trainer = tk.Trainer(
        max_steps=size["steps"], distributed=True, strategy=strategy, use_ema=True, ema_decay=0.99,
        checkpoint_dir=None, log_dir=None, progress_bar=False, callbacks=[meter],
    )  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=size["batch"]))
    elapsed = time.perf_counter() - meter.start
    hwm_train = vm_kib("VmHWM")
    params = local_bytes(task.parameters())
    optim = local_bytes(v for s in trainer.optimizer.state.values() for v in s.values())
    ema_module = trainer.ema_module
    assert ema_module is not None
    ema = local_bytes(ema_module.parameters())
    result = {
        "strategy": strategy,
        "rank": rank,
        "params_mb": params / MB,
        "state_mb": (2 * params + optim + ema) / MB,  # + gradients, the size of the parameters
        "peak_train_mb": hwm_train * 1024 / MB,
        "peak_total_mb": max(meter.hwm_before, hwm_train) * 1024 / MB,
        "per_step_s": elapsed / (size["steps"] - 1),
        "full_params": sum(p.numel() for p in Stack(d, size["blocks"]).parameters()),
    }
    with open(os.path.join(out, f"{strategy}_rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(strategy: str, size: dict[str, int]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="tk-fsdp-bench-") as tmp:
        mp.spawn(rank_main, args=(free_port(), strategy, size, tmp), nprocs=WORLD, join=True)
        results = []
        for r in range(WORLD):
            with open(os.path.join(tmp, f"{strategy}_rank{r}.json"), encoding="utf-8") as f:
                results.append(json.load(f))
    return results


def main() -> None:
    bench = Bench("fsdp_memory", __doc__, default_repeats=2)
    name = "M1"
    size = SMOKE[name] if bench.smoke else SIZES[name]
    bench.settings.update(world_size=WORLD, backend="gloo", model=name, size=size, optimizer="AdamW", ema=True)
    rounds: dict[str, list[list[dict[str, Any]]]] = {"ddp": [], "fsdp": []}
    for _ in range(bench.repeats):
        for strategy in ("ddp", "fsdp"):
            rounds[strategy].append(run_pair(strategy, size))
    ratios = [
        max(r["per_step_s"] for r in f) / max(r["per_step_s"] for r in dd)
        for dd, f in zip(rounds["ddp"], rounds["fsdp"])
    ]
    table = []
    stats: dict[str, dict[str, Any]] = {}
    for strategy, runs in rounds.items():
        # per rank and round: the larger rank (rank 0 holds the larger shard when a dim does not divide)
        row = {
            key: summarize([max(r[key] for r in run) for run in runs])
            for key in ("params_mb", "state_mb", "peak_train_mb", "peak_total_mb", "per_step_s")
        }
        stats[strategy] = row
        bench.add_row({"strategy": strategy, "full_params": runs[0][0]["full_params"], **row})
    for strategy, row in stats.items():
        memory_ratio = {
            key: row[key]["median"] / stats["ddp"][key]["median"]
            for key in ("params_mb", "state_mb", "peak_train_mb", "peak_total_mb")
        }
        table.append([
            strategy,
            fmt_stat(row["params_mb"], 1, 1), fmt_stat(row["state_mb"], 1, 1),
            fmt_stat(row["peak_train_mb"], 1, 0), fmt_stat(row["peak_total_mb"], 1, 0),
            fmt_stat(row["per_step_s"], 1e3, 0),
            f"{memory_ratio['state_mb']:.3f}x / {memory_ratio['peak_train_mb']:.3f}x",
            fmt_ratio(statistics.median(ratios)) if strategy == "fsdp" else "-",
        ])  # fmt: skip
    bench.settings["fsdp_over_ddp"] = {
        "state": stats["fsdp"]["state_mb"]["median"] / stats["ddp"]["state_mb"]["median"],
        "peak_train_rss": stats["fsdp"]["peak_train_mb"]["median"] / stats["ddp"]["peak_train_mb"]["median"],
        "peak_total_rss": stats["fsdp"]["peak_total_mb"]["median"] / stats["ddp"]["peak_total_mb"]["median"],
        "step_time": statistics.median(ratios),
        "step_time_min_max": [min(ratios), max(ratios)],
    }
    params = rounds["ddp"][0][0]["full_params"]
    print(f"# {name}: d={size['d']}, {size['blocks']} blocks, {params / 1e6:.1f}M parameters, "
          f"batch {size['batch']}/rank x {WORLD}, {size['steps']} steps, AdamW + EMA")  # fmt: skip
    print_table(
        ["strategy", "params MB/rank", "state MB/rank", "peak RSS in training MB", "peak RSS whole run MB",
         "ms/step", "FSDP/DDP state / peak", "FSDP/DDP step time"],
        table,
    )  # fmt: skip
    bench.finish()


if __name__ == "__main__":
    main()
