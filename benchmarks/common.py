"""Shared pieces of the benchmark scripts: arguments, interleaved timing, summaries, tables, JSON.

Every script measures *ratios side by side in one process run*: the contenders run interleaved
(A, B, C, A, B, C, ...) after a warm-up, so slow drifts of a shared machine hit all of them alike; each
result is a median with its min-max; the output names the versions and the machine.

Use from a script next to this file::

    from common import Bench, interleave, summarize, print_table

    bench = Bench("overhead", __doc__)          # parses --smoke, --repeats, --out
    times = interleave({"hand-written": run_a, "trainkit": run_b}, repeats=bench.repeats, warmup=1)
    s = summarize(times["trainkit"])           # {"median": ..., "min": ..., "max": ..., "n": ...}
    bench.add_row({"contender": "trainkit", "seconds": s})
    bench.finish()                              # prints the environment, writes results/overhead.json

JSON layout (``benchmarks/results/NAME.json``; ``--smoke`` runs write ``NAME.smoke.json`` unless
``--out`` says otherwise)::

    {"benchmark": NAME, "date": ..., "command": ..., "smoke": bool, "settings": {...},
     "environment": {"versions": {...}, "machine": {...}}, "rows": [...], "notes": [...]}
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

if ROOT not in sys.path:  # run as `python benchmarks/NAME.py` from a checkout without installing
    sys.path.insert(0, ROOT)

PACKAGES = (
    "torch",
    "trainkit",
    "lightning",
    "pytorch-ignite",
    "numpy",
    "fsspec",
    "s3fs",
    "moto",
    "tensorboard",
    "tqdm",
)


# -- environment ------------------------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None; never imports it (importing lightning takes seconds)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "trainkit"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """Versions of the packages that matter and a description of the machine. Doesn't import torch where
    the script hasn't (import_time.py times fresh interpreters and needs no torch of its own)."""
    torch = sys.modules.get("torch")
    versions = {name: package_version(name) for name in PACKAGES}
    versions["python"] = platform.python_version()
    if torch is not None:
        versions["torch"] = torch.__version__  # the local build tag too, e.g. 2.13.0+cpu
    versions["trainkit_commit"] = _git_commit()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    machine = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "mem_total_gib": _mem_total_gib(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "cuda": torch.cuda.get_device_name() if torch is not None and torch.cuda.is_available() else None,
        "load_average": load_average(),
    }
    return {"versions": versions, "machine": machine}


# -- timing -----------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements (and how many there were)."""
    if not values:
        raise ValueError("summarize() needs at least one value")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def interleave(
    contenders: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[Any]]:
    """Call every contender ``warmup`` times (results dropped), then ``repeats`` rounds of A, B, C, ...

    Each call returns its own measurement (a number, or a dict of them); the lists come back in call
    order. A garbage collection runs before every call so that one contender's garbage isn't collected
    on another's clock.
    """
    for _ in range(warmup):
        for fn in contenders.values():
            gc.collect()
            fn()
    results: dict[str, list[Any]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            gc.collect()
            results[name].append(fn())
    return results


def timed(fn: Callable[[], Any]) -> float:
    """Seconds that one call of ``fn`` takes (perf_counter)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def tty_stderr() -> Iterator[None]:
    """Point ``sys.stderr`` at a pseudo-terminal for the duration, as an interactive run would have it
    (progress bars then draw as they do for a user); a thread drains and drops what is drawn."""
    import pty

    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", buffering=1, encoding="utf-8", errors="replace")
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                if not os.read(master, 65536):
                    return
            except OSError:
                return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    previous = sys.stderr
    sys.stderr = stream
    try:
        yield
    finally:
        sys.stderr = previous
        stop.set()
        stream.close()  # the reader sees EOF/EIO and ends
        reader.join(timeout=5)
        os.close(master)


# -- output -----------------------------------------------------------------------------------------------


def mlp(sizes: Sequence[int], seed: int) -> Any:
    """``Linear`` layers of ``sizes`` with a ReLU between each two, built right after
    ``torch.manual_seed(seed)``: every contender starts from the same weights and draws the same shuffles."""
    import torch  # here, not at the top: import_time.py times `import torch` itself

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def fmt_stat(stat: Mapping[str, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    """``median (min-max)`` of a :func:`summarize` dict, each multiplied by ``scale``."""
    if stat is None:
        return "-"
    return (
        f"{stat['median'] * scale:.{digits}f} "
        f"({stat['min'] * scale:.{digits}f}-{stat['max'] * scale:.{digits}f})"
    )


def fmt_ratio(ratio: float | None, target: float | None = None) -> str:
    if ratio is None:
        return "-"
    text = f"{ratio:.3f}x"
    if target is not None:
        text += f" ({'meets' if ratio <= target else 'MISSES'} <= {target:g})"
    return text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(markdown_table(headers, rows), flush=True)


class Bench:
    """One benchmark run: its arguments, its rows and notes, and the JSON it writes at the end."""

    def __init__(
        self,
        name: str,
        description: str | None,
        *,
        default_repeats: int,
        smoke_repeats: int = 1,
        extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
        argv: Sequence[str] | None = None,
        script: str | None = None,
    ) -> None:
        """``name`` names the JSON file; ``script`` the file under benchmarks/ that ran (default: name)."""
        parser = argparse.ArgumentParser(
            description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        parser.add_argument("--smoke", action="store_true", help="a few steps of everything (for CI)")
        parser.add_argument("--repeats", type=int, default=None, help="measured rounds per contender")
        parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/NAME.json)")
        if extra_args is not None:
            extra_args(parser)
        self.args = parser.parse_args(argv)
        self.name = name
        self.smoke: bool = self.args.smoke
        self.repeats: int = self.args.repeats or (smoke_repeats if self.smoke else default_repeats)
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.settings: dict[str, Any] = {"repeats": self.repeats}
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.load_at_start = load_average()
        argv_used = list(sys.argv[1:]) if argv is None else list(argv)
        script_path = f"benchmarks/{script or name}.py"
        self.command = " ".join(["python", script_path, *(shlex.quote(a) for a in argv_used)])
        self.env = environment()
        versions, machine = self.env["versions"], self.env["machine"]
        print(
            f"# {name}: {self.command}\n"
            f"# {self.started:%Y-%m-%d %H:%M} UTC | python {versions['python']} | torch {versions['torch']} | "
            f"trainkit {versions['trainkit']} ({versions['trainkit_commit']}) | "
            f"lightning {versions['lightning']} | pytorch-ignite {versions['pytorch-ignite']}\n"
            f"# {machine['cpu']} | {machine['cpus_usable']} usable CPUs | torch threads "
            f"{machine['torch_threads']} | load average {machine['load_average']}"
            + (" | SMOKE MODE (numbers mean nothing)" if self.smoke else ""),
            flush=True,
        )

    def add_row(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.notes.append(text)

    def out_path(self) -> str:
        if self.args.out:
            return os.path.abspath(self.args.out)
        return os.path.join(RESULTS, f"{self.name}{'.smoke' if self.smoke else ''}.json")

    def finish(self) -> str:
        """Write the JSON and return its path."""
        self.env["machine"]["load_average_end"] = load_average()
        self.env["machine"]["load_average"] = self.load_at_start
        payload = {
            "benchmark": self.name,
            "date": self.started.isoformat(timespec="seconds"),
            "command": self.command,
            "smoke": self.smoke,
            "settings": self.settings,
            "environment": self.env,
            "rows": self.rows,
            "notes": self.notes,
            "seconds": round((_dt.datetime.now(_dt.timezone.utc) - self.started).total_seconds(), 1),
        }
        path = self.out_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, default=_json_default)
            f.write("\n")
        print(f"# wrote {os.path.relpath(path, os.getcwd())}", flush=True)
        return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
