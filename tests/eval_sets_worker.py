"""One rank of the two-rank evaluation-sets run in tests/test_eval_sets.py (also its one-process reference).

    python -m torch.distributed.run --nproc_per_node=2 tests/eval_sets_worker.py OUT_DIR

Each rank fits with two named validation sets of odd sizes (so the shards are uneven), then validates the
final weights on the same mapping while the process group (created here, so trainkit keeps it) is alive,
and saves what it saw to OUT_DIR/rank<R>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # noqa: F401  before the group exists: see the README (Distributed, creating the group yourself)
import torch.distributed as dist
from helpers import TinyClassifier, make_loader  # the script's directory (tests/) is on sys.path

import trainkit as tk

PER_RANK_BATCH = 4


def val_sets() -> dict[str, torch.utils.data.DataLoader]:
    return {"id": make_loader(37, batch_size=5, seed=1), "ood": make_loader(23, batch_size=4, seed=2)}


def run(rank: int, world_size: int, out: Path | None) -> tuple[tk.Trainer, dict[str, Any]]:
    """Fit and validate; ``world_size`` 1 is the one-process reference (batch 2B), otherwise DDP."""
    distributed = world_size > 1
    module = TinyClassifier(seed=rank)  # DDP broadcasts rank 0's weights
    trainer = tk.Trainer(
        run_mode="step", max_steps=8, eval_interval=4, use_ema=True, ema_decay=0.9,
        early_stop={"target": "val_ood_loss", "patience": 5}, distributed=distributed,
        checkpoint_dir=None, log_dir=str(out / f"runs{rank}") if out is not None else None, progress_bar=False,
    )  # fmt: skip
    batch = PER_RANK_BATCH if distributed else 2 * PER_RANK_BATCH
    trainer.fit(module, make_loader(64, batch_size=batch), val_sets())
    report = {
        "history": [{"step": r["step"], "metrics": dict(r["metrics"])} for r in trainer.history],
        "validate": trainer.validate(module, val_sets()),
        "has_writer": trainer.summary_writer is not None,
    }
    return trainer, report


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # ours: trainkit leaves it alive after fit, so validate() is sharded
    rank = dist.get_rank()
    _, result = run(rank, dist.get_world_size(), out_dir)
    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
