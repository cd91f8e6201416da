"""Preemption and crashes, with real signals sent to real training processes.

SIGTERM/SIGUSR1: the run finishes its step, writes a regular checkpoint, returns with stop_reason "signal"
and exits 0; resuming with ``ckpt_path="last"`` ends exactly where an uninterrupted run ends.
SIGKILL in the middle of writing a checkpoint: every earlier checkpoint still loads and ``"last"`` resumes
from the newest complete one; that fit removes the dead writer's temp file before its first step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from resume_worker import (
    BigTask,
    HookCounter,
    ResumeTask,
    big_loader,
    big_trainer,
    final_state,
    make_loaders,
    preempt_trainer,
    wait_for,
)
from test_resume import assert_same

import trainkit as tk

WORKER = str(Path(__file__).with_name("resume_worker.py"))
STOP_AT = 7  # pass 1, batch 1: no regular save due (every 5), and a new best file at this very step


def _preempt_fit(directory, ckpt_path=None, callbacks=()):
    task, counter = ResumeTask(val_steps=True), HookCounter()
    trainer = preempt_trainer(directory, [counter, *callbacks])
    train, val = make_loaders({})
    result = trainer.fit(task, train, val, ckpt_path=ckpt_path)
    return final_state(trainer, task, result, counter=counter.state_dict())


def _check_preempted_then_resume(ckpt_dir: Path, straight: dict, first_seen: list) -> None:
    """The interrupted run left a regular checkpoint at STOP_AT; resuming from "last" ends like the
    uninterrupted run."""
    assert sorted(os.listdir(ckpt_dir)) == ["best.ckpt", "step_000000005.ckpt", "step_000000007.ckpt"]
    assert tk.load_checkpoint(ckpt_dir / "step_000000007.ckpt")["trainer"]["global_step"] == STOP_AT
    resumed = _preempt_fit(ckpt_dir, ckpt_path="last")
    assert first_seen + resumed["seen"] == straight["seen"]
    for key in ("model", "ema", "optimizer", "schedulers", "lr", "rng", "history", "result", "counter"):
        assert_same(resumed[key], straight[key], key)


@pytest.mark.timeout(180)
def test_sigterm_mid_run_checkpoints_the_step_reached_and_resume_matches(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, WORKER, "preempt", str(tmp_path), str(STOP_AT)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        straight = _preempt_fit(tmp_path / "straight")  # meanwhile, the uninterrupted run
        wait_for(tmp_path / "marker", timeout=120)
        proc.send_signal(signal.SIGTERM)
        (tmp_path / "ack").touch()
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "received signal" in output
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["stop_reason"], result["global_step"]) == ("signal", STOP_AT)
    _check_preempted_then_resume(tmp_path / "ckpt", straight, result["seen"])


class SignalSelf(tk.Callback):
    def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == STOP_AT:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
@pytest.mark.timeout(60)
def test_sigusr1_stops_like_sigterm(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    interrupted = _preempt_fit(tmp_path / "ckpt", callbacks=[SignalSelf()])
    assert signal.getsignal(signal.SIGUSR1) is previous  # fit put the old handler back
    assert (interrupted["result"]["stop_reason"], interrupted["result"]["global_step"]) == ("signal", STOP_AT)
    straight = _preempt_fit(tmp_path / "straight")
    _check_preempted_then_resume(tmp_path / "ckpt", straight, interrupted["seen"])


class StartProbe(tk.Callback):
    def on_fit_start(self, trainer, module):
        self.step = trainer.global_step
        self.model = {k: v.clone() for k, v in module.state_dict().items()}


def _kill_while_saving(directory: Path) -> tuple[int, str]:
    """Run the big task and SIGKILL it as soon as a checkpoint's temp file exists while an earlier
    checkpoint is complete. Returns the return code and the child's output."""
    proc = subprocess.Popen(
        [sys.executable, WORKER, "big", str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while True:
            names = os.listdir(directory) if directory.exists() else []
            if any(n.startswith("step_") for n in names) and any(n.startswith(".step_") for n in names):
                proc.send_signal(signal.SIGKILL)
                break
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint was being written"
            time.sleep(0.001)
        return proc.wait(timeout=30), proc.communicate()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(240)
def test_sigkill_while_writing_a_checkpoint_leaves_the_earlier_ones_usable(tmp_path):
    directory = tmp_path / "ckpt"
    try:
        for _ in range(3):  # the write can, rarely, complete between the poll and the kill: try again
            shutil.rmtree(directory, ignore_errors=True)
            returncode, output = _kill_while_saving(directory)
            assert returncode == -signal.SIGKILL, output
            names = sorted(os.listdir(directory))
            if any(n.startswith(".") for n in names):
                break
        temps = [n for n in names if n.startswith(".")]
        complete = [n for n in names if not n.startswith(".")]
        steps = [int(n[len("step_") : -len(".ckpt")]) for n in complete]
        # Saves every 2 steps; the killed one is the next after the newest complete file.
        assert complete == [f"step_{s:09d}.ckpt" for s in steps]
        assert steps == list(range(2, 2 * len(steps) + 1, 2))
        newest = steps[-1]
        assert len(temps) == 1 and temps[0].startswith(f".step_{newest + 2:09d}.ckpt.tmp-")
        for name, step in zip(complete, steps):
            assert tk.load_checkpoint(directory / name)["trainer"]["global_step"] == step
        saved = tk.load_checkpoint(directory / complete[-1])

        probe = StartProbe()
        trainer = big_trainer(directory, max_steps=newest + 1, callbacks=(probe,))
        result = trainer.fit(BigTask(), big_loader(), ckpt_path="last")
        assert probe.step == newest and result.global_step == newest + 1
        assert_same(probe.model, saved["model"], "model")
        # Only the dead writer's temp file is gone (fit start removes it); nothing new (no save due).
        assert sorted(os.listdir(directory)) == complete
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # ~70 MB a file
