"""One rank of a distributed test run; tests/test_distributed.py launches it and asserts on what it writes.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py main OUT_DIR CKPT_1RANK TCP_PORT
    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py crash OUT_DIR

Each scenario runs several fits in one process (a launch costs seconds of torch import) and saves, per
rank, a ``torch.save`` file of plain data: results, histories, final weights, first batches seen.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import TinyClassifier, make_data, make_loader  # the script's directory (tests/) is on sys.path

import trainkit as tk

torch.set_num_threads(1)

# The configuration shared with the single-process reference runs in test_distributed.py.
PER_RANK_BATCH = 4
TRAIN_N, VAL_N, TEST_N = 64, 37, 1  # 37: not divisible by 2; 1: rank 1's test shard is empty
MAX_STEPS, EVAL_EVERY, SAVE_EVERY = 12, 4, 4
COMMON: dict[str, Any] = dict(
    run_mode="step",
    max_steps=MAX_STEPS,
    eval_interval=EVAL_EVERY,
    save_interval=SAVE_EVERY,
    clip_grad=0.5,
    use_ema=True,
    ema_decay=0.9,
)


def loaders(batch_size: int) -> tuple[Any, Any, Any]:
    """Train (shuffle=False, so the DistributedSampler's interleaved shards form the same global
    batches as one process with twice the batch size), validation and test loaders."""
    return (
        make_loader(TRAIN_N, batch_size=batch_size, shuffle=False, seed=0),
        make_loader(VAL_N, batch_size=5, seed=1),
        make_loader(TEST_N, batch_size=5, seed=2),
    )


class Recorder(tk.Callback):
    """Remembers the first training batch, the step after every optimizer step, and stops where told."""

    def __init__(
        self, stop_on_rank: int | None = None, stop_at: int | None = None, fail_at: int | None = None
    ):
        self.first_batch: torch.Tensor | None = None
        self.steps: list[int] = []
        self.stop_on_rank, self.stop_at, self.fail_at = stop_on_rank, stop_at, fail_at

    def on_batch_start(self, trainer, module, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = batch[0].clone()
        if self.fail_at is not None and trainer.rank == 1 and trainer.global_step == self.fail_at:
            raise RuntimeError(f"boom on rank 1 at step {trainer.global_step}")

    def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)
        if trainer.rank == self.stop_on_rank and trainer.global_step == self.stop_at:
            trainer.should_stop = True


class StartRecorder(tk.Callback):
    """Records global_step at every on_batch_start and overrides nothing that runs after a step."""

    def __init__(self) -> None:
        self.first_batch: torch.Tensor | None = None
        self.steps: list[int] = []

    def on_batch_start(self, trainer, module, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = batch[0].clone()
        self.steps.append(trainer.global_step)


class Asker(TinyClassifier):
    """On rank 1 only, from training_step when ``global_step == at``: asks to stop, or signals itself as a
    scheduler's preemption notice to one process would (then, or during that step's backward)."""

    def __init__(self, at: int, how: str) -> None:
        super().__init__()
        self.at, self.how = at, how

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.rank == 1 and self.global_step == self.at:
            if self.how == "should_stop":
                self.trainer.should_stop = True
            elif self.how == "signal":
                os.kill(os.getpid(), signal.SIGUSR1)
            else:  # "signal_in_backward": after training_step returned, while the gradients go out
                loss.register_hook(lambda grad: os.kill(os.getpid(), signal.SIGUSR1) or grad)
        return loss


class WithUnused(Asker):
    """An Asker with a branch that training_step never touches: DDP needs find_unused_parameters=True."""

    def __init__(self, at: int, how: str) -> None:
        super().__init__(at, how)
        self.spare = torch.nn.Linear(2, 2)


class CountAllReduce:
    """Counts torch.distributed.all_reduce calls made from Python (DDP's gradient all-reduce is not one)."""

    def __enter__(self) -> CountAllReduce:
        self.calls, self._real = 0, dist.all_reduce

        def counted(*args, **kwargs):
            self.calls += 1
            return self._real(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc: Any) -> None:
        dist.all_reduce = self._real


class HandSharded(torch.utils.data.IterableDataset):
    """A stream without a length that the user shards: batch ``i`` of ``rank`` holds rows
    ``[i*world*B + rank*B, i*world*B + (rank+1)*B)``, so one process with ``world`` = 1 and batch 2B reads
    the union of two ranks' batches."""

    def __init__(self, rank: int, world: int, batch: int, batches: int) -> None:
        self.rank, self.world, self.batch, self.batches = rank, world, batch, batches

    def __iter__(self):
        x, y = make_data(TRAIN_N).tensors
        for i in range(self.batches):
            start = (i * self.world + self.rank) * self.batch
            yield x[start : start + self.batch], y[start : start + self.batch]


def stream_loader(rank: int, world: int, batch: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(HandSharded(rank, world, batch, batches=3), batch_size=None)


class Plateau(TinyClassifier):
    """Adds ``level`` = min(global_step, 2) to the validation metrics: a sequence whose early-stop step
    follows from the rule alone (max mode, patience 2: reference 1, improve 2, then 2, 2 -> stop at 4)."""

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        out["level"] = torch.tensor(float(min(self.global_step, 2)))
        return out


def summary(
    trainer: tk.Trainer, result: tk.FitResult, module: TinyClassifier, rec: Recorder
) -> dict[str, Any]:
    return {
        "rank": trainer.rank,
        "world_size": trainer.world_size,
        "global_step": result.global_step,
        "epoch": result.epoch,
        "stop_reason": result.stop_reason,
        "stopped_early": result.stopped_early,
        "history": [{"step": r["step"], "metrics": dict(r["metrics"])} for r in trainer.history],
        "steps": rec.steps,
        "first_batch": rec.first_batch,
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "ema": (
            {k: v.detach().clone() for k, v in trainer.ema_module.state_dict().items()}
            if trainer.ema_module is not None
            else None
        ),
        "group_alive_after_fit": dist.is_initialized(),
    }


def scenario_main(out: Path, ckpt_1rank: str, tcp_port: int) -> None:
    rank = int(os.environ["RANK"])
    results: dict[str, Any] = {}

    # A: trainkit creates the process group. Each rank gets its own directories so that a file written by
    # rank 1 would show up. Rank 1's model starts from different weights: DDP broadcasts rank 0's.
    module = TinyClassifier(seed=rank)
    rec = Recorder()
    trainer = tk.Trainer(
        **COMMON,
        distributed=True,
        callbacks=[rec],
        checkpoint_dir=str(out / f"ckpt_rank{rank}"),
        log_dir=str(out / f"runs_rank{rank}"),
        log_every_n_steps=2,
        progress_bar=True,
    )
    progress = io.StringIO()
    with contextlib.redirect_stderr(progress):  # no TTY: the progress display prints lines to stderr
        result = trainer.fit(module, *loaders(PER_RANK_BATCH)[:2], test_loader=loaders(PER_RANK_BATCH)[2])
    results["A"] = summary(trainer, result, module, rec)
    results["A"]["progress"] = progress.getvalue()
    results["A"]["best_checkpoint"] = result.best_checkpoint

    # B: the user created the group (trainkit must leave it alive). Rank 1 alone asks to stop in
    # on_batch_end after step 5; rank 0 has no hook that runs after a step (ranks may hold different
    # callbacks), and still both end after step 5.
    dist.init_process_group("gloo")
    module = TinyClassifier()
    rec: Any = Recorder(stop_on_rank=1, stop_at=5) if rank == 1 else StartRecorder()
    trainer = tk.Trainer(
        run_mode="step", max_steps=50, distributed=True, callbacks=[rec], checkpoint_dir=None, log_dir=None,
        progress_bar=False,
    )  # fmt: skip
    result = trainer.fit(module, loaders(PER_RANK_BATCH)[0])
    results["B"] = summary(trainer, result, module, rec)
    results["B"]["should_stop"] = trainer.should_stop

    # B2: rank 1 asks from training_step as step 5 runs (global_step 4), through two accumulation micro-steps
    # (the first under no_sync), and no code runs after a step: the request travels with the step's
    # gradients: trainkit's own all-reduces are a few votes (setup, loop start, pass end, stop), none per step.
    module = Asker(at=4, how="should_stop")
    rec = StartRecorder()
    trainer = tk.Trainer(
        run_mode="step", max_steps=50, accumulate_grad_batches=2, distributed=True, callbacks=[rec],
        checkpoint_dir=None, log_dir=None, progress_bar=False,
    )  # fmt: skip
    with CountAllReduce() as counter:
        result = trainer.fit(module, loaders(PER_RANK_BATCH)[0])
    results["B2"] = summary(trainer, result, module, rec)
    results["B2"]["all_reduce_calls"] = counter.calls

    # B3: a signal reaches rank 1 alone, in training_step of step 3: both ranks stop after step 3, and rank
    # 0 saves it.
    module = Asker(at=2, how="signal")
    rec = StartRecorder()
    trainer = tk.Trainer(
        run_mode="step", max_steps=50, distributed=True, callbacks=[rec],
        checkpoint_dir=str(out / "signal" / f"ckpt_rank{rank}"), log_dir=None, progress_bar=False,
    )  # fmt: skip
    result = trainer.fit(module, loaders(PER_RANK_BATCH)[0])
    results["B3"] = summary(trainer, result, module, rec)

    # B5: the signal lands during step 3's backward, after training_step returned, and no code runs after
    # the step: it is heard with step 4's gradients, and both ranks stop after step 4.
    module = Asker(at=2, how="signal_in_backward")
    rec = StartRecorder()
    trainer = tk.Trainer(
        run_mode="step", max_steps=50, distributed=True, callbacks=[rec], checkpoint_dir=None, log_dir=None,
        progress_bar=False,
    )  # fmt: skip
    result = trainer.fit(module, loaders(PER_RANK_BATCH)[0])
    results["B5"] = summary(trainer, result, module, rec)

    # B4: the vote trainkit uses beside GPU gradients (GroupVote: an all-reduce of its own on a CPU group,
    # started after the forward), put in place on CPU: rank 1 asks from training_step of step 3.
    import trainkit.distributed as tk_dist
    from trainkit.distributed import GroupVote

    real_stop_vote = tk_dist.stop_vote
    tk_dist.stop_vote = lambda world, device, module, flags: GroupVote(dist.new_group(backend="gloo"), flags)
    try:
        module = Asker(at=2, how="should_stop")
        rec = StartRecorder()
        trainer = tk.Trainer(
            run_mode="step", max_steps=50, distributed=True, callbacks=[rec], checkpoint_dir=None,
            log_dir=None, progress_bar=False,
        )  # fmt: skip
        with CountAllReduce() as counter:
            result = trainer.fit(module, loaders(PER_RANK_BATCH)[0])
    finally:
        tk_dist.stop_vote = real_stop_vote
    results["B4"] = summary(trainer, result, module, rec)
    results["B4"]["all_reduce_calls"] = counter.calls

    # The same vote, checked directly.

    flags = {"now": (False, False)}
    vote = GroupVote(dist.new_group(backend="gloo"), lambda: flags["now"])
    seen: list[Any] = [vote.collect()]
    flags["now"] = (rank == 1, False)
    vote.send()
    seen.append(vote.collect())
    flags["now"] = (False, rank == 0)
    vote.send()
    flags["now"] = (True, True)
    vote.send()  # a second send before collect is ignored: one exchange per step
    seen.append(vote.collect())
    flags["now"] = (False, False)
    seen.append(vote.now())
    flags["now"] = (False, rank == 1)
    seen.append(vote.now())
    seen.append(vote.any_rank(rank == 0))
    results["group_vote"] = seen
    dist.destroy_process_group()

    # C: early stopping on a metric whose stop step follows from the rule (step 4); trainkit creates the
    # group again in the same process.
    module = Plateau()
    rec = Recorder()
    trainer = tk.Trainer(
        run_mode="step", max_steps=50, eval_interval=1, distributed=True, callbacks=[rec],
        early_stop={"target": "val_level", "mode": "max", "patience": 2},
        checkpoint_dir=None, log_dir=None, progress_bar=False,
    )  # fmt: skip
    train, val, _ = loaders(PER_RANK_BATCH)
    result = trainer.fit(module, train, val)
    results["C"] = summary(trainer, result, module, rec)

    # D: resume a checkpoint written by a single process (batch 2B) on two ranks (batch B each).
    module = TinyClassifier(seed=rank)
    rec = Recorder()
    trainer = tk.Trainer(**COMMON, distributed=True, callbacks=[rec], checkpoint_dir=None, log_dir=None,
                         progress_bar=False)  # fmt: skip
    train, val, test = loaders(PER_RANK_BATCH)
    result = trainer.fit(module, train, val, test_loader=test, ckpt_path=ckpt_1rank)
    results["D"] = summary(trainer, result, module, rec)

    # E: RANK from the launcher is overridden by rank=: the ranks are swapped, so the process torchrun
    # calls rank 1 is rank 0 and alone writes its checkpoint.
    swapped = 1 - rank
    rec = Recorder()
    trainer = tk.Trainer(
        run_mode="step", max_steps=3, save_interval=3, distributed=True, rank=swapped, callbacks=[rec],
        checkpoint_dir=str(out / "swapped" / f"ckpt_RANK{rank}"), log_dir=None, progress_bar=False,
    )  # fmt: skip
    module = TinyClassifier()
    result = trainer.fit(module, loaders(PER_RANK_BATCH)[0])
    results["E"] = summary(trainer, result, module, rec)

    # G: a loader without a length, 3 batches a pass, accumulation 2: the pass's last step is a partial one
    # whose micro-step ran under no_sync, so its gradients are averaged by hand.
    module = TinyClassifier()
    rec = Recorder()
    trainer = tk.Trainer(
        run_mode="epoch", max_epochs=1, accumulate_grad_batches=2, distributed=True, callbacks=[rec],
        checkpoint_dir=None, log_dir=None, progress_bar=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "cannot shard it": this stream is sharded by hand
        result = trainer.fit(module, stream_loader(rank, 2, PER_RANK_BATCH))
    results["G"] = summary(trainer, result, module, rec)

    # H: find_unused_parameters=True with a parameter no step uses, and a stop asked from training_step
    # on rank 1 (it rides with the gradients, beside the unused branch) after step 2.
    module = WithUnused(at=1, how="should_stop")
    spare = {k: v.clone() for k, v in module.spare.state_dict().items()}
    rec = StartRecorder()
    trainer = tk.Trainer(
        run_mode="step", max_steps=50, find_unused_parameters=True, distributed=True, callbacks=[rec],
        checkpoint_dir=None, log_dir=None, progress_bar=False,
    )  # fmt: skip
    result = trainer.fit(module, loaders(PER_RANK_BATCH)[0])
    results["H"] = summary(trainer, result, module, rec)
    results["H"]["spare_unchanged"] = all(torch.equal(v, module.spare.state_dict()[k]) for k, v in spare.items())

    # F: no launcher environment at all, as some launchers leave it: rank=, world_size=, init_method=.
    for name in list(os.environ):  # TORCHELASTIC_USE_AGENT_STORE would send tcp:// to torchrun's store
        if name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK") or name.startswith(
            ("TORCHELASTIC_", "LOCAL_WORLD_SIZE", "GROUP_", "ROLE_")
        ):
            del os.environ[name]
    rec = Recorder()
    trainer = tk.Trainer(
        run_mode="step", max_steps=3, distributed=True, rank=swapped, world_size=2,
        init_method=f"tcp://127.0.0.1:{tcp_port}", callbacks=[rec], checkpoint_dir=None, log_dir=None,
        progress_bar=False,
    )  # fmt: skip
    module = TinyClassifier()
    result = trainer.fit(module, loaders(PER_RANK_BATCH)[0])
    results["F"] = summary(trainer, result, module, rec)

    torch.save(results, out / f"main_rank{rank}.pt")


def scenario_crash(out: Path) -> None:
    rec = Recorder(fail_at=3)
    trainer = tk.Trainer(run_mode="step", max_steps=50, distributed=True, callbacks=[rec], checkpoint_dir=None,
                         log_dir=None, progress_bar=False)  # fmt: skip
    trainer.fit(TinyClassifier(), loaders(PER_RANK_BATCH)[0])
    (out / f"crash_finished_rank{trainer.rank}").write_text("fit returned")  # must never happen


if __name__ == "__main__":
    if os.environ.get("DDP_WORKER_TIMEOUT"):  # a hang prints every thread's stack and exits
        faulthandler.dump_traceback_later(float(os.environ["DDP_WORKER_TIMEOUT"]), exit=True)
    faulthandler.register(signal.SIGTERM, chain=True)  # torchrun stops the other ranks with SIGTERM
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    if scenario == "main":
        scenario_main(out_dir, sys.argv[3], int(sys.argv[4]))
    elif scenario == "crash":
        scenario_crash(out_dir)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
