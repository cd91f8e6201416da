"""``async_checkpoint=True``: snapshot on the training thread, write in the background, one write at a time,
failures re-raised at the next save or at the end of fit, and fit returns only once the last write is done.

The storage is the real local one; where a test needs a write to fail or to take a while, it wraps
``CheckpointStorage.write`` (the call the background thread makes) and then calls the real one.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from helpers import TinyClassifier, make_loader
from test_resume import assert_same

import trainkit as tk
from trainkit.checkpoint import CheckpointStorage

REAL_WRITE = CheckpointStorage.write


def _trainer(directory, async_checkpoint, max_steps=9, save_interval=3, callbacks=()):
    return tk.Trainer(
        run_mode="step", max_steps=max_steps, eval_interval=3, save_interval=save_interval, use_ema=True,
        ema_decay=0.9, async_checkpoint=async_checkpoint, callbacks=list(callbacks),
        checkpoint_dir=os.fspath(directory), log_dir=None, progress_bar=False,
    )  # fmt: skip


def _fit(trainer, validate=True):
    val = make_loader(n=16) if validate else None
    return trainer.fit(TinyClassifier(dropout=0.2), make_loader(shuffle=True), val)


def _recording(log: list[tuple[str, int]]):
    def write(self, name, checkpoint):
        log.append((name, checkpoint["trainer"]["global_step"]))
        return REAL_WRITE(self, name, checkpoint)

    return write


class StepReached(tk.Callback):
    """``reached[s]`` is set once optimizer step ``s`` is done."""

    def __init__(self, max_steps: int) -> None:
        self.reached = {s: threading.Event() for s in range(1, max_steps + 2)}
        self.module: torch.nn.Module | None = None

    def on_fit_start(self, trainer, module):
        self.module = module

    def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.reached[trainer.global_step].set()


@pytest.mark.timeout(60)
def test_saved_content_is_the_state_at_the_snapshot_step(tmp_path, monkeypatch):
    sync_writes: list[tuple[str, int]] = []
    monkeypatch.setattr(CheckpointStorage, "write", _recording(sync_writes))
    _fit(_trainer(tmp_path / "sync", async_checkpoint=False))
    expected_files = sorted(os.listdir(tmp_path / "sync"))
    assert {"step_000000003.ckpt", "step_000000006.ckpt", "step_000000009.ckpt"} <= set(expected_files)

    steps = StepReached(9)
    writes: list[dict] = []
    active, lock = [0], threading.Lock()

    def slow_write(self, name, checkpoint):
        """Hold each regular write until training has moved past the saved step, so a file that read
        live tensors instead of the snapshot would hold later weights. (A best file is followed by the
        regular save of the same step, which waits for it: it cannot wait for the next step.)"""
        with lock:
            active[0] += 1
            overlap = active[0] > 1
        step = checkpoint["trainer"]["global_step"]
        moved_on = name != "best.ckpt" and step < 9 and steps.reached[step + 1].wait(timeout=30)
        live = steps.module.state_dict()
        changed = any(not torch.equal(live[k].cpu(), v) for k, v in checkpoint["model"].items())
        if step == 9 and name != "best.ckpt":
            time.sleep(0.3)  # the last write: fit must still wait for it
        try:
            return REAL_WRITE(self, name, checkpoint)
        finally:
            writes.append(
                {"name": name, "step": step, "overlap": overlap, "moved_on": moved_on, "changed": changed,
                 "thread": threading.current_thread()}
            )  # fmt: skip
            with lock:
                active[0] -= 1

    monkeypatch.setattr(CheckpointStorage, "write", slow_write)
    result = _fit(_trainer(tmp_path / "async", async_checkpoint=True, callbacks=[steps]))

    # fit returned only after the last (slow) write completed
    assert sorted(os.listdir(tmp_path / "async")) == expected_files
    assert [(w["name"], w["step"]) for w in writes] == sync_writes
    assert not any(w["overlap"] for w in writes)  # one write at a time
    assert all(w["thread"] is not threading.main_thread() for w in writes)
    # Training had moved on, with different weights, while the earlier files were written ...
    assert all(w["moved_on"] and w["changed"] for w in writes if w["step"] < 9 and w["name"] != "best.ckpt")
    # ... and every file holds exactly what the synchronous run saved at the same step.
    for name in expected_files:
        saved, reference = (tk.load_checkpoint(tmp_path / run / name) for run in ("async", "sync"))
        assert_same(saved, reference, name)
    assert result.global_step == 9


def _fail_at(step_to_fail: int, delay: float = 0.0):
    def failing_write(self, name, checkpoint):
        if checkpoint["trainer"]["global_step"] == step_to_fail:
            time.sleep(delay)
            raise OSError(f"simulated: no space left on device writing {name}")
        return REAL_WRITE(self, name, checkpoint)

    return failing_write


class Seen(tk.Callback):
    def __init__(self) -> None:
        self.exceptions: list[BaseException] = []
        self.fit_end = False

    def on_exception(self, trainer, module, exception):
        self.exceptions.append(exception)

    def on_fit_end(self, trainer, module):
        self.fit_end = True


@pytest.mark.timeout(60)
def test_background_failure_surfaces_at_the_next_save(tmp_path, monkeypatch):
    monkeypatch.setattr(CheckpointStorage, "write", _fail_at(2))
    seen = Seen()
    trainer = _trainer(
        tmp_path / "run", async_checkpoint=True, max_steps=10, save_interval=2, callbacks=[seen]
    )
    with pytest.raises(OSError, match="no space left on device writing step_000000002.ckpt"):
        _fit(trainer, validate=False)
    assert trainer.global_step == 4  # raised by the save at step 4, not deferred to the end (step 10)
    assert len(seen.exceptions) == 1 and not seen.fit_end
    assert not (tmp_path / "run").exists()  # step 2 failed; step 4's write never started


@pytest.mark.timeout(60)
def test_failure_of_the_last_write_surfaces_at_the_end_of_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(CheckpointStorage, "write", _fail_at(10, delay=0.3))
    seen = Seen()
    trainer = _trainer(
        tmp_path / "run", async_checkpoint=True, max_steps=10, save_interval=2, callbacks=[seen]
    )
    with pytest.raises(OSError, match="no space left on device writing step_000000010.ckpt"):
        _fit(trainer, validate=False)
    assert trainer.global_step == 10 and not seen.fit_end
    assert sorted(os.listdir(tmp_path / "run")) == [f"step_{s:09d}.ckpt" for s in (2, 4, 6, 8)]
