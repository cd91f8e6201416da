"""Defects found by trying to break the second wave (issues 13, 14, 17): each test fails on the main it was
found on and names what the contract (API.md, README) promises."""

from __future__ import annotations

import os

import pytest
from helpers import TinyClassifier, make_data, make_loader, quiet

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


# -- a list of loaders (Lightning's habit) is refused at fit start ----------------------------------------


@pytest.mark.parametrize("where", ["val_loader", "test_loader"])
def test_a_list_of_loaders_is_a_pointed_error_before_any_step(where):
    """Lightning takes a list of validation loaders; trainkit used to accept it as a list of batches, train
    up to the first evaluation and fail inside validation_step with torch's own error."""
    task = Counting()
    trainer = tk.Trainer(**quiet(run_mode="step", max_steps=4, eval_interval=2))
    loaders = {"val_loader": None, "test_loader": None, where: [make_loader(16), make_loader(8)]}
    with pytest.raises(TypeError) as info:
        trainer.fit(task, make_loader(), loaders["val_loader"], test_loader=loaders["test_loader"])
    message = str(info.value)
    assert message.startswith(f"{where} is a list of 2 loaders") and "mapping of set names" in message
    assert task.steps == 0
    with pytest.raises(TypeError, match=r"^loader is a tuple of 2 loaders"):
        trainer.validate(task, (make_loader(16), make_loader(8)))


def test_a_list_of_batches_is_still_a_loader():
    batches = [make_data(8, seed=s).tensors for s in (1, 2)]
    metrics = tk.Trainer(**quiet()).validate(TinyClassifier(), batches)
    assert sorted(metrics) == ["val_acc", "val_loss"]
