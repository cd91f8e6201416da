"""``torch.profiler`` over a window of training steps, traces under ``log_dir/profiler``."""

from __future__ import annotations

import os
from typing import Any

import torch

DEFAULT_SCHEDULE = {"wait": 1, "warmup": 1, "active": 3, "repeat": 1}
SUMMARY_FILE = "key_averages.txt"
_SCHEDULE_KEYS = set(DEFAULT_SCHEDULE) | {"skip_first"}
_PROFILE_KEYS = {"record_shapes", "profile_memory", "with_stack", "with_flops", "with_modules", "activities"}


def check_profiler_kwargs(kwargs: dict[str, Any]) -> None:
    unknown = set(kwargs) - _SCHEDULE_KEYS - _PROFILE_KEYS - {"row_limit", "sort_by"}
    if unknown:
        raise ValueError(
            f"profiler_kwargs has unknown keys {sorted(unknown)}; allowed: "
            f"{sorted(_SCHEDULE_KEYS | _PROFILE_KEYS | {'row_limit', 'sort_by'})}"
        )


class StepProfiler:
    """Profiles training steps on a schedule (default wait 1, warmup 1, active 3, repeat 1).

    Traces are written by ``tensorboard_trace_handler`` (open them in TensorBoard's profiler tab or in
    Perfetto), and at the end a ``key_averages`` table goes to ``profiler/key_averages.txt``. A fit
    shorter than the schedule still ends cleanly with whatever was recorded.
    """

    def __init__(self, log_dir: str, kwargs: dict[str, Any]) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        self.dir = os.path.join(log_dir, "profiler")
        sched = {**DEFAULT_SCHEDULE, **{k: v for k, v in kwargs.items() if k in _SCHEDULE_KEYS}}
        options = {k: v for k, v in kwargs.items() if k in _PROFILE_KEYS}
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.row_limit = int(kwargs.get("row_limit", 30))
        self.sort_by = str(
            kwargs.get(
                "sort_by", "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            )
        )
        os.makedirs(self.dir, exist_ok=True)
        self._traces = 0

        def on_trace_ready(prof: Any) -> None:
            self._traces += 1
            tensorboard_trace_handler(self.dir)(prof)

        self.profile = profile(
            activities=options.pop("activities", activities),
            schedule=schedule(**sched),
            on_trace_ready=on_trace_ready,
            record_shapes=options.pop("record_shapes", True),
            profile_memory=options.pop("profile_memory", True),
            **options,
        )
        self.summary: str | None = None

    def start(self) -> None:
        self.profile.start()

    def step(self) -> None:
        self.profile.step()

    def stop(self) -> str | None:
        """Stop, write the summary table, and return it (None when nothing was recorded)."""
        self.profile.stop()
        try:
            events = self.profile.key_averages()
        except Exception:  # nothing recorded: the fit ended inside the wait/warmup window
            events = None
        if events is not None and len(events) > 0:
            self.summary = events.table(sort_by=self.sort_by, row_limit=self.row_limit)
            with open(os.path.join(self.dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
                f.write(self.summary)
        return self.summary
