"""One rank of an FSDP test run; tests/test_fsdp.py launches it and asserts on what it writes.

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py parts OUT_DIR
    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py trainer OUT_DIR
    python -m torch.distributed.run --nproc_per_node=1 tests/fsdp_worker.py reshard OUT_DIR   # after trainer
    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py s3 OUT_DIR S3_URL  # moto_server

``parts``: trainkit.fsdp's pieces in a hand-written loop (the same loop the Trainer runs), next to the
same loop under DDP, from the same seed and data. ``trainer``: ``Trainer(strategy="fsdp")`` fits next to
``strategy="ddp"`` ones, an interrupted and resumed fit, a signal, an early stop. Each rank saves a
``torch.save`` file of plain data.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import trainkit as tk
from trainkit.config import TrainerConfig
from trainkit.distributed import average_gradients
from trainkit.ema import EMA
from trainkit.fsdp import (
    FSDPParallel,
    clip_grad_norm,
    load_model_state,
    load_optimizer_state,
    local_numel,
    model_state,
    optimizer_state,
)

torch.set_num_threads(1)

FEATURES, HIDDEN, CLASSES = 8, 12, 3
BATCH = 4  # per rank


class Block(torch.nn.Module):
    """A residual MLP block; its first layer's weight has 7 rows: shards of 4 and 3 on two ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(HIDDEN, 7)
        self.down = torch.nn.Linear(7, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_dtype = self.up.weight.dtype  # the dtype it computes with (bf16 under bf16-mixed)
        return x + self.down(torch.tanh(self.up(x)))


class Net(tk.TaskModule):
    """Embedding layer, two Blocks, a 3-row head, and a one-element scale (rank 1's shard of it is empty)."""

    fsdp_units = (Block,)

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(dropout)  # draws from each rank's own RNG stream
        self.inp = torch.nn.Linear(FEATURES, HIDDEN)
        self.blocks = torch.nn.Sequential(Block(), Block())
        self.head = torch.nn.Linear(HIDDEN, CLASSES)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_dtypes = {self.inp.weight.dtype, self.head.weight.dtype}
        return self.head(self.blocks(self.drop(self.inp(x)))) * self.scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": F.cross_entropy(self(x), y)}

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)


class StepForward(torch.nn.Module):
    """DDP's forward routed to training_step, as the trainer does."""

    def __init__(self, task: tk.TaskModule) -> None:
        super().__init__()
        self.task = task

    def forward(self, batch: Any, batch_idx: int) -> Any:
        return self.task.training_step(batch, batch_idx)


def global_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(2 * BATCH, FEATURES, generator=g), torch.randint(0, CLASSES, (2 * BATCH,), generator=g))
            for _ in range(n)]  # fmt: skip


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(
    strategy: str,
    boundaries: list[bool],
    finish_unannounced: bool,
    length_known: bool = True,
    ckpt_dir: Path | None = None,
    precision: str = "32",
) -> dict:
    """One pass of ``len(boundaries)`` micro-steps; a step after each boundary, and (when
    ``finish_unannounced``) one more after the trailing micro-steps, as the trainer does at a pass end."""
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # every rank initialises differently: the wrap must give rank 0's weights
    model = Net()
    if strategy == "fsdp":
        par = make_fsdp(precision, length_known)
        par.place(model, torch.device("cpu"))
        ema = EMA(model, 0.9, shadow=par.ema_shadow)
        forward = par.wrap(model, lambda: (False, False), torch.device("cpu"))
    else:
        ddp = DistributedDataParallel(StepForward(model))
        ema = EMA(model, 0.9)
        forward = ddp
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    accumulate = 2
    norms: list[float] = []
    grad_numel: list[int] = []
    grad_dtypes: set[str] = set()

    def step() -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_numel.append(local_numel(grads))
        grad_dtypes.update(str(g.dtype) for g in grads)
        norm = clip_grad_norm(list(model.parameters()), 0.3)
        norms.append(float(norm))
        optimizer.step()
        ema.update()
        optimizer.zero_grad(set_to_none=True)

    for idx, (x, y) in enumerate(global_batches(len(boundaries))):
        batch = (x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH])
        boundary = boundaries[idx]
        if boundary:
            ctx: Any = contextlib.nullcontext()
        else:
            ctx = par.no_sync() if strategy == "fsdp" else ddp.no_sync()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
        with ctx, autocast:
            loss = forward(batch, idx) / accumulate
            loss.backward()
        if boundary:
            step()
    if finish_unannounced:
        if strategy == "fsdp":
            par.finish_accumulation()
        else:
            average_gradients(list(ddp.parameters()))
        step()
    with torch.no_grad():
        x, y = global_batches(1)[0]
        val = float(model.validation_step((x, y), 0)["loss"])
        ema_val = float(ema.module.validation_step((x, y), 0)["loss"])
    out: dict[str, Any] = {
        "params": {n: full(p) for n, p in model.named_parameters()},
        "ema": {n: full(p) for n, p in ema.module.named_parameters()},
        "norms": norms,
        "val": val,
        "ema_val": ema_val,
        "compute_dtypes": sorted({str(d) for d in [*model.seen_dtypes, *(b.seen_dtype for b in model.blocks)]}),
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "grad_dtypes": grad_dtypes,
    }
    if strategy == "fsdp":
        out["local_params"] = {n: p.to_local().numel() for n, p in model.named_parameters()}
        out["local_ema"] = {n: p.to_local().numel() for n, p in ema.module.named_parameters()}
        out["grad_numel"] = grad_numel
        opt_state = optimizer_state(model, optimizer)
        out["opt_keys"] = sorted(opt_state["state"])
        out["local_opt"] = {n: {k: v.to_local().numel() for k, v in s.items() if isinstance(v, DTensor)}
                            for n, s in opt_state["state"].items()}  # fmt: skip
        out["model_keys"] = sorted(model_state(model))
        out["all_dtensor"] = all(isinstance(v, DTensor) for v in model_state(model).values())
        out["task_class"] = type(model).__name__  # the TaskModule keeps its class; its units are FSDPModules
        out["units"] = sorted({type(m).__mro__[1].__name__ for m in model.blocks})
        if ckpt_dir is not None:
            out["restored_equal"] = dcp_round_trip(ckpt_dir, model, optimizer, ema, length_known)
        par.close(clean=True, failed=False)
    return out


def make_fsdp(precision: str = "32", length_known: bool = True) -> FSDPParallel:
    """The trainer's FSDP piece, joined to this process group, outside a Trainer."""
    config = TrainerConfig(max_steps=1, distributed=True, strategy="fsdp", use_ema=True, precision=precision)
    par = FSDPParallel(config)
    par.setup(torch.device("cpu"))
    par.pass_length_known = length_known
    return par


def dcp_round_trip(ckpt_dir: Path, model: Net, optimizer: Any, ema: EMA, length_known: bool) -> bool:
    """Save model, optimizer, EMA and this rank's RNG with DCP, load them into a fresh sharded model and
    optimizer (the state dicts as in-place templates), and compare every local shard exactly."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    state = {"model": model_state(model), "optimizer": optimizer_state(model, optimizer), "ema": ema.state_dict(),
             "rng": {f"rank{rank}": torch.get_rng_state()}}  # fmt: skip
    dcp.save(state, checkpoint_id=str(ckpt_dir))
    torch.manual_seed(999)
    fresh = Net()
    par2 = make_fsdp(length_known=length_known)
    par2.place(fresh, torch.device("cpu"))
    ema2 = EMA(fresh, 0.9, shadow=par2.ema_shadow)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.05, weight_decay=0.1)
    target = {"model": model_state(fresh), "optimizer": optimizer_state(fresh, opt2), "ema": ema2.state_dict(),
              "rng": {f"rank{rank}": torch.empty_like(torch.get_rng_state())}}  # fmt: skip
    dcp.load(target, checkpoint_id=str(ckpt_dir))
    load_model_state(fresh, target["model"])
    load_optimizer_state(fresh, opt2, target["optimizer"])
    ema2.load_state_dict(target["ema"])
    same = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), fresh.parameters()))
    same &= all(torch.equal(a.to_local(), b.to_local())
                for a, b in zip(ema.module.parameters(), ema2.module.parameters()))  # fmt: skip
    same &= ema2.num_updates == ema.num_updates
    same &= torch.equal(target["rng"][f"rank{rank}"], state["rng"][f"rank{rank}"])
    s1, s2 = optimizer.state_dict()["state"], opt2.state_dict()["state"]
    for i in s1:
        for k in s1[i]:
            a, b = s1[i][k], s2[i][k]
            same &= torch.equal(a.to_local() if isinstance(a, DTensor) else a, b.to_local() if isinstance(b, DTensor) else b)
    return bool(same)


def parts(out_dir: Path) -> None:
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    # 5 micro-steps, accumulation 2: steps after 2, 4, and the pass end at 5 announced (known length)
    announced = [False, True, False, True, True]
    # the same micro-steps, but the pass ended after the 5th without warning
    unannounced = [False, True, False, True, False]
    for strategy in ("ddp", "fsdp"):
        results[f"{strategy}_announced"] = train(
            strategy, announced, False, ckpt_dir=out_dir / "dcp" if strategy == "fsdp" else None
        )
        results[f"{strategy}_unannounced"] = train(strategy, unannounced, True)
    results["fsdp_bf16"] = train("fsdp", announced, False, precision="bf16-mixed")
    results["fsdp_no_length"] = train("fsdp", unannounced, True, length_known=False)
    torch.save(results, out_dir / f"parts_rank{rank}.pt")


# -- the Trainer ------------------------------------------------------------------------------------------

TRAIN_N, VAL_N = 40, 37  # 5 batches of 4 per rank and pass; 37 does not divide by 2


def fit_kwargs(strategy: str, ckpt_dir: Path, **extra: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        run_mode="step", max_steps=8, eval_interval=2, save_interval=4, accumulate_grad_batches=2,
        clip_grad=0.3, use_ema=True, ema_decay=0.9, distributed=True, strategy=strategy,
        checkpoint_dir=str(ckpt_dir), log_dir=None, progress_bar=False,
    )  # fmt: skip
    kwargs.update(extra)
    return kwargs


def shuffled_loaders() -> tuple[Any, Any]:
    from helpers import make_loader

    train = make_loader(TRAIN_N, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(5))
    return train, make_loader(VAL_N, batch_size=5, seed=1)


class StopAt(tk.Callback):
    """``should_stop`` on one rank at one step, or a signal to this process."""

    def __init__(self, rank: int, step: int, signum: int | None = None) -> None:
        self.rank, self.step, self.signum = rank, step, signum
        self.steps: list[int] = []

    def on_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if self.signum is not None and trainer.rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps.append(trainer.global_step)
        if self.signum is None and trainer.rank == self.rank and trainer.global_step == self.step:
            trainer.should_stop = True


def fit_summary(trainer: tk.Trainer, module: Net, result: Any) -> dict[str, Any]:
    opt_state = trainer.optimizer.state_dict()["state"]  # type: ignore[union-attr]
    return {
        "step": result.global_step,
        "stop_reason": result.stop_reason,
        "best_step": result.best_step,
        "best_checkpoint": result.best_checkpoint,
        "history": [(h.step, dict(h.metrics)) for h in result.history],
        "params": {n: full(p) for n, p in module.named_parameters()},
        "ema": {n: full(p) for n, p in trainer.ema_module.named_parameters()},  # type: ignore[union-attr]
        "exp_avg": [full(s["exp_avg"]) for s in opt_state.values()],
        "rng": torch.get_rng_state(),
        "ema_is_sharded": all(isinstance(p, DTensor) for p in trainer.ema_module.parameters()),  # type: ignore[union-attr]
    }


def trainer_runs(out_dir: Path) -> None:
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    for strategy in ("ddp", "fsdp"):
        torch.manual_seed(100 + rank)  # ranks differ: weights come from rank 0, dropout from each rank's RNG
        module = Net(dropout=0.2)
        trainer = tk.Trainer(**fit_kwargs(strategy, out_dir / f"full_{strategy}"))
        results[f"full_{strategy}"] = fit_summary(trainer, module, trainer.fit(module, *shuffled_loaders()))
    # Interrupted at step 6 (mid-pass: 3 steps per pass) by should_stop on rank 1 only; resumed from "last".
    torch.manual_seed(100 + rank)
    module = Net(dropout=0.2)
    stop = StopAt(rank=1, step=6)
    trainer = tk.Trainer(**fit_kwargs("fsdp", out_dir / "resumed", save_interval=3, callbacks=[stop]))
    results["stopped"] = fit_summary(trainer, module, trainer.fit(module, *shuffled_loaders()))
    results["stopped"]["steps"] = stop.steps
    torch.manual_seed(999)  # a fresh process would start elsewhere: everything must come from the checkpoint
    module = Net(dropout=0.2)
    trainer = tk.Trainer(**fit_kwargs("fsdp", out_dir / "resumed", save_interval=3))
    results["resumed"] = fit_summary(trainer, module, trainer.fit(module, *shuffled_loaders(), ckpt_path="last"))
    # A signal reaching rank 0 alone during step 3: every rank stops after it, and a checkpoint is written.
    torch.manual_seed(0)
    module = Net()
    stop = StopAt(rank=0, step=2, signum=signal.SIGUSR1)
    trainer = tk.Trainer(**fit_kwargs("fsdp", out_dir / "signal", callbacks=[stop], save_interval=None))
    results["signal"] = fit_summary(trainer, module, trainer.fit(module, *shuffled_loaders()))
    # Early stop: patience 1 on a metric that must rise ("max" on a falling loss).
    torch.manual_seed(0)
    module = Net()
    early = {"target": "val_loss", "patience": 1, "mode": "max"}
    trainer = tk.Trainer(**fit_kwargs("fsdp", out_dir / "early", early_stop=early, max_steps=20))
    results["early"] = fit_summary(trainer, module, trainer.fit(module, *shuffled_loaders()))
    # The same module a second time: it was sharded in place by the first fit.
    try:
        tk.Trainer(**fit_kwargs("fsdp", out_dir / "refit")).fit(module, *shuffled_loaders())
    except ValueError as exc:
        results["refit"] = str(exc)
    # A unit class that matches nothing: refused before any file is written.
    try:
        tk.Trainer(**fit_kwargs("fsdp", out_dir / "bad_units", fsdp_units=(torch.nn.Conv2d,))).fit(
            Net(), *shuffled_loaders()
        )
    except ValueError as exc:
        results["bad_units"] = str(exc)
    torch.save(results, out_dir / f"trainer_rank{rank}.pt")


class Capture(tk.Callback):
    """The weights and AdamW moments as fit starts (after a checkpoint was restored), in full."""

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        state = trainer.optimizer.state_dict()["state"]
        self.params = {n: full(p) for n, p in module.named_parameters()}
        self.exp_avg = [full(state[i]["exp_avg"]) for i in sorted(state)]
        self.ema = {n: full(p) for n, p in trainer.ema_module.named_parameters()}


def reshard(out_dir: Path) -> None:
    """Resume a checkpoint two ranks wrote in a world of another size (this launch's)."""
    capture = Capture()
    trainer = tk.Trainer(**fit_kwargs("fsdp", out_dir / "reshard", callbacks=[capture], max_steps=6))
    module = Net(dropout=0.2)
    result = trainer.fit(module, *shuffled_loaders(), ckpt_path=out_dir / "full_fsdp" / "step_000000004")
    torch.save({"params": capture.params, "exp_avg": capture.exp_avg, "ema": capture.ema, "step": result.global_step,
                "world_size": dist.get_world_size()}, out_dir / f"reshard_rank{dist.get_rank()}.pt")  # fmt: skip


class Progressing(Net):
    """A validation metric that improves at every evaluation: every evaluation saves a new best."""

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return {**super().validation_step(batch, batch_idx), "progress": torch.tensor(float(self.global_step))}


def s3_runs(out_dir: Path, url: str) -> None:
    """A sharded run whose checkpoints go to S3 (moto_server), then a resume from "last" there."""
    options = {"client_kwargs": {"endpoint_url": os.environ["FSDP_TEST_S3_ENDPOINT"]}}
    results = {}
    for max_steps, ckpt_path in ((4, None), (6, "last")):
        torch.manual_seed(0)
        module = Progressing()
        kwargs = fit_kwargs("fsdp", out_dir, checkpoint_dir=url, storage_options=options, max_steps=max_steps,
                            save_interval=2, monitor={"target": "val_progress", "mode": "max"})  # fmt: skip
        trainer = tk.Trainer(**kwargs)
        result = trainer.fit(module, *shuffled_loaders(), ckpt_path=ckpt_path)
        results[max_steps] = (result.global_step, result.best_step, result.best_checkpoint, len(result.history))
    torch.save(results, out_dir / f"s3_rank{dist.get_rank()}.pt")


def main() -> None:
    faulthandler.dump_traceback_later(int(os.environ.get("FSDP_WORKER_TIMEOUT", "200")), exit=True)
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    try:
        if scenario == "s3":
            s3_runs(out_dir, sys.argv[3])
        else:
            {"parts": parts, "trainer": trainer_runs, "reshard": reshard}[scenario](out_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
