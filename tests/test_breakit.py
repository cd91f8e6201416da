"""Defects found by trying to break the second wave (issues 13, 14, 17): each test fails on the main it was
found on and names what the contract (API.md, README) promises."""

from __future__ import annotations

import os

import pytest
from helpers import TinyClassifier, make_loader

import trainkit as tk


class Counting(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


# -- log_dir is checked at fit start, like checkpoint_dir ---------------------------------------------------


@pytest.mark.parametrize("where", ["afile", os.path.join("afile", "sub")], ids=["file", "under_a_file"])
def test_a_log_dir_that_cannot_be_made_fails_before_any_step(where):
    """The event file is created lazily (at the first log step or evaluation): a log_dir that is a file used
    to train until then and fail with a bare FileExistsError/NotADirectoryError, the steps lost."""
    with open("afile", "w") as f:
        f.write("x")
    task = Counting()
    trainer = tk.Trainer(
        max_steps=6, log_every_n_steps=5, log_dir=where, checkpoint_dir=None, progress_bar=False
    )
    with pytest.raises(ValueError) as info:
        trainer.fit(task, make_loader())
    message = str(info.value)
    assert f"log_dir={where!r}" in message and "not a directory" in message
    assert task.steps == 0
    assert sorted(os.listdir(".")) == ["afile"]


def test_a_log_dir_that_does_not_exist_yet_is_fine_and_made_at_the_first_write():
    tk.Trainer(max_steps=2, log_every_n_steps=2, log_dir=os.path.join("a", "b", "runs"), checkpoint_dir=None,
               progress_bar=False).fit(TinyClassifier(), make_loader())  # fmt: skip
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join("a", "b", "runs")))

