"""trainkit: one step-driven training loop for PyTorch, and everything around it.

Example::

    import trainkit as tk
    result = tk.Trainer(run_mode="step", max_steps=1000, eval_interval=100).fit(MyTask(), train_dl, val_dl)
"""

from .callbacks import Callback
from .checkpoint import CheckpointError, CheckpointNotFoundError, load_checkpoint, load_weights
from .early_stopping import EarlyStopChecker, MetricTracker
from .ema import EMA
from .module import TaskModule
from .rng import seed_everything
from .schedulers import WarmupScheduler, qWarmupScheduler
from .trainer import EvalRecord, FitResult, MetricNotFoundError, Trainer

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "CheckpointError",
    "CheckpointNotFoundError",
    "EMA",
    "EarlyStopChecker",
    "EvalRecord",
    "FitResult",
    "MetricNotFoundError",
    "MetricTracker",
    "TaskModule",
    "Trainer",
    "WarmupScheduler",
    "load_checkpoint",
    "load_weights",
    "qWarmupScheduler",
    "seed_everything",
]
