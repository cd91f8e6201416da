"""The subprocess half of the resume, preemption and crash tests, and the tasks they train.

The tests import this module for the tasks and run it as a script for the parts that must happen in a
fresh process::

    python tests/resume_worker.py resume ROOT CASE [CASE ...]   # finish each case from its checkpoint
    python tests/resume_worker.py preempt DIR STOP_AT           # wait for a signal at step STOP_AT
    python tests/resume_worker.py big DIR                       # train a large model, saving every 2 steps

Every run is deterministic: the task seeds the global RNG when it is built, and the data is fixed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import trainkit as tk

N_TRAIN, N_VAL, BATCH = 44, 16, 8  # 6 train batches a pass, the last one holding 4 samples
BATCHES_PER_PASS = 6


class IndexedData(Dataset):
    """``(x, y, index)`` samples; ``loads[i]`` counts the ``__getitem__`` calls for sample ``i``, in a
    shared-memory tensor so that loads made in DataLoader worker processes are counted too."""

    def __init__(self, n: int = N_TRAIN, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.loads = torch.zeros(n, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        self.loads[i] += 1
        return self.x[i], self.y[i], i


class ResumeTask(tk.TaskModule):
    """MLP 8 -> 16 -> 3 with dropout, AdamW, and a WarmupScheduler in front of a cosine schedule.

    ``seen`` records the sample indices of every training batch, in order. ``val_steps`` adds a validation
    metric equal to the global step, which improves at every evaluation (``monitor`` mode ``"max"``)."""

    def __init__(self, dropout: float = 0.3, seed: int = 0, val_steps: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 3)
        )
        self.val_steps = val_steps
        self.seen: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        self.seen.append(index.tolist())
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y, _ = batch
        logits = self.net(x)
        metrics: dict[str, Any] = {
            "loss": F.cross_entropy(logits, y),
            "acc": (logits.argmax(1) == y).float().mean(),
        }
        if self.val_steps:
            metrics["steps"] = float(self.global_step)
        return metrics

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=0.05)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        sched = tk.WarmupScheduler(opt, warmup_steps=3, warmup_factor=0.1, main_scheduler=cosine)
        return {"optimizer": opt, "lr_scheduler": sched}


class EventLog(tk.Callback):
    """Records the epoch hooks, evaluations and saves, in order, with the step they happened at."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    def on_epoch_start(self, trainer: Any, module: Any) -> None:
        self.events.append(("epoch_start", trainer.current_epoch, trainer.global_step))

    def on_epoch_end(self, trainer: Any, module: Any) -> None:
        self.events.append(("epoch_end", trainer.current_epoch, trainer.global_step))

    def on_eval_end(self, trainer: Any, module: Any, metrics: dict[str, float]) -> None:
        self.events.append(("eval", trainer.current_epoch, trainer.global_step))

    def on_save_checkpoint(self, trainer: Any, module: Any, checkpoint: dict[str, Any]) -> None:
        self.events.append(("save", trainer.current_epoch, trainer.global_step))


class HookCounter(tk.Callback):
    """A stateful callback: counts batch ends and epoch ends; its counts travel in checkpoints."""

    def __init__(self) -> None:
        self.batches = 0
        self.epoch_ends = 0

    def on_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1

    def on_epoch_end(self, trainer: Any, module: Any) -> None:
        self.epoch_ends += 1

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches, "epoch_ends": self.epoch_ends}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches, self.epoch_ends = int(state["batches"]), int(state["epoch_ends"])


# -- the bit-exact matrix ----------------------------------------------------------------------------------

# Each case: Trainer settings, loader settings, and ``stops``: the steps at which a run is interrupted (the
# first by the test process, the later ones inside the resuming subprocess). Every stop is a multiple of
# ``save_interval``, so a regular checkpoint exists there.
CASES: dict[str, dict[str, Any]] = {
    "mid_epoch": dict(stops=(3,), max_steps=10),
    "epoch_boundary": dict(stops=(6,), max_steps=12),
    "later_epoch": dict(stops=(15,), max_steps=20),
    "workers2_mid_epoch": dict(stops=(9,), max_steps=14, num_workers=2),
    "workers2_epoch_boundary": dict(stops=(12,), max_steps=16, num_workers=2),
    "epoch_mode_mid_epoch": dict(stops=(8,), run_mode="epoch", max_epochs=3),
    "epoch_mode_boundary": dict(stops=(12,), run_mode="epoch", max_epochs=4),
    "user_generator": dict(stops=(9,), max_steps=14, generator_seed=7),
    "accumulate_2": dict(stops=(4,), max_steps=8, accumulate=2),
    "no_dropout_no_shuffle": dict(stops=(5,), max_steps=9, dropout=0.0, shuffle=False),
    # early stop: the first evaluation (step 2) sets the reference, nothing beats it by 10, and the third
    # evaluation (step 6) reaches patience 2: the resumed run must stop there too.
    "early_stop_state": dict(
        stops=(3,), max_steps=20, eval_interval=2, early_stop={"patience": 2, "min_delta": 10.0}
    ),
    # the second checkpoint is written inside a pass that was itself resumed
    "twice_in_one_pass": dict(stops=(2, 4), max_steps=10),
}


def make_loaders(case: dict[str, Any]) -> tuple[DataLoader, DataLoader]:
    generator = None
    if case.get("generator_seed") is not None:
        generator = torch.Generator().manual_seed(case["generator_seed"])
    train = DataLoader(
        IndexedData(N_TRAIN, seed=0),
        batch_size=BATCH,
        shuffle=case.get("shuffle", True),
        num_workers=case.get("num_workers", 0),
        generator=generator,
    )
    val = DataLoader(IndexedData(N_VAL, seed=1), batch_size=BATCH)
    return train, val


def run_case(
    name: str, checkpoint_dir: str | os.PathLike[str], stop: int | None = None, ckpt_path: str | None = None
) -> dict[str, Any]:
    """One segment of a case: from the start (or ``ckpt_path``) to ``stop`` (or to the case's own end)."""
    case = CASES[name]
    task = ResumeTask(dropout=case.get("dropout", 0.3))
    train, val = make_loaders(case)
    events, counter = EventLog(), HookCounter()
    max_steps = case.get("max_steps") if stop is None else stop
    trainer = tk.Trainer(
        run_mode=case.get("run_mode", "step"),
        eval_interval=case.get("eval_interval", 4 if case.get("run_mode", "step") == "step" else 1),
        max_steps=max_steps,
        max_epochs=case.get("max_epochs"),
        save_interval=case["stops"][0],
        early_stop=case.get("early_stop"),
        clip_grad=1.0,
        use_ema=True,
        ema_decay=0.9,
        ema_warmup=True,  # the decay depends on the number of updates: it must be restored too
        accumulate_grad_batches=case.get("accumulate", 1),
        callbacks=[events, counter],
        checkpoint_dir=os.fspath(checkpoint_dir),
        log_dir=None,
        progress_bar=False,
    )
    result = trainer.fit(task, train, val, ckpt_path=ckpt_path)
    return final_state(trainer, task, result, events=events.events, counter=counter.state_dict())


def final_state(trainer: tk.Trainer, task: ResumeTask, result: tk.FitResult, **extra: Any) -> dict[str, Any]:
    """Everything a resumed run must reproduce, as plain tensors, numbers, lists and dicts."""
    assert trainer.optimizer is not None and trainer.ema_module is not None
    return {
        "model": task.state_dict(),
        "ema": trainer.ema_module.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "schedulers": [s.state_dict() for s in trainer.schedulers],
        "lr": [g["lr"] for g in trainer.optimizer.param_groups],
        "rng": torch.get_rng_state(),
        "history": [dict(r) for r in trainer.history],
        "result": {
            "global_step": result.global_step,
            "epoch": result.epoch,
            "best_metric": result.best_metric,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "stop_reason": result.stop_reason,
            "metrics": result.metrics,
        },
        "seen": task.seen,
        **extra,
    }


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}.ckpt"


def resume_cases(root: Path, names: list[str]) -> None:
    """Finish every named case from the checkpoint its first half left in ``root/<name>/ckpt``: one
    segment per remaining stop, each with a new task and Trainer. Writes ``root/<name>/resumed.pt``.

    Starts once ``root/ready`` exists, so that the test can start this process (and its imports) while
    it runs the first halves."""
    wait_for(root / "ready")
    for name in names:
        stops = CASES[name]["stops"]
        directory = root / name / "ckpt"
        seen: list[list[int]] = []
        events: list[tuple[str, int, int]] = []
        state: dict[str, Any] = {}
        for i, start in enumerate(stops):
            stop = stops[i + 1] if i + 1 < len(stops) else None
            state = run_case(name, directory, stop, os.fspath(directory / checkpoint_name(start)))
            seen += state["seen"]
            events += state["events"]
        state["seen"], state["events"] = seen, events
        torch.save(state, root / name / "resumed.pt")


def wait_for(path: Path, timeout: float = 200.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


# -- preemption ----------------------------------------------------------------------------------------------


class WaitForSignal(tk.Callback):
    """At step ``stop_at``: write ``marker``, then wait until the test has sent its signal (it writes
    ``ack`` after ``os.kill``), so that the signal arrives during exactly that step."""

    def __init__(self, stop_at: int, marker: Path, ack: Path) -> None:
        self.stop_at, self.marker, self.ack = stop_at, marker, ack

    def on_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self.stop_at:
            return
        self.marker.write_text(str(os.getpid()))
        wait_for(self.ack, timeout=60)


def preempt_trainer(checkpoint_dir: str | os.PathLike[str], callbacks: list[tk.Callback]) -> tk.Trainer:
    """Step mode, 20 steps, an evaluation (and, through ``val_steps``, a new best file) every step, a
    regular checkpoint every 5 steps."""
    return tk.Trainer(
        run_mode="step",
        max_steps=20,
        eval_interval=1,
        save_interval=5,
        monitor={"target": "val_steps", "mode": "max"},
        use_ema=True,
        ema_decay=0.9,
        callbacks=callbacks,
        checkpoint_dir=os.fspath(checkpoint_dir),
        log_dir=None,
        progress_bar=False,
    )


def preempt(directory: Path, stop_at: int) -> None:
    task = ResumeTask(val_steps=True)
    train, val = make_loaders({})
    callbacks: list[tk.Callback] = [
        WaitForSignal(stop_at, directory / "marker", directory / "ack"),
        HookCounter(),
    ]
    trainer = preempt_trainer(directory / "ckpt", callbacks)
    result = trainer.fit(task, train, val)
    (directory / "result.json").write_text(
        json.dumps({"stop_reason": result.stop_reason, "global_step": result.global_step, "seen": task.seen})
    )


# -- a checkpoint large enough that writing it takes a while -------------------------------------------------

BIG_WIDTH = 2048  # two 2048x2048 layers and SGD momentum: about 67 MB of state


class BigTask(tk.TaskModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(BIG_WIDTH, BIG_WIDTH), torch.nn.Tanh(), torch.nn.Linear(BIG_WIDTH, BIG_WIDTH)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return F.mse_loss(self.net(x), x)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


def big_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, BIG_WIDTH, generator=g)), batch_size=4)


def big_trainer(
    checkpoint_dir: str | os.PathLike[str], max_steps: int, callbacks: tuple[tk.Callback, ...] = ()
) -> tk.Trainer:
    return tk.Trainer(
        run_mode="step",
        max_steps=max_steps,
        save_interval=2,
        callbacks=callbacks,
        checkpoint_dir=os.fspath(checkpoint_dir),
        log_dir=None,
        progress_bar=False,
    )


def big(directory: Path) -> None:
    big_trainer(directory, max_steps=100_000).fit(BigTask(), big_loader())


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)  # as in the test process (tests/conftest.py): the same float arithmetic
    mode, *args = argv
    if mode == "resume":
        resume_cases(Path(args[0]), args[1:])
    elif mode == "preempt":
        preempt(Path(args[0]), int(args[1]))
    elif mode == "big":
        big(Path(args[0]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
