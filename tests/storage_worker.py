"""One rank of a two-rank fit whose checkpoint_dir cannot be written (a file); test_checkpoint_faults.py
launches it under torchrun. Each rank writes what fit raised, and the steps it saw, to OUT_DIR/rank<r>.txt.

    python -m torch.distributed.run --nproc_per_node=2 tests/storage_worker.py OUT_DIR CHECKPOINT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from helpers import TinyClassifier, make_loader  # the script's directory (tests/) is on sys.path

import trainkit as tk

torch.set_num_threads(1)


class Steps(tk.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_batch_start(self, trainer, module, batch, batch_idx):
        self.steps.append(trainer.global_step)


def main(out: Path, checkpoint_dir: str) -> None:
    seen = Steps()
    trainer = tk.Trainer(
        run_mode="step", max_steps=4, distributed=True, callbacks=[seen], checkpoint_dir=checkpoint_dir,
        log_dir=None, progress_bar=False,
    )  # fmt: skip
    try:
        trainer.fit(TinyClassifier(), make_loader(32), ckpt_path="last")
        outcome = "no error"
    except ValueError as exc:
        outcome = f"ValueError: {exc}"
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else trainer.dist.rank
    (out / f"rank{rank}.txt").write_text(f"{outcome}\nsteps={seen.steps}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
