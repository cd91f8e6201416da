"""Exact resume: a run interrupted and finished in a fresh process equals the uninterrupted run, bit for bit;
the skipped part of an epoch is never loaded; ``ckpt_path="last"`` picks the newest complete checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from resume_worker import (
    BATCHES_PER_PASS,
    CASES,
    N_TRAIN,
    EventLog,
    HookCounter,
    ResumeTask,
    checkpoint_name,
    final_state,
    make_loaders,
    run_case,
)

import trainkit as tk

WORKER = str(Path(__file__).with_name("resume_worker.py"))


def assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    """Exact equality of nested dicts, lists and tensors (torch.equal, dtype included; on the CPU, so that
    live weights on a GPU compare with loaded ones)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype and torch.equal(actual.cpu(), expected.cpu()), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual, key=str) == sorted(expected, key=str), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


# -- the bit-exact matrix ----------------------------------------------------------------------------------

# Worked out by hand from each case: (final step, stop reason, (epoch, batch in epoch) at the first stop).
# 6 batches a pass (44 samples, batch 8); with accumulate_grad_batches=2, 3 optimizer steps a pass.
EXPECTED = {
    "mid_epoch": (10, "max_steps", (0, 3)),
    "epoch_boundary": (12, "max_steps", (1, 0)),
    "later_epoch": (20, "max_steps", (2, 3)),
    "workers2_mid_epoch": (14, "max_steps", (1, 3)),
    "workers2_epoch_boundary": (16, "max_steps", (2, 0)),
    "epoch_mode_mid_epoch": (18, "max_epochs", (1, 2)),
    "epoch_mode_boundary": (24, "max_epochs", (2, 0)),
    "user_generator": (14, "max_steps", (1, 3)),
    "accumulate_2": (8, "max_steps", (1, 2)),
    "no_dropout_no_shuffle": (9, "max_steps", (0, 5)),
    "early_stop_state": (6, "early_stop", (0, 3)),
    "twice_in_one_pass": (10, "max_steps", (0, 2)),
}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict, dict, dict]]:
    """Per case: the uninterrupted run and the first half, here; the rest, resumed from the first half's
    checkpoint, in one fresh subprocess for all cases."""
    root = tmp_path_factory.mktemp("matrix")
    # Started first, so that its imports overlap with the first halves; it begins when "ready" appears.
    proc = subprocess.Popen(
        [sys.executable, WORKER, "resume", str(root), *CASES],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    halves = {}
    try:
        for name, case in CASES.items():
            straight = run_case(name, root / name / "straight")
            half = run_case(name, root / name / "ckpt", stop=case["stops"][0])
            first = tk.load_checkpoint(root / name / "ckpt" / checkpoint_name(case["stops"][0]))
            halves[name] = (straight, half, first["trainer"])
        (root / "ready").touch()
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    return {
        name: (*halves[name], torch.load(root / name / "resumed.pt", weights_only=True)) for name in CASES
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_resume_in_a_fresh_process_is_bit_exact(matrix, name):
    straight, half, first_ckpt, resumed = matrix[name]
    end_step, reason, position = EXPECTED[name]
    # The case tests what it says: where the first half stopped, and how the straight run ended.
    assert (first_ckpt["epoch"], first_ckpt["batch_in_epoch"]) == position
    assert (straight["result"]["global_step"], straight["result"]["stop_reason"]) == (end_step, reason)
    seen = straight["seen"]
    passes = [sum(seen[i : i + BATCHES_PER_PASS], []) for i in range(0, len(seen) - 5, BATCHES_PER_PASS)]
    assert passes and all(sorted(p) == list(range(N_TRAIN)) for p in passes)  # every sample once a pass
    assert (passes[0] != list(range(N_TRAIN))) == CASES[name].get("shuffle", True)

    # The same batches, in the same order: none repeated, none skipped.
    assert half["seen"] + resumed["seen"] == straight["seen"]
    # Epoch hooks, evaluations and saves at the same steps; no epoch start again for a resumed pass.
    assert half["events"] + resumed["events"] == straight["events"]
    for key in ("model", "ema", "optimizer", "schedulers", "lr", "rng", "history", "result", "counter"):
        assert_same(resumed[key], straight[key], key)


# -- cheap data skip -------------------------------------------------------------------------------------


def _fit(loader, directory, max_steps, events=None, ckpt_path=None):
    task = ResumeTask()
    trainer = tk.Trainer(
        run_mode="step", max_steps=max_steps, save_interval=9, checkpoint_dir=os.fspath(directory),
        callbacks=[events] if events is not None else [], log_dir=None, progress_bar=False,
    )  # fmt: skip
    trainer.fit(task, loader, ckpt_path=ckpt_path)
    return task


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_never_loads_the_skipped_batches(tmp_path, num_workers):
    case = {"num_workers": num_workers}
    straight_events = EventLog()
    straight = _fit(make_loaders(case)[0], tmp_path / "straight", 12, straight_events)
    _fit(make_loaders(case)[0], tmp_path / "run", 9)  # stops at step 9: pass 1, after 3 of its 6 batches

    loader = make_loaders(case)[0]
    events = EventLog()
    resumed = _fit(loader, tmp_path / "run", 12, events, ckpt_path=tmp_path / "run" / checkpoint_name(9))

    assert resumed.seen == straight.seen[9:12]
    skipped = sum(straight.seen[6:9], [])
    expected_loads = [0] * N_TRAIN
    for index in sum(straight.seen[9:12], []):
        expected_loads[index] = 1
    assert all(expected_loads[i] == 0 for i in skipped)
    assert loader.dataset.loads.tolist() == expected_loads  # the 24 skipped samples were never read
    # No on_epoch_start for the resumed pass; its on_epoch_end fires once, as in the straight run.
    after_save = straight_events.events[straight_events.events.index(("save", 1, 9)) + 1 :]
    assert events.events == after_save == [("epoch_end", 2, 12)]


# -- autoresume ------------------------------------------------------------------------------------------


class ScriptedVal(ResumeTask):
    """Validation loss read from a table by global step, so that the best step is known in advance."""

    def __init__(self, values: dict[int, float]) -> None:
        super().__init__()
        self.values = values

    def validation_step(self, batch, batch_idx):
        return {"loss": torch.tensor(self.values[self.global_step])}


def _scripted_fit(directory, values, save_interval, max_steps, ckpt_path=None, probe=None):
    task = ScriptedVal(values)
    counter = HookCounter()
    callbacks: list[tk.Callback] = [counter] + ([probe] if probe is not None else [])
    trainer = tk.Trainer(
        run_mode="step", max_steps=max_steps, eval_interval=2, save_interval=save_interval, use_ema=True,
        ema_decay=0.9, callbacks=callbacks, checkpoint_dir=os.fspath(directory), log_dir=None,
        progress_bar=False,
    )  # fmt: skip
    train, val = make_loaders({})
    result = trainer.fit(task, train, val, ckpt_path=ckpt_path)
    return trainer, final_state(trainer, task, result, counter=counter.state_dict())


class StartProbe(tk.Callback):
    def on_fit_start(self, trainer, module):
        self.step = trainer.global_step


BEST_AT_6 = {2: 5.0, 4: 4.0, 6: 3.0, 8: 6.0, 10: 7.0, 12: 8.0}
BEST_AT_10 = {2: 5.0, 4: 4.0, 6: 6.0, 8: 7.0, 10: 1.0, 12: 8.0}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "values, save_interval, stopped_at, expected_file, expected_step",
    [
        (BEST_AT_6, 4, 10, "step_000000008.ckpt", 8),  # regular newer than best
        (BEST_AT_10, 4, 10, "best.ckpt", 10),  # best newer than the newest regular
        # Best and regular at the same step, the end of a pass: the regular one is written after
        # on_epoch_end, so it is the newer one (HookCounter.epoch_ends tells them apart).
        (BEST_AT_6, 6, 8, "step_000000006.ckpt", 6),
    ],
    ids=["regular_newest", "best_newest", "same_step"],
)
def test_last_resumes_from_the_newest_complete_checkpoint(
    tmp_path, caplog, values, save_interval, stopped_at, expected_file, expected_step
):
    run = tmp_path / "run"
    _scripted_fit(run, values, save_interval, stopped_at)
    # Foreign files, and a temp file of a newer checkpoint that a killed writer left behind.
    foreign = {
        "notes.txt": b"not ours",
        f".step_{stopped_at + 2:09d}.ckpt.tmp-0123456789abcdef": b"half a checkpoint",
    }
    for name, data in foreign.items():
        (run / name).write_bytes(data)
    _, straight = _scripted_fit(tmp_path / "straight", values, save_interval, 12)

    caplog.set_level(logging.INFO, logger="trainkit")
    probe = StartProbe()
    trainer, resumed = _scripted_fit(run, values, save_interval, 12, ckpt_path="last", probe=probe)

    assert probe.step == expected_step
    messages = [r.getMessage() for r in caplog.records if r.name == "trainkit"]
    assert any("resuming from" in m and m.endswith(expected_file) for m in messages), messages
    for key in ("model", "ema", "optimizer", "schedulers", "rng", "history", "result", "counter"):
        assert_same(resumed[key], straight[key], key)
    # Nothing it did not write is gone; exactly one best file.
    regular = {f"step_{s:09d}.ckpt" for s in range(save_interval, 13, save_interval)}
    assert set(os.listdir(run)) == regular | {"best.ckpt"} | set(foreign)
    assert all((run / name).read_bytes() == data for name, data in foreign.items())
    assert trainer.best_checkpoint_path == os.fspath(run / "best.ckpt")
    assert tk.load_checkpoint(run / "best.ckpt")["trainer"]["global_step"] == straight["result"]["best_step"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("existing", ["missing_dir", "only_foreign_files"])
def test_last_without_a_checkpoint_starts_fresh_saying_so_once(tmp_path, caplog, existing):
    run = tmp_path / "run"
    foreign = {"notes.txt": b"x", ".step_000000004.ckpt.tmp-0123456789abcdef": b"partial"}
    if existing == "only_foreign_files":
        run.mkdir()
        for name, data in foreign.items():
            (run / name).write_bytes(data)
    _, straight = _scripted_fit(tmp_path / "straight", BEST_AT_6, 4, 8)

    caplog.set_level(logging.INFO, logger="trainkit")
    _, fresh = _scripted_fit(run, BEST_AT_6, 4, 8, ckpt_path="last")

    records = [r for r in caplog.records if r.name == "trainkit"]
    assert len(records) == 1 and "starting fresh" in records[0].getMessage()
    for key in ("model", "ema", "optimizer", "history", "result", "counter"):
        assert_same(fresh[key], straight[key], key)
    kept = set(foreign) if existing == "only_foreign_files" else set()
    assert set(os.listdir(run)) == {"step_000000004.ckpt", "step_000000008.ckpt", "best.ckpt"} | kept
