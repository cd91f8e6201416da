"""Step overhead: trainkit against the best hand-written loop, Lightning and Ignite, in one process run.

Workloads (data pre-generated in memory, a DataLoader over a TensorDataset, shuffle=True,
num_workers=0, fixed seeds, torch.set_num_threads(1)):

    W1  MLP 32->64->10, batch 32, 3000 steps, SGD lr 0.01, cross-entropy
    W2  MLP 256->1024->1024->10, batch 128, 600 steps, AdamW lr 1e-3
    W3  W1 + clip_grad=1.0 + EMA decay 0.999 every step + warmup 100 then cosine (stepped every step)
        + validation every 500 steps on 20 batches (base and EMA model where the contender can)

Contenders run interleaved (A, B, C, A, B, C, ...) after one warm-up run each. Per step is the steady
state: from the start of the second training_step to the end of fit, divided by steps - 1 (evaluations
and teardown included). Time to first step: from before the model is built to the start of the second
training_step. The ratio is the median of the per-round ratios to the hand-written loop (min-max beside it).
Beside wall time, the process CPU time per step (time.process_time, all threads) is reported: it leaves
out time spent waiting for a CPU, though not the slowdown other processes cause through shared caches.
--instructions counts executed instructions instead (valgrind), which other processes cannot disturb.

    python benchmarks/overhead.py                 # everything (several minutes)
    python benchmarks/overhead.py --workloads W1,W3 --repeats 7
    python benchmarks/overhead.py --profile       # cProfile of one trainkit run per workload, no timing
    python benchmarks/overhead.py --instructions --workloads W1,W3   # instructions per step (valgrind),
                                                  # which a busy machine can't blur; ~20 min on 2 cores
    python benchmarks/overhead.py --smoke         # a few steps of each, for CI
"""

from __future__ import annotations

import contextlib
import copy
import cProfile
import dataclasses
import hashlib
import io
import logging
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    Bench,
    fmt_ratio,
    fmt_stat,
    interleave,
    mlp,
    package_version,
    print_table,
    summarize,
    tty_stderr,
)
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk

SEED = 0
CLIP = 1.0
DECAY = 0.999
TARGETS = {("W1", "trainkit"): 1.03, ("W3", "trainkit"): 1.03, ("W1", "trainkit+logging"): 1.10}
HAND = "hand-written"


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    sizes: tuple[int, ...]
    batch: int
    steps: int
    optimizer: str
    batches_per_epoch: int
    features: bool = False  # clip + EMA + warmup/cosine + validation
    warmup: int = 100
    eval_every: int = 500
    val_batches: int = 20
    warmup_run_steps: int = 200

    def describe(self) -> str:
        text = (
            f"MLP {'->'.join(map(str, self.sizes))}, batch {self.batch}, {self.steps} steps, {self.optimizer}"
        )
        if self.features:
            text += (
                f", clip {CLIP}, EMA {DECAY}, warmup {self.warmup}+cosine, "
                f"val every {self.eval_every} on {self.val_batches} batches"
            )
        return text


WORKLOADS = {
    "W1": Workload("W1", (32, 64, 10), 32, 3000, "sgd", batches_per_epoch=500),
    "W2": Workload(
        "W2", (256, 1024, 1024, 10), 128, 600, "adamw", batches_per_epoch=100, warmup_run_steps=40
    ),
    "W3": Workload(
        "W3", (32, 64, 10), 32, 3000, "sgd", batches_per_epoch=500, features=True, warmup_run_steps=510
    ),
}
SMOKE = {
    "W1": dict(steps=40, batches_per_epoch=15, warmup_run_steps=10),
    "W2": dict(steps=6, batches_per_epoch=4, warmup_run_steps=3),
    "W3": dict(steps=40, batches_per_epoch=15, warmup=5, eval_every=15, val_batches=2, warmup_run_steps=16),
}


# -- what every contender shares: data, model, optimizer, schedule, the step's arithmetic --------------------


@dataclasses.dataclass
class Data:
    train: TensorDataset
    val: TensorDataset


def make_data(wl: Workload) -> Data:
    g = torch.Generator().manual_seed(SEED)
    n, m = wl.batch * wl.batches_per_epoch, wl.batch * wl.val_batches
    features, classes = wl.sizes[0], wl.sizes[-1]
    train = TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))
    val = TensorDataset(torch.randn(m, features, generator=g), torch.randint(0, classes, (m,), generator=g))
    return Data(train, val)


def make_net(wl: Workload) -> torch.nn.Sequential:
    return mlp(wl.sizes, SEED)


def make_optimizer(wl: Workload, params: Any) -> torch.optim.Optimizer:
    if wl.optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.01)
    return torch.optim.AdamW(params, lr=1e-3)


def make_scheduler(wl: Workload, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, wl.steps - wl.warmup))
    return tk.WarmupScheduler(opt, warmup_steps=wl.warmup, main_scheduler=cosine)


def train_loader(wl: Workload, data: Data) -> DataLoader:
    return DataLoader(data.train, batch_size=wl.batch, shuffle=True, num_workers=0)


def val_loader(wl: Workload, data: Data) -> DataLoader:
    return DataLoader(data.val, batch_size=wl.batch, shuffle=False, num_workers=0)


class Stamp:
    """Notes the time at the start of the second training step (one compare per step afterwards)."""

    __slots__ = ("calls", "first", "first_cpu")

    def __init__(self) -> None:
        self.calls = 0
        self.first = 0.0
        self.first_cpu = 0.0

    def tick(self) -> None:
        if self.calls < 2:
            self.calls += 1
            if self.calls == 2:
                self.first_cpu = time.process_time()
                self.first = time.perf_counter()


def train_loss(net: torch.nn.Module, batch: Any, stamp: Stamp) -> torch.Tensor:
    stamp.tick()
    x, y = batch
    return F.cross_entropy(net(x), y)


def val_metrics(net: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    logits = net(x)
    return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()


def digest(net: torch.nn.Module) -> str:
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


# -- the contenders: each builds everything from scratch and trains; returns the trained net ---------------


@torch.no_grad()
def hand_evaluate(net: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    # Every DataLoader iterator draws a seed from the global RNG; forking it keeps the training shuffles
    # independent of evaluation, as trainkit does (so both end with the same weights).
    with torch.random.fork_rng(devices=[]):
        return _hand_evaluate(net, loader)


def _hand_evaluate(net: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    net.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    acc_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    for batch in loader:
        loss, acc = val_metrics(net, batch)
        n = batch[0].shape[0]
        loss_sum += loss.double() * n
        acc_sum += acc.double() * n
        count += n
    net.train()
    return {"loss": float(loss_sum) / count, "acc": float(acc_sum) / count}


def run_hand_written(wl: Workload, data: Data, stamp: Stamp) -> torch.nn.Module:
    """The best plain loop we know: foreach clipping, one fused EMA lerp, zero_grad(set_to_none=True)."""
    net = make_net(wl)
    params = list(net.parameters())
    opt = make_optimizer(wl, params)
    sched = make_scheduler(wl, opt) if wl.features else None
    ema_net = copy.deepcopy(net).requires_grad_(False).eval() if wl.features else None
    ema_params = list(ema_net.parameters()) if ema_net is not None else []
    loader = train_loader(wl, data)
    vloader = val_loader(wl, data) if wl.features else None
    net.train()
    step = 0
    while step < wl.steps:
        for batch in loader:
            loss = train_loss(net, batch, stamp)
            loss.backward()
            if wl.features:
                torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
            opt.step()
            if sched is not None:
                sched.step()
            if ema_net is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, params, 1.0 - DECAY)
            opt.zero_grad(set_to_none=True)
            step += 1
            if vloader is not None and step % wl.eval_every == 0:
                hand_evaluate(net, vloader)
                hand_evaluate(ema_net, vloader)  # type: ignore[arg-type]
            if step == wl.steps:
                break
    return net


class TkTask(tk.TaskModule):
    def __init__(self, wl: Workload, stamp: Stamp) -> None:
        super().__init__()
        self.net = make_net(wl)
        self.wl = wl
        self.stamp = stamp

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return train_loss(self.net, batch, self.stamp)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        loss, acc = val_metrics(self.net, batch)
        return {"loss": loss, "acc": acc}

    def configure_optimizers(self) -> Any:
        opt = make_optimizer(self.wl, self.parameters())
        if not self.wl.features:
            return opt
        return {"optimizer": opt, "lr_scheduler": make_scheduler(self.wl, opt)}


def run_trainkit(wl: Workload, data: Data, stamp: Stamp, logging_on: bool = False) -> torch.nn.Module:
    task = TkTask(wl, stamp)
    features: dict[str, Any] = {}
    if wl.features:
        features = dict(
            run_mode="step", eval_interval=wl.eval_every, clip_grad=CLIP, use_ema=True, ema_decay=DECAY
        )
    log_dir = tempfile.mkdtemp(prefix="tk-bench-") if logging_on else None
    try:
        with tty_stderr() if logging_on else contextlib.nullcontext():
            trainer = tk.Trainer(
                max_steps=wl.steps, checkpoint_dir=None, log_dir=log_dir, progress_bar=logging_on,
                log_every_n_steps=50, **features,
            )  # fmt: skip
            trainer.fit(task, train_loader(wl, data), val_loader(wl, data) if wl.features else None)
    finally:
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)
    return task.net


def run_lightning(wl: Workload, data: Data, stamp: Stamp) -> torch.nn.Module:
    import lightning.pytorch as pl

    for name in (
        "lightning.pytorch",
        "lightning.fabric",
    ):  # "GPU available: False", tips, "max_steps reached"
        logging.getLogger(name).setLevel(logging.ERROR)

    class PlTask(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(wl)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return train_loss(self.net, batch, stamp)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            loss, acc = val_metrics(self.net, batch)
            self.log_dict({"val_loss": loss, "val_acc": acc}, batch_size=batch[0].shape[0])

        def configure_optimizers(self) -> Any:
            opt = make_optimizer(wl, self.parameters())
            if not wl.features:
                return opt
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": make_scheduler(wl, opt), "interval": "step"},
            }

    task = PlTask()
    callbacks: list[Any] = []
    extra: dict[str, Any] = {}
    if wl.features:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=DECAY))
        extra = dict(
            gradient_clip_val=CLIP, val_check_interval=wl.eval_every, check_val_every_n_epoch=None,
            limit_val_batches=wl.val_batches,
        )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "does not have many workers" and friends
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=wl.steps, max_epochs=-1, enable_progress_bar=False,
            logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks, **extra,
        )  # fmt: skip
        trainer.fit(task, train_loader(wl, data), val_loader(wl, data) if wl.features else None)
    return task.net


def run_ignite(wl: Workload, data: Data, stamp: Stamp) -> torch.nn.Module:
    from ignite.engine import Engine, Events, create_supervised_evaluator
    from ignite.handlers import EMAHandler
    from ignite.metrics import Accuracy, Loss

    net = make_net(wl)
    params = list(net.parameters())
    opt = make_optimizer(wl, params)
    sched = make_scheduler(wl, opt) if wl.features else None
    features = wl.features

    def update(engine: Engine, batch: Any) -> torch.Tensor:
        loss = train_loss(net, batch, stamp)
        loss.backward()
        if features:
            torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        return loss

    engine = Engine(update)
    if features:
        ema = EMAHandler(net, momentum=1.0 - DECAY)
        ema.attach(engine)
        metrics = {"loss": Loss(F.cross_entropy), "acc": Accuracy()}
        evaluators = [create_supervised_evaluator(m, metrics=metrics) for m in (net, ema.ema_model)]
        vloader = val_loader(wl, data)

        @engine.on(Events.ITERATION_COMPLETED(every=wl.eval_every))
        def _validate(_: Engine) -> None:
            for evaluator in evaluators:
                evaluator.run(vloader)
            net.train()

    net.train()
    engine.run(train_loader(wl, data), max_iters=wl.steps)
    return net


CONTENDERS: dict[str, tuple[Callable[..., torch.nn.Module], str | None]] = {
    HAND: (run_hand_written, None),
    "trainkit": (run_trainkit, None),
    "trainkit+logging": (lambda wl, data, stamp: run_trainkit(wl, data, stamp, logging_on=True), None),
    "lightning": (run_lightning, "lightning"),
    "ignite": (run_ignite, "pytorch-ignite"),
}


def contenders_for(wl: Workload) -> list[str]:
    names = [HAND, "trainkit", "lightning", "ignite"]
    if wl.name == "W1":
        names.insert(2, "trainkit+logging")
    return names


def measure(fn: Callable[..., torch.nn.Module], wl: Workload, data: Data) -> dict[str, Any]:
    stamp = Stamp()
    start = time.perf_counter()
    net = fn(wl, data, stamp)
    end = time.perf_counter()
    end_cpu = time.process_time()
    if stamp.calls < 2:
        raise RuntimeError("the contender ran fewer than two training steps")
    return {
        "first_step_s": stamp.first - start,
        "per_step_s": (end - stamp.first) / (wl.steps - 1),
        "cpu_per_step_s": (end_cpu - stamp.first_cpu) / (wl.steps - 1),
        "digest": digest(net),
    }


def _profile(fn: Callable[..., torch.nn.Module], wl: Workload, data: Data) -> pstats.Stats:
    profiler = cProfile.Profile()
    profiler.enable()
    fn(wl, data, Stamp())
    profiler.disable()
    return pstats.Stats(profiler, stream=io.StringIO())


def _calls(stats: pstats.Stats) -> dict[str, int]:
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    return {
        f"{path.split('site-packages/')[-1]}:{line}({func})": v[1] for (path, line, func), v in table.items()
    }


def profile_trainkit(wl: Workload, data: Data) -> None:
    """cProfile of one trainkit run (after a warm-up of both), and the Python calls per step that trainkit
    makes beyond the hand-written loop: a count, so the machine's load can't blur it."""
    for fn in (run_trainkit, run_hand_written):
        fn(dataclasses.replace(wl, steps=wl.warmup_run_steps), data, Stamp())
    tk_stats, hand_stats = _profile(run_trainkit, wl, data), _profile(run_hand_written, wl, data)
    out = io.StringIO()
    tk_stats.stream = out  # type: ignore[attr-defined]
    tk_stats.sort_stats("tottime").print_stats(20)
    print(f"## cProfile of trainkit on {wl.name} ({wl.steps} steps), by own time\n{out.getvalue()}")
    tk_calls, hand_calls = _calls(tk_stats), _calls(hand_stats)
    extra = sum(tk_calls.values()) - sum(hand_calls.values())
    print(
        f"## {wl.name}: trainkit makes {extra / wl.steps:+.1f} Python-level calls per step beyond hand-written"
    )
    diffs = sorted((tk_calls.get(k, 0) - hand_calls.get(k, 0), k) for k in set(tk_calls) | set(hand_calls))
    for count, name in diffs[::-1]:
        if abs(count) >= wl.steps // 2:
            print(f"  {count / wl.steps:+6.2f}/step  {name}")


def scaled(stat: dict[str, float], factor: float) -> dict[str, float]:
    return {k: (v * factor if k != "n" else v) for k, v in stat.items()}


def summarize_workload(wl: Workload, names: list[str], results: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One JSON row per contender: wall and CPU time per step, ratios paired by round, first-step time."""
    hand = results[HAND]
    rows = []
    for name in names:
        runs = results[name]
        row: dict[str, Any] = {"workload": wl.name, "contender": name}
        for key, label in (("per_step_s", "wall"), ("cpu_per_step_s", "cpu")):
            row[f"{label}_us_per_step"] = scaled(summarize([r[key] for r in runs]), 1e6)
            row[f"{label}_ratio"] = (
                summarize([r[key] / h[key] for r, h in zip(runs, hand)]) if name != HAND else None
            )
            row[f"{label}_samples_us"] = [round(r[key] * 1e6, 2) for r in runs]
        row["first_step_ms"] = scaled(summarize([r["first_step_s"] for r in runs]), 1e3)
        target = TARGETS.get((wl.name, name))
        row["target"] = target
        row["meets_target"] = (
            row["wall_ratio"]["median"] <= target if (target is not None and row["wall_ratio"]) else None
        )
        row["final_weights_digest"] = runs[0]["digest"]
        row["same_weights_as_hand_written"] = runs[0]["digest"] == hand[0]["digest"]
        rows.append(row)
    return rows


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    def ratio(stat: dict[str, float] | None, target: float | None) -> str:
        if stat is None:
            return "1 (reference)"
        return f"{fmt_ratio(stat['median'], target)} [{stat['min']:.3f}-{stat['max']:.3f}]"

    return [
        [
            r["workload"],
            r["contender"],
            fmt_stat(r["wall_us_per_step"]),
            ratio(r["wall_ratio"], r["target"]),
            fmt_stat(r["cpu_us_per_step"]),
            ratio(r["cpu_ratio"], r["target"]),
            fmt_stat(r["first_step_ms"]),
            "yes" if r["same_weights_as_hand_written"] else "no",
        ]
        for r in rows
    ]


INSTRUCTION_STEPS = {"W1": (100, 1100), "W2": (10, 60), "W3": (100, 1100)}
SMOKE_INSTRUCTION_STEPS = (3, 8)


def run_single(spec: str) -> int:
    """``--single CONTENDER:WORKLOAD:STEPS``: one untimed run, for a profiler or valgrind to watch."""
    contender, name, steps = spec.split(":")
    torch.set_num_threads(1)
    wl = dataclasses.replace(WORKLOADS[name], steps=int(steps))
    CONTENDERS[contender][0](wl, make_data(wl), Stamp())
    return 0


def count_instructions(contender: str, workload: str, steps: int) -> int:
    """Instructions the whole process executes (all threads), counted by valgrind's cachegrind."""
    command = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, os.path.abspath(__file__), "--single", f"{contender}:{workload}:{steps}",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    match = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"valgrind run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def instructions_mode(
    bench: Bench, workloads: list[Workload], names_for: Callable[[Workload], list[str]]
) -> None:
    """Executed instructions per step, from two run lengths (their difference cancels imports and setup):
    a count that other processes on the machine cannot disturb, unlike time."""
    jobs = []
    for wl in workloads:
        short, long = SMOKE_INSTRUCTION_STEPS if bench.smoke else INSTRUCTION_STEPS[wl.name]
        jobs += [(wl.name, name, steps) for name in names_for(wl) for steps in (short, long)]
    print(f"## {len(jobs)} valgrind runs, {bench.args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=bench.args.jobs) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: count_instructions(job[1], job[0], job[2]), jobs)))
    table = []
    for wl in workloads:
        short, long = SMOKE_INSTRUCTION_STEPS if bench.smoke else INSTRUCTION_STEPS[wl.name]
        per_step = {
            name: (counts[(wl.name, name, long)] - counts[(wl.name, name, short)]) / (long - short)
            for name in names_for(wl)
        }
        for name, value in per_step.items():
            ratio = value / per_step[HAND] if name != HAND else None
            target = TARGETS.get((wl.name, name))
            bench.add_row({
                "workload": wl.name, "contender": name, "instructions_per_step": value, "instruction_ratio": ratio,
                "steps": [short, long], "target": target,
                "meets_target": (ratio <= target) if (ratio is not None and target is not None) else None,
            })  # fmt: skip
            table.append(
                [
                    wl.name,
                    name,
                    f"{value:,.0f}",
                    "1 (reference)" if ratio is None else fmt_ratio(ratio, target),
                ]
            )
    print()
    print_table(["workload", "contender", "instructions/step", "ratio to hand-written"], table)


def main(argv: list[str] | None = None) -> int:
    def extra(parser: Any) -> None:
        parser.add_argument("--workloads", default="W1,W2,W3", help="comma-separated subset of W1,W2,W3")
        parser.add_argument(
            "--contenders", default=None, help="comma-separated subset (hand-written always runs)"
        )
        parser.add_argument(
            "--profile", action="store_true", help="print a cProfile of trainkit per workload"
        )
        parser.add_argument(
            "--instructions", action="store_true",
            help="count executed instructions per step under valgrind instead of timing (slow; load-proof)",
        )  # fmt: skip
        parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at a time (--instructions)")
        parser.add_argument("--single", default=None, help="CONTENDER:WORKLOAD:STEPS, one untimed run")

    args = sys.argv[1:] if argv is None else list(argv)
    if "--single" in args:
        return run_single(args[args.index("--single") + 1])
    torch.set_num_threads(1)
    name = "overhead_instructions" if "--instructions" in args else "overhead"
    bench = Bench(
        name, __doc__, default_repeats=5, smoke_repeats=1, extra_args=extra, argv=argv, script="overhead"
    )
    names = [w.strip() for w in bench.args.workloads.split(",") if w.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; choose among {sorted(WORKLOADS)}")
    wanted = None if bench.args.contenders is None else {c.strip() for c in bench.args.contenders.split(",")}
    workloads = [
        dataclasses.replace(WORKLOADS[n], **SMOKE[n]) if bench.smoke else WORKLOADS[n] for n in names
    ]
    bench.settings.update(
        workloads={wl.name: dataclasses.asdict(wl) for wl in workloads}, seed=SEED, threads=1,
        warmup_runs=1, per_step="(end of fit - start of 2nd training_step) / (steps - 1)",
        ratio="median over rounds of contender / hand-written in the same round",
    )  # fmt: skip
    missing_peers = {
        name for name, (_, dist) in CONTENDERS.items() if dist is not None and package_version(dist) is None
    }
    for name in sorted(missing_peers):
        bench.note(f"{name} is not installed: skipped (pip install 'trainkit[bench]')")
    if bench.args.instructions:
        if shutil.which("valgrind") is None:
            bench.note("valgrind is not installed: no instruction counts")
        else:
            bench.settings["instruction_steps"] = {
                wl.name: SMOKE_INSTRUCTION_STEPS if bench.smoke else INSTRUCTION_STEPS[wl.name]
                for wl in workloads
            }
            instructions_mode(
                bench,
                workloads,
                lambda wl: [
                    n for n in contenders_for(wl)
                    if n not in missing_peers and (n == HAND or n in (wanted or {"trainkit", "trainkit+logging"}))
                ],
            )  # fmt: skip
        bench.finish()
        return 0

    if "lightning" not in missing_peers:
        bench.note(
            "Lightning W3 uses lightning.pytorch.callbacks.EMAWeightAveraging, which validates only the EMA "
            "weights (swapped in) and copies them into the model at the end of fit; hand-written, trainkit "
            "and Ignite validate the base and the EMA model"
        )
    if "ignite" not in missing_peers:
        bench.note(
            "W3 'same weights': hand-written and trainkit keep evaluation from drawing on the training RNG; "
            "Ignite's evaluator (a new DataLoader iterator) draws a seed from it, so later shuffles differ"
        )

    if bench.args.profile:
        for wl in workloads:
            profile_trainkit(wl, make_data(wl))
        return 0

    table: list[list[Any]] = []
    for wl in workloads:
        data = make_data(wl)
        names_here = [
            n
            for n in contenders_for(wl)
            if n not in missing_peers and (wanted is None or n == HAND or n in wanted)
        ]
        warm = dataclasses.replace(wl, steps=wl.warmup_run_steps)
        print(f"## {wl.name}: {wl.describe()} | contenders {names_here}", flush=True)
        for name in names_here:  # warm-up, untimed: imports, allocator, first-call caches
            measure(CONTENDERS[name][0], warm, data)
        results = interleave(
            {n: (lambda fn=CONTENDERS[n][0], wl=wl, data=data: measure(fn, wl, data)) for n in names_here},
            repeats=bench.repeats,
            warmup=0,
        )
        bench.rows.extend(summarize_workload(wl, names_here, results))
        table.extend(table_rows(bench.rows[-len(names_here) :]))
    headers = ["workload", "contender", "wall us/step (min-max)", "wall ratio [min-max]",
               "CPU us/step (min-max)", "CPU ratio [min-max]", "first step ms (min-max)",
               "same weights"]  # fmt: skip
    print()
    print_table(headers, table)
    bench.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
