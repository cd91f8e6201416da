"""Import time: `python -c "import trainkit"` against `python -c "import torch"`, each in a fresh process.

The commands run interleaved (empty interpreter, torch, trainkit, and the peers where installed) after
one warm-up round; each time is the wall time of the whole subprocess. The ratio is the median of the
per-round ratios trainkit / torch (target <= 1.15x). Then one `python -X importtime -c "import trainkit"`
lists the modules trainkit adds beyond torch's own import, by cumulative time, to show where any
extra time goes.

    python benchmarks/import_time.py [--repeats 15]
    python benchmarks/import_time.py --smoke
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any

from common import ROOT, Bench, fmt_ratio, fmt_stat, interleave, package_version, print_table, summarize

TARGET = 1.15
COMMANDS = {
    "python -c pass": ("pass", None),
    "import torch": ("import torch", None),
    "import trainkit": ("import trainkit", None),
    "import lightning.pytorch": ("import lightning.pytorch", "lightning"),
    "import ignite.engine": ("import ignite.engine", "pytorch-ignite"),
}


# A default interpreter: bytecode is cached on first import (the warm-up round), as in any normal install.
# (Some sandboxes export PYTHONDONTWRITEBYTECODE=1, which would recompile trainkit's source on every run
# while torch's and the peers' .pyc files, written by pip, are used.)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_python(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, check=True)
    return time.perf_counter() - start


def import_profile() -> list[tuple[str, float, float]]:
    """``-X importtime`` of ``import torch; import trainkit``: (name, self s, cumulative s) of each module
    that ``import trainkit`` loads once torch is in, i.e. what trainkit adds beyond torch's own import."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import torch; import trainkit"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    rows: list[tuple[str, float, float]] = []
    torch_done = False
    for line in proc.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not match:
            continue
        name, nested = match.group(4), len(match.group(3)) > 1
        if torch_done:
            rows.append((name, int(match.group(1)) / 1e6, int(match.group(2)) / 1e6))
        elif name == "torch" and not nested:  # modules are listed as they finish: torch's own end here
            torch_done = True
    return rows


def beyond_torch(rows: list[tuple[str, float, float]]) -> dict[str, Any]:
    top = sorted((r for r in rows if "." not in r[0]), key=lambda r: r[2], reverse=True)
    return {
        "modules_beyond_torch": len(rows),
        "module_names_beyond_torch": sorted(n for n, _, _ in rows),
        "self_seconds_beyond_torch": sum(s for _, s, _ in rows),
        "top_level_beyond_torch": [{"module": n, "cumulative_s": c} for n, _, c in top[:12]],
    }


def main(argv: list[str] | None = None) -> int:
    bench = Bench("import_time", __doc__, default_repeats=15, smoke_repeats=1, argv=argv)
    commands = {}
    for label, (code, dist) in COMMANDS.items():
        if dist is not None and bench.smoke:
            continue  # the peers take seconds to import; the smoke run only checks the script works
        if dist is not None and package_version(dist) is None:
            bench.note(f"{dist} is not installed: '{label}' skipped")
            continue
        commands[label] = code
    warmup = 0 if bench.smoke else 1
    if "PYTHONDONTWRITEBYTECODE" in os.environ:
        bench.note("PYTHONDONTWRITEBYTECODE is set here; the timed subprocesses run without it")
    bench.settings.update(commands=commands, python=sys.executable, cwd=ROOT, warmup_runs=warmup)
    results = interleave(
        {label: (lambda code=code: run_python(code)) for label, code in commands.items()},
        repeats=bench.repeats,
        warmup=warmup,
    )
    torch_times = results["import torch"]
    table = []
    for label, values in results.items():
        stat = summarize(values)
        ratio = summarize([v / t for v, t in zip(values, torch_times)]) if label != "import torch" else None
        target = TARGET if label == "import trainkit" else None
        bench.add_row({
            "command": label, "seconds": stat, "ratio_to_torch": ratio, "target": target,
            "meets_target": (ratio["median"] <= target) if (ratio and target is not None) else None,
            "samples_s": [round(v, 4) for v in values],
        })  # fmt: skip
        table.append([
            label, fmt_stat(stat, 1e3, 0),
            "1 (reference)" if ratio is None
            else f"{fmt_ratio(ratio['median'], target)} [{ratio['min']:.3f}-{ratio['max']:.3f}]",
        ])  # fmt: skip
    extra = beyond_torch(import_profile())
    bench.settings["trainkit_import_profile"] = extra
    print()
    print_table(["command", "ms median (min-max)", "ratio to import torch [min-max]"], table)
    print(
        f"\n-X importtime: trainkit imports {extra['modules_beyond_torch']} modules beyond torch's, "
        f"{extra['self_seconds_beyond_torch'] * 1e3:.0f} ms of their own time; largest top-level ones:"
    )
    for entry in extra["top_level_beyond_torch"]:
        print(f"  {entry['module']:<24} {entry['cumulative_s'] * 1e3:7.1f} ms cumulative")
    bench.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
