"""DDP step overhead: trainkit (distributed=True) against a hand-written DDP loop, 2 gloo ranks on CPU.

Both ranks are started here (torch.multiprocessing spawn) and join one gloo process group that this
script creates, so both contenders run on the same group and trainkit neither creates nor destroys it.
Workloads (data in memory, a DataLoader over a TensorDataset with a DistributedSampler, shuffle=True,
num_workers=0, torch.set_num_threads(1) per rank, SGD lr 0.01, cross-entropy):

    D1  MLP 32->64->10,              per-rank batch 32, 2000 steps   (communication-bound: tiny grads)
    D2  MLP 256->1024->1024->10,     per-rank batch 64,  300 steps   (~1.3M parameters to all-reduce)

The hand-written loop is what a careful user writes: DDP(net), sampler.set_epoch every pass,
forward -> loss -> backward -> step -> zero_grad(set_to_none=True). trainkit adds its stop vote, so
that a stop requested on any rank ends every rank after the same step: two flags that ride as one more
gradient in DDP's own all-reduce. A third contender adds a callback with an (empty) on_batch_end: code
that runs after the gradients went out, so each step then ends with one small blocking all-reduce; the
1.05 target is for plain trainkit, the hooked row shows what that vote costs.
The contenders run interleaved (hand, trainkit, hooked, hand, ...) after one warm-up run each. Per step
is the steady state: from the start of the second training step to the end of training on that rank,
divided by steps - 1; each rank measures its own and the slower rank counts. The ratio is the median of
the per-round ratios (min-max beside it). CPU time per step (time.process_time) is shown too: on a busy
machine it is less disturbed by other processes than wall time, but it leaves out time spent waiting on
the other rank.

    python benchmarks/ddp_overhead.py              # about a minute on an idle 2-core machine
    python benchmarks/ddp_overhead.py --repeats 9 --workloads D2
    python benchmarks/ddp_overhead.py --smoke      # a few steps, for CI
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from common import Bench, fmt_ratio, fmt_stat, interleave, mlp, print_table, summarize
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import trainkit as tk

SEED = 0
WORLD = 2
TARGET = 1.05
HAND = "hand-written DDP"


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    sizes: tuple[int, ...]
    batch: int  # per rank
    steps: int
    batches_per_epoch: int  # per rank

    def describe(self) -> str:
        return f"MLP {'->'.join(map(str, self.sizes))}, batch {self.batch}/rank x {WORLD}, {self.steps} steps"


WORKLOADS = {
    "D1": Workload("D1", (32, 64, 10), 32, 2000, batches_per_epoch=250),
    "D2": Workload("D2", (256, 1024, 1024, 10), 64, 300, batches_per_epoch=50),
}
SMOKE = {"D1": dict(steps=20, batches_per_epoch=8), "D2": dict(steps=6, batches_per_epoch=4)}


def make_data(wl: Workload) -> TensorDataset:
    g = torch.Generator().manual_seed(SEED)
    n = wl.batch * wl.batches_per_epoch * WORLD
    return TensorDataset(
        torch.randn(n, wl.sizes[0], generator=g), torch.randint(0, wl.sizes[-1], (n,), generator=g)
    )


def make_net(wl: Workload) -> torch.nn.Sequential:
    return mlp(wl.sizes, SEED)


def make_loader(wl: Workload, data: TensorDataset, sampler: bool) -> DataLoader:
    """The hand loop brings its own DistributedSampler; trainkit gets a plain shuffling loader and adds it."""
    if sampler:
        ds: DistributedSampler[Any] = DistributedSampler(
            data, num_replicas=WORLD, rank=dist.get_rank(), seed=0
        )
        return DataLoader(data, batch_size=wl.batch, sampler=ds)
    return DataLoader(data, batch_size=wl.batch, shuffle=True)


class Stamp:
    """The time at the start of the second training step."""

    __slots__ = ("calls", "first", "first_cpu")

    def __init__(self) -> None:
        self.calls, self.first, self.first_cpu = 0, 0.0, 0.0

    def tick(self) -> None:
        if self.calls < 2:
            self.calls += 1
            if self.calls == 2:
                self.first_cpu, self.first = time.process_time(), time.perf_counter()


def train_loss(net: torch.nn.Module, batch: Any, stamp: Stamp) -> torch.Tensor:
    stamp.tick()
    x, y = batch
    return F.cross_entropy(net(x), y)


class _Forward(torch.nn.Module):
    """DDP's forward runs the loss, as trainkit's wrapper does; the work per step is the same."""

    def __init__(self, net: torch.nn.Module, stamp: Stamp) -> None:
        super().__init__()
        self.net, self.stamp = net, stamp

    def forward(self, batch: Any) -> torch.Tensor:
        return train_loss(self.net, batch, self.stamp)


def run_hand_written(wl: Workload, data: TensorDataset, stamp: Stamp) -> torch.nn.Module:
    net = make_net(wl)
    model = DistributedDataParallel(_Forward(net, stamp))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loader = make_loader(wl, data, sampler=True)
    step, epoch = 0, 0
    while step < wl.steps:
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        for batch in loader:
            loss = model(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == wl.steps:
                break
        epoch += 1
    dist.barrier()  # trainkit's fit ends with one too: the rank's training is over when all ranks are
    return net


class TkTask(tk.TaskModule):
    def __init__(self, wl: Workload, stamp: Stamp) -> None:
        super().__init__()
        self.net, self.stamp = make_net(wl), stamp

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return train_loss(self.net, batch, self.stamp)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class AfterStep(tk.Callback):
    """A hook that runs after every optimizer step: the vote can no longer ride with the gradients."""

    def on_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass


def run_trainkit(
    wl: Workload, data: TensorDataset, stamp: Stamp, callbacks: tuple[tk.Callback, ...] = ()
) -> torch.nn.Module:
    task = TkTask(wl, stamp)
    trainer = tk.Trainer(
        max_steps=wl.steps, distributed=True, checkpoint_dir=None, log_dir=None, progress_bar=False,
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(task, make_loader(wl, data, sampler=False))
    return task.net


def run_trainkit_hooked(wl: Workload, data: TensorDataset, stamp: Stamp) -> torch.nn.Module:
    return run_trainkit(wl, data, stamp, (AfterStep(),))


HOOKED = "trainkit + on_batch_end hook"
CONTENDERS = {HAND: run_hand_written, "trainkit": run_trainkit, HOOKED: run_trainkit_hooked}
MEASURED = ("trainkit", HOOKED)  # the rows with a ratio; the target applies to "trainkit"


def digest(net: torch.nn.Module) -> str:
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def measure(fn: Any, wl: Workload, data: TensorDataset) -> dict[str, Any]:
    stamp = Stamp()
    net = fn(wl, data, stamp)
    end, end_cpu = time.perf_counter(), time.process_time()
    return {
        "per_step_s": (end - stamp.first) / (wl.steps - 1),
        "cpu_per_step_s": (end_cpu - stamp.first_cpu) / (wl.steps - 1),
        "digest": digest(net),
    }


def rank_main(rank: int, port: int, workloads: list[Workload], repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results: dict[str, Any] = {}
    for wl in workloads:
        data = make_data(wl)
        contenders = {
            name: (lambda fn=fn, wl=wl, data=data: measure(fn, wl, data)) for name, fn in CONTENDERS.items()
        }
        results[wl.name] = interleave(contenders, repeats=repeats, warmup=1)
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    bench = Bench(
        "ddp_overhead",
        __doc__,
        default_repeats=5,
        extra_args=lambda p: p.add_argument("--workloads", default=",".join(WORKLOADS)),
    )
    names = bench.args.workloads.split(",")
    workloads = [
        dataclasses.replace(WORKLOADS[n], **SMOKE[n]) if bench.smoke else WORKLOADS[n] for n in names
    ]
    bench.settings.update(
        world_size=WORLD,
        backend="gloo",
        target=TARGET,
        workloads={w.name: dataclasses.asdict(w) for w in workloads},
    )
    with tempfile.TemporaryDirectory(prefix="tk-ddp-bench-") as tmp:
        mp.spawn(rank_main, args=(free_port(), workloads, bench.repeats, tmp), nprocs=WORLD, join=True)
        per_rank = []
        for r in range(WORLD):
            with open(os.path.join(tmp, f"rank{r}.json"), encoding="utf-8") as f:
                per_rank.append(json.load(f))

    table = []
    for wl in workloads:
        # Each round: the slower rank's per-step time (the job goes at that pace).
        rounds = {
            name: [
                {
                    k: max(per_rank[r][wl.name][name][i][k] for r in range(WORLD))
                    for k in ("per_step_s", "cpu_per_step_s")
                }
                for i in range(bench.repeats)
            ]
            for name in CONTENDERS
        }
        digests = {name: per_rank[0][wl.name][name][0]["digest"] for name in CONTENDERS}
        same = len(set(digests.values())) == 1
        per_round = {
            name: [t["per_step_s"] / h["per_step_s"] for t, h in zip(rounds[name], rounds[HAND])]
            for name in MEASURED
        }
        for name in CONTENDERS:
            wall = summarize([r["per_step_s"] for r in rounds[name]])
            cpu = summarize([r["cpu_per_step_s"] for r in rounds[name]])
            ratios = per_round.get(name, [])
            row_ratio = statistics.median(ratios) if ratios else None
            bench.add_row(
                {
                    "workload": wl.name,
                    "describe": wl.describe(),
                    "contender": name,
                    "per_step_s": wall,
                    "cpu_per_step_s": cpu,
                    "ratio_to_hand": row_ratio,
                    "ratio_min_max": [min(ratios), max(ratios)] if ratios else None,
                    "digest": digests[name],
                }
            )
            table.append(
                [
                    wl.name,
                    name,
                    fmt_stat(wall, 1e3, 3),
                    fmt_stat(cpu, 1e3, 3),
                    fmt_ratio(row_ratio, TARGET if name == "trainkit" else None)
                    + (f" [{min(ratios):.3f}-{max(ratios):.3f}]" if ratios else ""),
                ]
            )
        if not same:
            bench.note(f"{wl.name}: the contenders' final weights differ: {digests}")
        else:
            bench.note(f"{wl.name}: all contenders end with identical weights (sha256 {digests[HAND]})")
    for wl in workloads:
        print(f"# {wl.name}: {wl.describe()}")
    print_table(["workload", "contender", "ms/step (min-max)", "CPU ms/step", "trainkit / hand"], table)
    bench.finish()


if __name__ == "__main__":
    main()
