"""Every bad argument raises ValueError/TypeError naming the parameter, the value and what is allowed, before
anything is written to disk."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TinyClassifier, make_loader, quiet
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk


def cpu(**kwargs) -> dict:
    """quiet() pinned to the CPU: exact comparisons stay exact on a machine that has a GPU."""
    return quiet(device="cpu", **kwargs)


VALID = dict(max_steps=5)


def assert_nothing_written() -> None:
    # conftest.py runs every test in its own empty directory; the defaults checkpoint_dir="checkpoints" and
    # log_dir="runs" would land here.
    assert os.listdir(".") == []


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(run_mode="epochs"), ValueError, ["run_mode", "'epochs'", "'epoch'", "'step'"]),
        (dict(run_mode=None), ValueError, ["run_mode", "None"]),
        (dict(eval_interval=0), ValueError, ["eval_interval", "0", "positive"]),
        (dict(eval_interval=-3), ValueError, ["eval_interval", "-3"]),
        (dict(eval_interval=1.5), TypeError, ["eval_interval", "1.5", "integer"]),
        (dict(max_steps=0), ValueError, ["max_steps", "0"]),
        (dict(max_steps=None, max_epochs=-1), ValueError, ["max_epochs", "-1"]),
        (dict(max_steps="10"), TypeError, ["max_steps", "'10'"]),
        # dict(max_steps=None) with no max_epochs is valid now (validate/test/predict); fit raises:
        # test_newcomer_trainer.py::test_trainer_without_limits_evaluates_and_predicts_but_fit_raises.
        (dict(save_interval=0), ValueError, ["save_interval", "0"]),
        (dict(clip_grad=-1.0), ValueError, ["clip_grad", "-1.0", "> 0"]),
        (dict(clip_grad=0), ValueError, ["clip_grad", "0"]),
        (dict(clip_grad="1.0"), ValueError, ["clip_grad", "'1.0'"]),
        (dict(accumulate_grad_batches=0), ValueError, ["accumulate_grad_batches", "0", "positive"]),
        (dict(accumulate_grad_batches=2.0), TypeError, ["accumulate_grad_batches", "2.0"]),
        (dict(precision="fp8"), ValueError, ["precision", "'fp8'", "bf16-mixed", "16-mixed", "32"]),
        (dict(precision=64), ValueError, ["precision", "64"]),
        (dict(early_stop={"patince": 3}), ValueError, ["early_stop", "patince", "patience"]),
        (
            dict(early_stop={"mode": "maximize"}),
            ValueError,
            ["early_stop", "mode", "'maximize'", "'min'", "'max'"],
        ),
        (dict(early_stop={"patience": 0}), ValueError, ["early_stop", "patience", "0"]),
        (dict(early_stop={"min_delta": -0.1}), ValueError, ["early_stop", "min_delta", "-0.1"]),
        (dict(early_stop="val_loss"), TypeError, ["early_stop", "'val_loss'", "dict"]),
        (dict(monitor={"metric": "val_acc"}), ValueError, ["monitor", "metric", "target"]),
        (dict(monitor={"target": "val_acc", "mode": "up"}), ValueError, ["monitor", "mode", "'up'"]),
        (dict(ema_decay=1.5), ValueError, ["ema_decay", "1.5"]),
        (dict(use_ema="yes"), TypeError, ["use_ema", "'yes'"]),
        (dict(log_every_n_steps=0), ValueError, ["log_every_n_steps", "0"]),
        (dict(device="not-a-device"), ValueError, ["device", "'not-a-device'"]),
        (dict(checkpoint_dir=3), TypeError, ["checkpoint_dir", "3"]),
        (dict(callbacks=[object()]), TypeError, ["callbacks", "object", "Callback"]),
        (dict(callbacks=tk.Callback()), TypeError, ["callbacks", "list"]),
        (dict(callbacks=[TinyClassifier()]), TypeError, ["callbacks", "Callback"]),
    ],
)
def test_bad_trainer_argument_raises_naming_it(kwargs, error, words):
    args = {**VALID, **kwargs}
    with pytest.raises(error) as info:
        tk.Trainer(**args)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert_nothing_written()


def test_valid_arguments_construct_and_write_nothing():
    tk.Trainer(
        run_mode="step", eval_interval=2, max_steps=4, clip_grad=1.0, accumulate_grad_batches=2,
        precision="bf16-mixed", early_stop={"target": "val_acc", "patience": 2, "mode": "max"},
        monitor={"target": "val_acc", "mode": "max"}, callbacks=[tk.Callback()],
    )  # fmt: skip
    assert_nothing_written()


class NoLoss(TinyClassifier):
    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return self.output(loss)


@pytest.mark.parametrize(
    ("output", "words"),
    [
        (lambda loss: None, ["training_step", "NoneType", "loss"]),
        (lambda loss: {"acc": loss}, ["training_step", "'acc'", "'loss'"]),
        (lambda loss: {"loss": float(loss.detach())}, ["training_step", "'loss'"]),
        (lambda loss: (loss, loss), ["training_step", "tuple", "loss"]),
    ],
)
def test_training_step_without_a_loss_raises(output, words):
    with pytest.raises(TypeError) as info:
        tk.Trainer(max_steps=2, **cpu()).fit(NoLoss(output), make_loader(16, 8))
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_empty_train_loader_raises_before_anything_is_written():
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="train_loader") as info:
        tk.Trainer(max_steps=2).fit(TinyClassifier(), empty)  # default checkpoint_dir and log_dir
    assert "at least one batch" in str(info.value)
    assert_nothing_written()


def test_an_iterable_train_loader_that_yields_nothing_raises():
    with pytest.raises(ValueError, match="train_loader"):
        tk.Trainer(max_steps=2, **cpu()).fit(TinyClassifier(), iter([]))


@pytest.mark.parametrize(
    ("args", "error", "words"),
    [
        ((torch.nn.Linear(2, 2), make_loader()), TypeError, ["module", "Linear", "TaskModule"]),
        ((TinyClassifier(), 5), TypeError, ["train_loader", "5"]),
        ((TinyClassifier(), make_loader(), 5), TypeError, ["val_loader", "5"]),
    ],
)
def test_bad_fit_arguments_raise_before_anything_is_written(args, error, words):
    with pytest.raises(error) as info:
        tk.Trainer(max_steps=2).fit(*args)
    for word in words:
        assert word in str(info.value)
    assert_nothing_written()


def test_ckpt_path_last_without_checkpoint_dir_raises():
    with pytest.raises(ValueError, match="checkpoint_dir"):
        tk.Trainer(max_steps=2, **cpu()).fit(TinyClassifier(), make_loader(), ckpt_path="last")


def test_an_explicit_monitor_target_never_produced_is_an_error_naming_the_metrics():
    trainer = tk.Trainer(run_mode="step", eval_interval=2, max_steps=4, monitor={"target": "val_f1"}, **cpu())
    with pytest.raises(ValueError) as info:
        trainer.fit(TinyClassifier(), make_loader(32, 8), make_loader(8, 8))
    assert isinstance(info.value, tk.MetricNotFoundError)
    for word in ("val_f1", "val_loss", "val_acc"):
        assert word in str(info.value)
    assert trainer.global_step == 2  # raised at the first evaluation


def test_an_early_stop_target_never_produced_is_an_error_naming_the_metrics():
    trainer = tk.Trainer(
        run_mode="step", eval_interval=2, max_steps=4, early_stop={"target": "val_f1"}, **cpu()
    )
    with pytest.raises(ValueError) as info:
        trainer.fit(TinyClassifier(), make_loader(32, 8), make_loader(8, 8))
    for word in ("val_f1", "val_loss", "val_acc"):
        assert word in str(info.value)
