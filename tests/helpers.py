"""Tiny tasks and data shared by the tests: deterministic, CPU-only, a few milliseconds a step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk


def make_data(n: int = 64, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def make_loader(n: int = 64, batch_size: int = 8, shuffle: bool = False, seed: int = 0, **kwargs) -> DataLoader:
    return DataLoader(make_data(n, seed=seed), batch_size=batch_size, shuffle=shuffle, **kwargs)


class TinyClassifier(tk.TaskModule):
    """An MLP 8 -> 16 -> 3 with SGD; ``lr``, ``dropout`` and a scheduler factory are configurable."""

    def __init__(self, lr: float = 0.1, dropout: float = 0.0, scheduler=None, optimizer: str = "sgd", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 3)
        )
        self.lr = lr
        self.scheduler = scheduler
        self.optimizer_name = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler(opt)}


def quiet(**kwargs) -> dict:
    """Trainer keyword arguments with files and output off unless a test turns them on."""
    base = dict(checkpoint_dir=None, log_dir=None, progress_bar=False)
    base.update(kwargs)
    return base
