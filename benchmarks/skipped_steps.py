"""What it costs not to count a GradScaler-skipped step (issue 14, item 3).

With ``precision="16-mixed"`` the GradScaler skips the optimizer step whose gradients hold inf/NaN. trainkit
counts *attempts*, as Lightning does: ``global_step``, step-interval schedulers and the EMA advance on a
skipped step too, and the skipped ones are counted on the device (no host sync) and logged. The alternative
is to advance only on real steps, which needs to know on the host, every step, whether the scaler stepped.
Four loops of ``steps`` training steps (forward, scaled backward, scaler step and update, scheduler, EMA,
zero_grad) run interleaved, A, B, C, D per round after a warm-up:

    attempts            the torch recipe; scheduler and EMA every step (the reference)
    attempts+count      trainkit's choice: the reference + a device-side count of skipped steps
    real steps (sync)   read found_inf with .item() after scaler.step(); scheduler/EMA only on real steps
    real steps (hook)   an optimizer step post-hook tells whether step() ran; scheduler/EMA only then
                        (free for torch's for-each optimizers, whose scaler.step() syncs anyway; useless
                        for fused ones, whose step() always runs and skips inside the kernel)

for a plain (for-each) AdamW and a fused AdamW. Each ratio is the median of per-round ratios to the
reference. On a CPU a host sync costs nothing (there is no device queue to drain): the numbers that
decide are a GPU's; run it there with ``--device cuda``.

    python benchmarks/skipped_steps.py [--repeats 7] [--device cuda]
    python benchmarks/skipped_steps.py --smoke
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import Bench, fmt_ratio, fmt_stat, interleave, mlp, print_table, summarize

import trainkit as tk

VARIANTS = ("attempts", "attempts+count", "real steps (sync)", "real steps (hook)")


def make_loop(variant: str, fused: bool, device: torch.device, steps: int, batch: int) -> Callable[[], float]:
    model = mlp([128, 512, 512, 10], seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    sched = tk.WarmupScheduler(opt, 100)
    ema = tk.EMA(model, decay=0.999)
    scaler = torch.amp.GradScaler(device.type)
    gen = torch.Generator(device="cpu").manual_seed(1)
    xs = [torch.randn(batch, 128, generator=gen).to(device) for _ in range(8)]
    ys = [torch.randint(0, 10, (batch,), generator=gen).to(device) for _ in range(8)]
    skipped = torch.zeros((), device=device)
    stepped = [False]
    if variant == "real steps (hook)":
        opt.register_step_post_hook(lambda *_: stepped.__setitem__(0, True))

    def run() -> float:
        nonlocal skipped
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(steps):
            with torch.autocast(device.type, dtype=torch.float16):
                loss = F.cross_entropy(model(xs[i % 8]), ys[i % 8])
            scaler.scale(loss).backward()
            stepped[0] = False
            scaler.step(opt)
            found = sum(scaler._found_inf_per_device(opt).values())
            scaler.update()
            if variant == "attempts+count":
                skipped = skipped + found  # stays on the device: no sync
                advance = True
            elif variant == "real steps (sync)":
                advance = not bool(found)  # .item(): waits for the device queue
            elif variant == "real steps (hook)":
                advance = stepped[0]
            else:
                advance = True
            if advance:
                sched.step()
                ema.update()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    return run


def main() -> None:
    torch.set_num_threads(1)

    def extra(parser) -> None:
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    bench = Bench("skipped_steps", __doc__, default_repeats=7, smoke_repeats=1, extra_args=extra)
    device = torch.device(bench.args.device)
    steps, batch = (3, 8) if bench.smoke else (50, 32)
    bench.settings.update(
        {"device": str(device), "steps": steps, "batch": batch, "model": "mlp 128-512-512-10"}
    )
    table = []
    for fused in (False, True):
        loops = {v: make_loop(v, fused, device, steps, batch) for v in VARIANTS}
        times = interleave(loops, repeats=bench.repeats, warmup=1)
        stats = {k: summarize(v) for k, v in times.items()}
        ratios = {v: statistics.median(a / b for a, b in zip(times[v], times["attempts"])) for v in VARIANTS}
        optimizer = "AdamW fused" if fused else "AdamW for-each"
        bench.add_row({"optimizer": optimizer, "seconds_per_step": stats, "ratio_to_attempts": ratios})
        for v in VARIANTS:
            table.append([optimizer, v, fmt_stat(stats[v], 1e6, 1), fmt_ratio(ratios[v])])
    print_table(["optimizer", "loop", "µs/step (min-max)", "ratio to attempts"], table)
    bench.note("µs per training step: median (min-max) over rounds; ratios: median of per-round ratios")
    if device.type == "cpu":
        bench.note("on a CPU a host sync drains no device queue: these ratios cannot show a GPU's stall")
    bench.finish()


if __name__ == "__main__":
    main()
