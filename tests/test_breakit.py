"""Defects found by trying to break the second wave (issues 13, 14, 17): each test fails on the main it was
found on and names what the contract (API.md, README) promises."""

from __future__ import annotations

import json
import os
import warnings

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from helpers import TinyClassifier, make_data, make_loader, quiet
from torch.utils.data import DataLoader, IterableDataset

import trainkit as tk
from trainkit.checkpoint import CheckpointReadError, CheckpointStorage


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
    with pytest.raises(
        TypeError, match=r"predict takes one loader \(an iterable of batches\), not a list of loaders"
    ):
        trainer.predict(task, [make_loader(16), make_loader(8)])


def test_a_list_of_batches_is_still_a_loader():
    batches = [make_data(8, seed=s).tensors for s in (1, 2)]
    metrics = tk.Trainer(**quiet()).validate(TinyClassifier(), batches)
    assert sorted(metrics) == ["val_acc", "val_loss"]


# -- save_last holds the final state also when the pass end shows only at the next fetch -------------------


class Stream(IterableDataset):
    """16 samples, no __len__: the end of a pass shows only when the next batch is asked for."""

    def __iter__(self):
        x, y = make_data(16).tensors
        yield from zip(x, y)


def test_save_last_rewrites_a_final_step_saved_before_its_pass_turned_out_complete():
    """Epoch mode, a loader without len(), max_epochs=2, save_interval=4 (the last batch of each pass): the
    regular save of step 8 happens before the iterator says the pass is over; then the pass closes, the
    epoch-2 evaluation runs and fit ends at max_epochs. save_last skipped "the step just saved", so the run's
    final file held epoch 1 mid-pass and one evaluation, and resuming the finished run re-ran the last
    evaluation (hooks, metrics.jsonl, maybe best.ckpt) instead of doing nothing."""
    events: list = []

    class Watch(tk.Callback):
        def on_eval_end(self, trainer, module, metrics):
            events.append(("eval", trainer.global_step))

        def on_epoch_end(self, trainer, module):
            events.append(("epoch_end", trainer.current_epoch))

    def fit(ckpt_path=None):
        trainer = tk.Trainer(max_epochs=2, save_interval=4, save_last=True, checkpoint_dir="ckpts", log_dir="runs",
                             progress_bar=False, callbacks=[Watch()])  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return trainer.fit(TinyClassifier(), DataLoader(Stream(), batch_size=4), make_loader(8),
                               ckpt_path=ckpt_path)  # fmt: skip

    result = fit()
    assert (result.global_step, result.epoch, result.stop_reason) == (8, 2, "max_epochs")
    assert events == [("eval", 4), ("epoch_end", 1), ("eval", 8), ("epoch_end", 2)]
    final = tk.load_checkpoint(os.path.join("ckpts", "step_000000008.ckpt"))["trainer"]
    assert (final["global_step"], final["epoch"], final["batch_in_epoch"]) == (8, 2, 0)
    assert [r["step"] for r in final["history"]] == [4, 8]

    events.clear()
    resumed = fit("last")
    assert (resumed.global_step, resumed.epoch, resumed.stop_reason) == (8, 2, "max_epochs")
    assert events == []  # nothing ran again
    with open(os.path.join("runs", "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [4, 8]
    assert [r["step"] for r in resumed.history] == [4, 8]


def test_without_save_last_the_regular_file_is_not_rewritten():
    trainer = tk.Trainer(**quiet(max_epochs=2, save_interval=4, checkpoint_dir="ckpts"))
    trainer.fit(TinyClassifier(), DataLoader(Stream(), batch_size=4))
    assert sorted(os.listdir("ckpts")) == ["step_000000004.ckpt", "step_000000008.ckpt"]
    state = tk.load_checkpoint(os.path.join("ckpts", "step_000000008.ckpt"))["trainer"]
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 4)  # as saved at step 8, before the pass closed
    assert torch.is_tensor(state["rng"]["torch"])


# -- the fit-start warnings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["early_stop", "monitor"])
def test_an_empty_early_stop_or_monitor_dict_without_a_val_loader_warns_too(setting):
    """``early_stop={}`` is early stopping with every default (target val_loss, patience 10): the warning that
    it does nothing without a val_loader was keyed on the dict's truth value and stayed silent."""
    with pytest.warns(UserWarning, match=rf"^{setting}=\{{\}} has no effect without a val_loader") as record:
        tk.Trainer(**quiet(max_steps=2, **{setting: {}})).fit(TinyClassifier(), make_loader())
    assert len([w for w in record if "no effect without a val_loader" in str(w.message)]) == 1


@pytest.mark.parametrize("shape", ["dict", "list"])
def test_a_mapping_or_list_of_train_loaders_is_a_pointed_error_before_any_step(shape):
    """A dict was iterated for its keys (training_step got a string); a list of DataLoaders handed each
    DataLoader to training_step as a batch. Both now fail at fit start, naming train_loader."""
    loaders = {"a": make_loader(16), "b": make_loader(8)}
    train = loaders if shape == "dict" else list(loaders.values())
    task = Counting()
    with pytest.raises(
        TypeError, match=r"^train_loader is a (dict|list) of loaders.*expected one loader"
    ) as info:
        tk.Trainer(**quiet(max_steps=2)).fit(task, train)
    assert type(train).__name__ in str(info.value)
    assert task.steps == 0


# -- a resume after the run concluded writes nothing ----------------------------------------------------------


@pytest.mark.parametrize("stop", ["max_steps", "early_stop"])
def test_resuming_a_concluded_run_writes_no_log_file(stop):
    """README (Resume): after max_steps/max_epochs, early_stop or non_finite a resume "takes no step and writes
    nothing". It wrote a new TensorBoard event file (the hparams of a fit that never evaluated)."""

    class Flat(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            return {"loss": torch.tensor(1.0)}

    def fit(ckpt_path=None):
        trainer = tk.Trainer(run_mode="step", max_steps=8, eval_interval=2, save_interval=2,
                             early_stop={"patience": 2} if stop == "early_stop" else None,
                             checkpoint_dir="ckpts", log_dir="runs", progress_bar=False)  # fmt: skip
        return trainer.fit(Flat(), make_loader(), make_loader(16), ckpt_path=ckpt_path)

    first = fit()
    assert (first.stop_reason, first.global_step) == ((stop, 6) if stop == "early_stop" else (stop, 8))
    before = {name: os.path.getmtime(os.path.join("runs", name)) for name in os.listdir("runs")}
    again = fit("last")
    assert (again.stop_reason, again.global_step) == (first.stop_reason, first.global_step)
    assert {name: os.path.getmtime(os.path.join("runs", name)) for name in os.listdir("runs")} == before


# -- a store that fails while "last" is resolved: an error, not a silent step back -----------------------------


class FlakyMemory(MemoryFileSystem):
    """memory:// whose reads of one file fail once with ``error`` (as a store's client raises them): a fault
    of the store, not of the file's contents."""

    protocol = "flakymem"
    fail_name: str | None = None
    error: Exception | None = None

    def cat_file(self, path, start=None, end=None, **kwargs):
        if FlakyMemory.fail_name is not None and path.endswith(FlakyMemory.fail_name):
            FlakyMemory.fail_name = None
            raise FlakyMemory.error  # type: ignore[misc]
        return super().cat_file(path, start=start, end=end, **kwargs)


@pytest.fixture
def flaky_store(tmp_path):
    fsspec.register_implementation("flakymem", FlakyMemory, clobber=True)
    root = f"flakymem://{tmp_path.name}/run"
    yield root
    FlakyMemory.fail_name = None
    fs = FlakyMemory()
    if fs.exists(f"/{tmp_path.name}"):
        fs.rm(f"/{tmp_path.name}", recursive=True)


def _store_errors() -> list[Exception]:
    errors: list[Exception] = [ConnectionResetError(104, "Connection reset by peer")]
    try:
        from botocore.exceptions import EndpointConnectionError
    except ImportError:
        return errors
    return errors + [EndpointConnectionError(endpoint_url="http://127.0.0.1:9")]


@pytest.mark.parametrize("error", _store_errors(), ids=lambda e: type(e).__name__)
def test_a_store_failure_while_resolving_last_raises_instead_of_taking_an_older_file(flaky_store, error):
    """A reset while probing the newest checkpoint was reported as "skips a damaged checkpoint ... could not
    be read" and fit resumed from the one before it, its steps silently dropped; a store client's own error
    (botocore's) escaped raw, naming no file."""
    first = tk.Trainer(**quiet(run_mode="step", max_steps=4, save_interval=2, checkpoint_dir=flaky_store))
    first.fit(TinyClassifier(), make_loader())
    FlakyMemory.fail_name, FlakyMemory.error = "step_000000004.ckpt", error
    task = Counting()
    again = tk.Trainer(**quiet(run_mode="step", max_steps=6, save_interval=2, checkpoint_dir=flaky_store))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "skips a damaged checkpoint"
        with pytest.raises(CheckpointReadError) as info:
            again.fit(task, make_loader(), ckpt_path="last")
    assert str(info.value).startswith(f"checkpoint '{flaky_store}/step_000000004.ckpt' could not be read: ")
    assert type(error).__name__ in str(info.value)
    assert task.steps == 0
    assert CheckpointStorage(flaky_store).names() == ["step_000000002.ckpt", "step_000000004.ckpt"]
    # Once the store answers again, "last" is the newest file.
    resumed = tk.Trainer(**quiet(run_mode="step", max_steps=6, save_interval=2, checkpoint_dir=flaky_store))
    assert resumed.fit(Counting(), make_loader(), ckpt_path="last").global_step == 6


@pytest.mark.parametrize("error", _store_errors(), ids=lambda e: type(e).__name__)
def test_load_checkpoint_names_the_file_when_the_store_fails(flaky_store, error):
    tk.Trainer(**quiet(max_steps=2, save_interval=2, checkpoint_dir=flaky_store)).fit(
        TinyClassifier(), make_loader()
    )
    FlakyMemory.fail_name, FlakyMemory.error = "step_000000002.ckpt", error
    with pytest.raises(
        CheckpointReadError, match=r"^checkpoint '.*/step_000000002.ckpt' could not be read: "
    ):
        tk.load_checkpoint(f"{flaky_store}/step_000000002.ckpt")


def test_a_damaged_newest_file_is_still_skipped_for_the_older_one(flaky_store):
    tk.Trainer(**quiet(run_mode="step", max_steps=4, save_interval=2, checkpoint_dir=flaky_store)).fit(
        TinyClassifier(), make_loader()
    )
    storage = CheckpointStorage(flaky_store)
    path = storage.path("step_000000004.ckpt")
    storage.fs.pipe_file(path, bytes(len(storage.fs.cat_file(path))))  # zeroed: damaged contents
    with pytest.warns(RuntimeWarning, match="skips a damaged checkpoint"):
        result = tk.Trainer(**quiet(run_mode="step", max_steps=2, checkpoint_dir=flaky_store)).fit(
            TinyClassifier(), make_loader(), ckpt_path="last"
        )
    assert result.global_step == 2  # resumed from step 2, which is max_steps: no step
