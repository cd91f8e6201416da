"""The benchmark scripts overhead.py, checkpoint_io.py and import_time.py run end to end in smoke mode
(a few steps of everything, in a subprocess, as `python benchmarks/NAME.py --smoke`) and write JSON of
the documented shape; plus the shared timing helpers in benchmarks/common.py. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import trainkit as tk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_smoke(name: str, tmp_path, timeout: float) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, f"{name}.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"{name}.py --smoke failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(out, encoding="utf-8") as f:
        payload = json.load(f)
    assert payload["benchmark"] == name
    assert payload["smoke"] is True
    assert payload["command"] == f"python benchmarks/{name}.py --smoke --out {out}"
    versions, machine = payload["environment"]["versions"], payload["environment"]["machine"]
    assert versions["torch"] == torch.__version__
    assert versions["trainkit"] == tk.__version__
    assert machine["cpu_count"] == os.cpu_count()
    assert {"cpu", "platform", "load_average", "load_average_end", "torch_threads"} <= set(machine)
    assert f"# wrote {os.path.relpath(out, tmp_path)}" in proc.stdout
    return payload, proc.stdout


def assert_stat(stat: dict) -> None:
    assert set(stat) == {"median", "min", "max", "n"}
    assert 0 < stat["min"] <= stat["median"] <= stat["max"]


# -- common.py ------------------------------------------------------------------------------------------------


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import common

    return common


def test_interleave_warms_up_then_runs_contenders_in_rounds(common):
    calls: list[str] = []

    def contender(name: str, value: float):
        def run() -> float:
            calls.append(name)
            return value + len(calls)

        return run

    results = common.interleave({"A": contender("A", 0.0), "B": contender("B", 100.0)}, repeats=3, warmup=1)
    assert calls == ["A", "B"] * 4
    assert results == {"A": [3.0, 5.0, 7.0], "B": [104.0, 106.0, 108.0]}  # warm-up results are dropped


def test_summarize_and_formatting(common):
    assert common.summarize([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert common.fmt_stat(common.summarize([0.001, 0.002, 0.004]), 1e3) == "2.0 (1.0-4.0)"
    assert common.fmt_ratio(1.04, 1.03) == "1.040x (MISSES <= 1.03)"
    assert common.fmt_ratio(1.02, 1.03) == "1.020x (meets <= 1.03)"
    with pytest.raises(ValueError, match="at least one"):
        common.summarize([])


# -- the scripts ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_overhead_smoke(tmp_path):
    payload, stdout = run_smoke("overhead", tmp_path, timeout=580)
    peers = [("lightning", "lightning"), ("ignite", "ignite")]
    present = [name for name, module in peers if installed(module)]
    expected = set()
    for wl in ("W1", "W2", "W3"):
        expected |= {(wl, "hand-written"), (wl, "trainkit")} | {(wl, p) for p in present}
    expected.add(("W1", "trainkit+logging"))
    rows = {(r["workload"], r["contender"]): r for r in payload["rows"]}
    assert set(rows) == expected
    for name, module in peers:
        if not installed(module):
            assert any(f"{name} is not installed" in note for note in payload["notes"])
    for (_, contender), row in rows.items():
        assert_stat(row["wall_us_per_step"])
        assert_stat(row["cpu_us_per_step"])
        assert_stat(row["first_step_ms"])
        assert len(row["wall_samples_us"]) == row["wall_us_per_step"]["n"] == payload["settings"]["repeats"]
        if contender == "hand-written":
            assert row["wall_ratio"] is None and row["cpu_ratio"] is None
        else:
            assert_stat(row["wall_ratio"])
            assert_stat(row["cpu_ratio"])
    targets = {key: row["target"] for key, row in rows.items() if row["target"] is not None}
    assert targets == {("W1", "trainkit"): 1.03, ("W3", "trainkit"): 1.03, ("W1", "trainkit+logging"): 1.10}
    for key in targets:
        assert rows[key]["meets_target"] is (rows[key]["wall_ratio"]["median"] <= targets[key])
    # Same seed, same shuffles, same arithmetic: trainkit ends with exactly the weights of the hand-written
    # loop (clipping, the EMA, the schedule and evaluations included in W3).
    for wl in ("W1", "W2", "W3"):
        assert (
            rows[(wl, "trainkit")]["final_weights_digest"]
            == rows[(wl, "hand-written")]["final_weights_digest"]
        )
        assert rows[(wl, "trainkit")]["same_weights_as_hand_written"] is True
    assert (
        rows[("W1", "trainkit+logging")]["final_weights_digest"]
        == rows[("W1", "hand-written")]["final_weights_digest"]
    )
    assert payload["settings"]["workloads"]["W3"]["features"] is True
    assert "| W3 | trainkit |" in stdout


@pytest.mark.timeout(600)
def test_checkpoint_io_smoke(tmp_path):
    payload, stdout = run_smoke("checkpoint_io", tmp_path, timeout=580)
    expected = {
        ("local", "write", "torch.save"),
        ("local", "write", "torch.save + fsync"),
        ("local", "write", "by hand: temp file + fsync + rename"),
        ("local", "write", "trainkit write"),
        ("local", "read", "torch.load"),
        ("local", "read", "trainkit read"),
        ("async", "stall, first save", "sync save"),
        ("async", "stall, first save", "trainkit async save"),
        ("async", "stall, later save", "sync save"),
        ("async", "stall, later save", "trainkit async save"),
    }
    if installed("s3fs") and installed("moto"):
        expected |= {
            ("s3", "write", "fs.pipe (bytes ready)"),
            ("s3", "write", "torch.save to memory + fs.pipe"),
            ("s3", "write", "trainkit write"),
            ("s3", "read", "fs.cat + torch.load"),
            ("s3", "read", "trainkit read"),
        }
    rows = {(r["group"], r["operation"], r["contender"]): r for r in payload["rows"]}
    assert set(rows) == expected
    targets = {key: row["target"] for key, row in rows.items() if row["target"] is not None}
    want = {("local", "write", "trainkit write"): 1.10, ("local", "read", "trainkit read"): 1.10}
    want[("async", "stall, later save", "trainkit async save")] = 0.25
    if installed("s3fs") and installed("moto"):
        want[("s3", "write", "trainkit write")] = 1.2
    assert targets == want
    for row in rows.values():
        assert_stat(row["seconds"])
        assert row["bytes"] == payload["settings"]["file_bytes"] > 0
        assert (row["ratio"] is None) == (row["contender"] == row["reference"])
    settings = payload["settings"]
    assert settings["parameters"] == 2 * (64 * 64 + 64)  # the smoke model: two Linear(64, 64)
    # float32 weights, exp_avg and exp_avg_sq; AdamW's 4 float32 step counters; the saved torch RNG state
    rng_bytes = torch.get_rng_state().numel()
    assert settings["tensor_bytes"] == 3 * 4 * settings["parameters"] + 4 * 4 + rng_bytes
    assert not os.path.exists(settings["directory"])  # the scratch directory is removed


@pytest.mark.timeout(600)
def test_import_time_smoke(tmp_path):
    payload, stdout = run_smoke("import_time", tmp_path, timeout=580)
    rows = {r["command"]: r for r in payload["rows"]}
    assert set(rows) == {"python -c pass", "import torch", "import trainkit"}
    assert rows["import torch"]["ratio_to_torch"] is None
    assert rows["import trainkit"]["target"] == 1.15
    assert rows["import trainkit"]["meets_target"] is (
        rows["import trainkit"]["ratio_to_torch"]["median"] <= 1.15
    )
    for row in rows.values():
        assert_stat(row["seconds"])
    profile = payload["settings"]["trainkit_import_profile"]
    top = [entry["module"] for entry in profile["top_level_beyond_torch"]]
    assert top[0] == "trainkit"  # the package itself holds everything it imports beyond torch
    names = set(profile["module_names_beyond_torch"])
    assert {"trainkit", "trainkit.trainer", "trainkit.checkpoint", "trainkit.ema"} <= names
    # TensorBoard is imported only when a run logs (trainkit/loggers.py), never by `import trainkit`.
    assert not any(
        n == "tensorboard" or n.startswith(("tensorboard.", "torch.utils.tensorboard")) for n in names
    )
