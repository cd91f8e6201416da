"""examples/digits.py end to end in its --smoke mode (40 steps: evaluations at 10, 20, 30, 40; regular
checkpoints at 20 and 40), checked against files, TensorBoard events and a hand-written recomputation."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.py"

EVAL_LINE = re.compile(
    r"^step +(\d+)  epoch +(\d+)  val_clean_loss (\d+\.\d{4})  val_clean_acc (\d+\.\d\d)%  "
    r"val_noisy_acc (\d+\.\d\d)%  ema_val_clean_loss (\d+\.\d{4})  ema_val_clean_acc (\d+\.\d\d)%  "
    r"ema_val_noisy_acc (\d+\.\d\d)%  \(\d+\.\d s\)$",
    re.M,
)
TEST_LINE = re.compile(r"^test accuracy \((base|EMA) weights\): (\d+\.\d\d)% \((\d+)/(\d+)\)$", re.M)


def _load_example():
    spec = importlib.util.spec_from_file_location("digits_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits = _load_example()


def _eval_lines(out: str) -> dict[int, tuple[str, ...]]:
    return {int(m[0]): m[1:] for m in EVAL_LINE.findall(out)}


def _test_lines(out: str) -> dict[str, tuple[int, int]]:
    return {name: (int(correct), int(total)) for name, _, correct, total in TEST_LINE.findall(out)}


def _first_min_step(records: list[dict], key: str) -> int:
    """The step the best checkpoint must hold: strict improvements only (min_delta 0), first one wins."""
    best_step, best = None, None
    for rec in records:
        value = rec["metrics"][key]
        if best is None or value < best:
            best_step, best = rec["step"], value
    assert best_step is not None
    return best_step


def _count_correct_by_hand(state_dict: dict[str, torch.Tensor], seed: int = 0) -> int:
    model = digits.DigitsCNN()
    model.load_state_dict(state_dict)
    model.eval()
    test_set = digits.load_digits_splits(seed)[2]
    images, labels = test_set.tensors
    with torch.no_grad():
        return int((model(images).argmax(dim=1) == labels).sum())


@pytest.mark.timeout(180)
def test_smoke_run_writes_checkpoints_logs_and_tests_the_best_weights(capsys):
    report = digits.main(["--smoke"])
    out = capsys.readouterr().out

    ckpt_dir = Path("runs/digits/checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["best.ckpt", "step_000000020.ckpt", "step_000000040.ckpt"]
    assert "stopped at step 40 (max_steps)" in out

    # One printed line per evaluation, matching what the trainer logged to metrics.jsonl.
    records = [json.loads(line) for line in Path("runs/digits/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    lines = _eval_lines(out)
    assert sorted(lines) == [10, 20, 30, 40]
    for rec in records:
        m = rec["metrics"]
        assert lines[rec["step"]] == (
            str(rec["epoch"]),
            f"{m['val_clean_loss']:.4f}",
            f"{m['val_clean_acc'] * 100:.2f}",
            f"{m['val_noisy_acc'] * 100:.2f}",
            f"{m['ema_val_clean_loss']:.4f}",
            f"{m['ema_val_clean_acc'] * 100:.2f}",
            f"{m['ema_val_noisy_acc'] * 100:.2f}",
        )

    # TensorBoard got the same evaluations.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [f for f in os.listdir("runs/digits") if f.startswith("events.out.tfevents.")]
    assert len(events) == 1
    acc = EventAccumulator("runs/digits")
    acc.Reload()
    scalars = acc.Scalars("ema_val_clean_loss")
    assert [e.step for e in scalars] == [10, 20, 30, 40]
    assert [e.value for e in scalars] == pytest.approx(
        [r["metrics"]["ema_val_clean_loss"] for r in records], rel=1e-6
    )
    assert [e.step for e in acc.Scalars("train_loss")] == [10, 20, 30, 40]  # log_every_n_steps=10
    assert [e.step for e in acc.Scalars("lr")] == [10, 20, 30, 40]
    # The example's NoisyPredictions callback wrote through trainer.summary_writer into the same event file.
    assert [(e.step, e.width, e.height) for e in acc.Images("noisy_val/images")] == [
        (s, 32, 32) for s in (10, 20, 30, 40)
    ]
    assert [e.step for e in acc.Tensors("noisy_val/predictions/text_summary")] == [10, 20, 30, 40]

    # best.ckpt is the evaluation with the lowest ema_val_clean_loss (the example's early_stop target).
    best = torch.load(ckpt_dir / "best.ckpt", weights_only=True)
    assert best["trainer"]["global_step"] == _first_min_step(records, "ema_val_clean_loss")
    step40 = torch.load(ckpt_dir / "step_000000040.ckpt", weights_only=True)
    assert step40["trainer"]["global_step"] == 40
    assert torch.load(ckpt_dir / "step_000000020.ckpt", weights_only=True)["trainer"]["global_step"] == 20

    # The printed test accuracies are those of best.ckpt's raw and EMA weights, recomputed here by hand.
    base_state, ema_state = best["model"], best["ema"]["state_dict"]
    assert any(not torch.equal(base_state[k], ema_state[k]) for k in base_state)  # two different models
    expected = {"base": _count_correct_by_hand(base_state), "EMA": _count_correct_by_hand(ema_state)}
    assert _test_lines(out) == {name: (correct, 360) for name, correct in expected.items()}
    assert report is not None
    assert report["test_acc"] == expected["base"] / 360
    assert report["ema_test_acc"] == expected["EMA"] / 360
    assert report["best_checkpoint"] == str((ckpt_dir / "best.ckpt").resolve())


@pytest.mark.timeout(240)
def test_resume_last_from_an_fsspec_url_continues_bit_exactly(capsys):
    """A run interrupted after its step-20 checkpoint (simulated by copying only that file into a fresh
    memory:// directory) and resumed with --resume last ends exactly like the uninterrupted run.

    Step 20 is a pass boundary (1,257 training images, batches of 64), so the resumed run must restore the
    train loader's own seeded generator to shuffle the next pass as the uninterrupted run did."""
    fs = fsspec.filesystem("memory")
    tag = uuid.uuid4().hex
    full, resumed = f"memory://digits-{tag}/full", f"memory://digits-{tag}/resumed"
    try:
        digits.main(["--smoke", "--checkpoint-dir", full, "--log-dir", "logs-full"])
        out_full = capsys.readouterr().out
        at_20 = digits.tk.load_checkpoint(f"{full}/step_000000020.ckpt")["trainer"]
        assert (at_20["global_step"], at_20["epoch"], at_20["batch_in_epoch"]) == (20, 1, 0)
        fs.pipe_file(
            f"/digits-{tag}/resumed/step_000000020.ckpt",
            fs.cat_file(f"/digits-{tag}/full/step_000000020.ckpt"),
        )

        report = digits.main(
            ["--smoke", "--checkpoint-dir", resumed, "--log-dir", "logs-resumed", "--resume", "last"]
        )
        out_resumed = capsys.readouterr().out

        # Only the evaluations after step 20 ran again, with the same numbers as the first time.
        lines_full, lines_resumed = _eval_lines(out_full), _eval_lines(out_resumed)
        assert sorted(lines_resumed) == [30, 40]
        assert {s: lines_full[s] for s in (30, 40)} == lines_resumed
        records = [json.loads(line) for line in Path("logs-full/metrics.jsonl").read_text().splitlines()]
        best_step = _first_min_step(records, "ema_val_clean_loss")
        expected_names = ["step_000000020.ckpt", "step_000000040.ckpt"]
        if best_step > 20:  # best.ckpt is rewritten only when the resumed run improves on the saved best
            expected_names = ["best.ckpt", *expected_names]
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"/digits-{tag}/resumed", detail=False))
        assert names == expected_names

        a = digits.tk.load_checkpoint(f"{full}/step_000000040.ckpt")
        b = digits.tk.load_checkpoint(f"{resumed}/step_000000040.ckpt")
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert all(torch.equal(a["ema"]["state_dict"][k], b["ema"]["state_dict"][k]) for k in a["model"])
        opt_a, opt_b = a["optimizers"][0]["state"], b["optimizers"][0]["state"]
        assert opt_a.keys() == opt_b.keys()
        for i in opt_a:
            assert all(
                torch.equal(opt_a[i][name], opt_b[i][name]) for name in ("exp_avg", "exp_avg_sq", "step")
            )
        assert a["schedulers"][0]["_last_lr"] == b["schedulers"][0]["_last_lr"]
        assert _test_lines(out_resumed) == _test_lines(out_full)
        assert report is not None
        # fsspec writes the memory filesystem's URLs with a rooted path: memory:///digits-<tag>/...
        assert report["best_checkpoint"] == f"memory:///digits-{tag}/resumed/best.ckpt"
    finally:
        if fs.exists(f"/digits-{tag}"):
            fs.rm(f"/digits-{tag}", recursive=True)


@pytest.mark.timeout(180)
def test_script_runs_as_a_command_with_the_profiler():
    """`python examples/digits.py ...` as a user types it: short run, profiler on, trace files written."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--smoke", "--max-steps", "10", "--profile", "--log-dir", "logs"],
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(_eval_lines(proc.stdout)) == [10]
    assert "stopped at step 10 (max_steps)" in proc.stdout
    assert sorted(_test_lines(proc.stdout)) == ["EMA", "base"]
    assert sorted(os.listdir("runs/digits/checkpoints")) == ["best.ckpt"]  # save_interval 20 > 10 steps
    profiler_files = os.listdir("logs/profiler")
    assert "key_averages.txt" in profiler_files
    assert [f for f in profiler_files if f.endswith(".pt.trace.json")] != []
