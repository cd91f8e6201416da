"""The real ``tensorboard`` server reads a trainkit log_dir: scalars fetched over its HTTP data API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from helpers import TinyClassifier, make_loader, quiet

import trainkit as tk

TENSORBOARD = os.path.join(os.path.dirname(sys.executable), "tensorboard")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def poll(fetch, ready, deadline: float, proc: subprocess.Popen) -> Any:
    """Call ``fetch`` until ``ready(result)``; fail if the server exits or the deadline passes."""
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open("tensorboard.log", encoding="utf-8") as f:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {f.read()}")
        try:
            result = fetch()
            if ready(result):
                return result
        except OSError as exc:  # not listening yet
            last_error = exc
        time.sleep(0.2)
    pytest.fail(f"tensorboard did not serve the data in time (last error: {last_error})")


@pytest.mark.skipif(not os.path.exists(TENSORBOARD), reason="the tensorboard script is not installed")
@pytest.mark.timeout(90)
def test_tensorboard_server_serves_the_logged_scalars():
    trainer = tk.Trainer(
        **quiet(run_mode="step", max_steps=12, eval_interval=4, log_every_n_steps=3, log_dir="runs")
    )
    trainer.fit(TinyClassifier(), make_loader(), make_loader())
    expected = [(r["step"], float(np.float32(r["metrics"]["val_loss"]))) for r in trainer.history]
    assert [s for s, _ in expected] == [4, 8, 12]

    with serve("runs") as (base, proc):
        deadline = time.monotonic() + 60
        runs = poll(lambda: get_json(f"{base}/data/runs"), lambda r: len(r) > 0, deadline, proc)
        assert len(runs) == 1  # one run: the log_dir itself
        query = urllib.parse.urlencode({"run": runs[0], "tag": "val_loss"})
        points = poll(
            lambda: get_json(f"{base}/data/plugin/scalars/scalars?{query}"),
            lambda p: len(p) == len(expected),
            deadline,
            proc,
        )
        assert [(step, value) for _wall_time, step, value in points] == expected


@contextlib.contextmanager
def serve(logdir: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``tensorboard --logdir`` on a free local port: yields its base URL and process."""
    port = free_port()
    with open("tensorboard.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [TENSORBOARD, "--logdir", os.path.abspath(logdir), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the data server it starts goes down with it
        )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_group(proc)


def post_json(url: str, body: dict[str, Any]) -> Any:
    """POST a JSON request, as TensorBoard's HParams dashboard does."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


@pytest.mark.skipif(not os.path.exists(TENSORBOARD), reason="the tensorboard script is not installed")
@pytest.mark.timeout(120)
def test_hparams_tab_serves_each_runs_settings_with_its_evaluation_metrics():
    """Two runs under one --logdir: the HParams plugin's experiment has the evaluation metrics as columns,
    and each run's session carries its own settings and its last value of every metric."""
    histories = {}
    for name, max_steps in (("a", 8), ("b", 12)):
        trainer = tk.Trainer(
            **quiet(run_mode="step", max_steps=max_steps, eval_interval=4, log_every_n_steps=3, use_ema=True,
                    log_dir=f"runs/{name}")
        )  # fmt: skip
        trainer.fit(TinyClassifier(), make_loader(), make_loader(), test_loader=make_loader(n=16, seed=1))
        histories[name] = trainer.history
    metric_names = list(histories["a"][0]["metrics"])
    assert sorted(metric_names) == sorted(
        f"{p}{s}_{m}" for p in ("", "ema_") for s in ("val", "test") for m in ("loss", "acc")
    )

    with serve("runs") as (base, proc):
        deadline = time.monotonic() + 60
        url = f"{base}/data/plugin/hparams"
        experiment = poll(
            lambda: post_json(f"{url}/experiment", {"experimentName": ""}),
            lambda e: len(e.get("metricInfos", [])) > 0,
            deadline,
            proc,
        )
        assert [m["name"]["tag"] for m in experiment["metricInfos"]] == metric_names
        assert {m["name"].get("group", "") for m in experiment["metricInfos"]} == {""}
        assert {"max_steps", "eval_interval", "use_ema"} <= {h["name"] for h in experiment["hparamInfos"]}

        request = {"experimentName": "", "allowedStatuses": ALL_STATUSES, "startIndex": 0, "sliceSize": 10}
        groups = poll(
            lambda: post_json(f"{url}/session_groups", request),
            lambda g: g.get("totalSize") == 2,
            deadline,
            proc,
        )["sessionGroups"]
    by_name = {g["name"]: g for g in groups}
    assert sorted(by_name) == ["a", "b"]
    for name, max_steps in (("a", 8), ("b", 12)):
        group = by_name[name]
        assert group["hparams"]["max_steps"] == max_steps
        last = histories[name][-1]
        served = {m["name"]["tag"]: (m["trainingStep"], m["value"]) for m in group["metricValues"]}
        assert served == {k: (max_steps, float(np.float32(v))) for k, v in last["metrics"].items()}
        assert last["step"] == max_steps


def stop_group(proc: subprocess.Popen) -> None:
    """Stop the server and the process group it leads (the group this test created, by its id)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.skipif(not os.path.exists(TENSORBOARD), reason="the tensorboard script is not installed")
@pytest.mark.timeout(150)
def test_hparams_tab_of_the_digits_example_has_both_validation_sets_as_columns(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "digits.py"
    spec = importlib.util.spec_from_file_location("digits_example_tb", path)
    assert spec is not None and spec.loader is not None
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    digits.main(["--smoke", "--max-steps", "20"])  # evaluations at steps 10 and 20
    capsys.readouterr()
    with open(os.path.join("runs", "digits", "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [10, 20]
    names = list(records[0]["metrics"])
    assert {"val_clean_loss", "val_noisy_acc", "ema_val_clean_loss", "ema_val_noisy_loss"} <= set(names)

    with serve(os.path.join("runs", "digits")) as (base, proc):
        deadline = time.monotonic() + 60
        url = f"{base}/data/plugin/hparams"
        experiment = poll(
            lambda: post_json(f"{url}/experiment", {"experimentName": ""}),
            lambda e: len(e.get("metricInfos", [])) > 0,
            deadline,
            proc,
        )
        assert [m["name"]["tag"] for m in experiment["metricInfos"]] == names
        request = {"experimentName": "", "allowedStatuses": ALL_STATUSES, "startIndex": 0, "sliceSize": 10}
        [group] = poll(
            lambda: post_json(f"{url}/session_groups", request),
            lambda g: g.get("totalSize") == 1,
            deadline,
            proc,
        )["sessionGroups"]
    assert group["hparams"]["max_steps"] == 20 and group["hparams"]["eval_interval"] == 10
    served = {m["name"]["tag"]: (m["trainingStep"], m["value"]) for m in group["metricValues"]}
    assert served == {k: (20, float(np.float32(v))) for k, v in records[-1]["metrics"].items()}
