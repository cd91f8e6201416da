"""One rank of the metric-object DDP test in test_newcomer.py, and the task it shares with that file.

    python -m torch.distributed.run --nproc_per_node=2 tests/newcomer_worker.py OUT_DIR

Fits an F1Task for a few steps with EMA and a test loader, then calls validate() and test(); saves, per
rank, the metrics and the final weights (base and EMA) as a ``torch.save`` file of plain data.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  before the group exists: see the README (Distributed, creating the group yourself)
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TinyClassifier, make_loader  # the script's directory (tests/) is on sys.path

import trainkit as tk

VAL_N, VAL_BATCH = 37, 5  # uneven: 37 samples in batches of 5 (two ranks: 19 and 18, last batches 4 and 3)


class F1Task(TinyClassifier):
    """A TinyClassifier whose validation_step updates a torchmetrics F1 itself and returns the object, as a
    Lightning user does before ``self.log("val_f1", self.val_f1)``."""

    def __init__(self, seed: int = 0) -> None:
        from torchmetrics.classification import MulticlassF1Score

        super().__init__(seed=seed)
        self.val_f1 = MulticlassF1Score(num_classes=3, average="macro")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_f1.update(logits.argmax(1), y)
        return {"loss": F.cross_entropy(logits, y), "f1": self.val_f1}


def main(out: Path) -> None:
    dist.init_process_group("gloo")  # ours, so that validate()/test() after fit still find a group
    rank = dist.get_rank()
    torch.set_num_threads(1)
    common = dict(distributed=True, checkpoint_dir=None, log_dir=None, progress_bar=False)
    trainer = tk.Trainer(run_mode="step", max_steps=4, eval_interval=2, use_ema=True, ema_decay=0.5, **common)
    module = F1Task()
    val = make_loader(VAL_N, batch_size=VAL_BATCH, seed=1)
    result = trainer.fit(module, make_loader(32, batch_size=4), val, test_loader=val)
    saved = {
        "fit": result.metrics,
        "validate": trainer.validate(module, val),
        "test": trainer.test(module, val),
        "model": {k: v.clone() for k, v in module.state_dict().items()},
        "ema": {k: v.clone() for k, v in trainer.ema_module.state_dict().items()},
    }
    torch.save(saved, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    if os.environ.get("DDP_WORKER_TIMEOUT"):  # a hang prints every thread's stack and exits
        faulthandler.dump_traceback_later(float(os.environ["DDP_WORKER_TIMEOUT"]), exit=True)
    main(Path(sys.argv[1]))
