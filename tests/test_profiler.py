"""``use_profiler=True``: real ``torch.profiler`` traces under ``log_dir/profiler``, read back as JSON.

How the step numbers arise: the Trainer starts the profiler when fit starts and calls ``profiler.step()``
after every optimizer step, so ``ProfilerStep#k`` spans optimizer step ``k + 1``; a schedule with ``wait``
W, ``warmup`` U and ``active`` A records ``ProfilerStep#W+U .. #W+U+A-1``. The last ``step()`` of a fit
opens one more (empty) ``ProfilerStep`` that ``stop()`` closes, which shows up when fit ends inside the
active window.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter

import pytest
from helpers import TinyClassifier, make_loader, quiet

import trainkit as tk

PROFILER_DIR = os.path.join("runs", "profiler")
SUMMARY = os.path.join(PROFILER_DIR, "key_averages.txt")


def fit_profiled(max_steps: int, **kwargs) -> tk.FitResult:
    trainer = tk.Trainer(
        **quiet(run_mode="step", max_steps=max_steps, eval_interval=100, log_dir="runs", **kwargs)
    )
    return trainer.fit(TinyClassifier(), make_loader())


def traces() -> list[Counter]:
    """Event-name counts of each trace file, oldest first (file names end in a nanosecond timestamp)."""
    files = glob.glob(os.path.join(PROFILER_DIR, "*.pt.trace.json"))
    files.sort(key=lambda f: int(os.path.basename(f).split(".")[-4]))
    result = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
        result.append(Counter(e["name"] for e in events if "name" in e))
    return result


def profiler_steps(names: Counter) -> set[int]:
    return {int(n.split("#")[1]) for n in names if n.startswith("ProfilerStep#")}


def test_default_schedule_records_three_active_steps_and_writes_the_summary(caplog):
    caplog.set_level(logging.INFO, logger="trainkit")
    result = fit_profiled(8, use_profiler=True)
    assert result.global_step == 8
    [trace] = traces()
    # wait 1, warmup 1, active 3: steps 2, 3, 4, i.e. optimizer steps 3, 4 and 5, one optimizer step each.
    assert profiler_steps(trace) == {2, 3, 4}
    assert trace["Optimizer.step#SGD.step"] == 3
    assert trace["aten::cross_entropy_loss"] == 3
    assert sorted(os.listdir(PROFILER_DIR)) == sorted(
        ["key_averages.txt", *(os.path.basename(f) for f in glob.glob(os.path.join(PROFILER_DIR, "*.json")))]
    )
    with open(SUMMARY, encoding="utf-8") as f:
        summary = f.read()
    assert "ProfilerStep*" in summary and "aten::addmm" in summary and "Self CPU" in summary
    assert any(summary in r.getMessage() for r in caplog.records)  # the table is also logged at the end


def test_profiler_kwargs_override_the_schedule():
    fit_profiled(8, use_profiler=True, profiler_kwargs={"wait": 2, "warmup": 1, "active": 2})
    [trace] = traces()
    assert profiler_steps(trace) == {3, 4}
    assert trace["Optimizer.step#SGD.step"] == 2


@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events")
def test_repeat_writes_one_trace_per_cycle():
    fit_profiled(8, use_profiler=True, profiler_kwargs={"wait": 0, "warmup": 1, "active": 1, "repeat": 2})
    assert [profiler_steps(t) for t in traces()] == [{1}, {3}]
    assert os.path.exists(SUMMARY)


def test_fit_ending_inside_the_active_window_keeps_what_was_recorded():
    result = fit_profiled(3, use_profiler=True)
    assert (result.global_step, result.stop_reason) == (3, "max_steps")
    [trace] = traces()
    assert profiler_steps(trace) == {2, 3}  # #3 is the empty step opened by the final step()
    assert trace["Optimizer.step#SGD.step"] == 1
    assert os.path.exists(SUMMARY)


def test_fit_ending_before_the_active_window_ends_cleanly_with_no_trace():
    result = fit_profiled(1, use_profiler=True)
    assert (result.global_step, result.stop_reason) == (1, "max_steps")
    assert os.listdir(PROFILER_DIR) == []


def test_without_use_profiler_there_is_no_profiler_directory():
    fit_profiled(8)
    assert not os.path.exists(PROFILER_DIR)
    assert [f.startswith("events.out.tfevents.") for f in os.listdir("runs")] == [True]


def test_profiler_settings_are_validated_at_construction():
    with pytest.raises(ValueError, match="log_dir"):
        tk.Trainer(max_steps=1, use_profiler=True, log_dir=None, checkpoint_dir=None)
    with pytest.raises(ValueError, match="profiler_kwargs.*'wiat'"):
        tk.Trainer(max_steps=1, use_profiler=True, profiler_kwargs={"wiat": 1}, checkpoint_dir=None)
    assert not os.path.exists("runs")  # nothing written before validation passes
