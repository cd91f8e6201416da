"""Best-model tracking: best_metric / best_step / best_epoch, the monitor rule and its defaults, and the one
best checkpoint that follows it."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers import TinyClassifier, make_loader, quiet
from test_early_stopping import Scripted

import trainkit as tk


def fit(script, *, ema_script=None, max_steps=10, eval_interval=2, checkpoint_dir=None, **kwargs):
    """32 train samples in batches of 8: 4 steps per epoch, evaluation every ``eval_interval`` steps."""
    module = Scripted(script, ema_script)
    trainer = tk.Trainer(
        run_mode="step",
        max_steps=max_steps,
        eval_interval=eval_interval,
        **quiet(checkpoint_dir=checkpoint_dir),
        **kwargs,
    )
    result = trainer.fit(module, make_loader(32), make_loader(8))
    return trainer, result


def expected_best(values, mode="min", min_delta=0.0):
    """The rule written out by hand: (index, value) of the last strict improvement by more than min_delta."""
    best_i, best = None, None
    for i, v in enumerate(values):
        if v != v:  # NaN
            continue
        if best is None or (v < best - min_delta if mode == "min" else v > best + min_delta):
            best_i, best = i, v
    return best_i, best


def test_best_metric_step_and_epoch_are_exact():
    values = [1.0, 0.5, 0.7, 0.4, 0.45]
    trainer, result = fit({"loss": values})
    assert expected_best(values) == (3, 0.4)
    # Evaluation 4 is after step 8, which closes the second epoch of 4 steps.
    assert (result.best_metric, result.best_step, result.best_epoch) == (0.4, 8, 2)
    assert (trainer.best_metric, trainer.best_step, trainer.best_epoch) == (0.4, 8, 2)
    assert result.best_checkpoint is None  # checkpoint_dir=None: tracked, but no file


def test_best_file_holds_the_state_of_the_best_step():
    weights: dict[int, dict[str, torch.Tensor]] = {}

    class Grab(tk.Callback):
        def on_eval_end(self, trainer, module, metrics):
            weights[trainer.global_step] = {k: v.clone() for k, v in module.state_dict().items()}

    values = [1.0, 0.5, 0.7, 0.4, 0.45]
    trainer, result = fit({"loss": values}, checkpoint_dir="ckpts", callbacks=[Grab()])
    assert sorted(os.listdir("ckpts")) == ["best.ckpt"]
    assert result.best_checkpoint == trainer.best_checkpoint_path == os.path.abspath("ckpts/best.ckpt")
    ckpt = tk.load_checkpoint(result.best_checkpoint)
    assert ckpt["trainer"]["global_step"] == 8
    assert ckpt["trainer"]["best"]["metric"] == 0.4
    assert ckpt["trainer"]["latest_metrics"] == {"val_loss": 0.4}
    assert weights[8].keys() == ckpt["model"].keys()
    for name, tensor in weights[8].items():
        assert torch.equal(ckpt["model"][name], tensor), name
    # ...and not the final weights, which moved on for two more steps.
    assert not torch.equal(ckpt["model"]["lin.weight"], weights[10]["lin.weight"])


def test_best_file_is_replaced_only_on_improvement():
    steps_written: list[int] = []

    class Watch(tk.Callback):
        def on_save_checkpoint(self, trainer, module, checkpoint):
            steps_written.append(checkpoint["trainer"]["global_step"])

    values = [1.0, 1.0, 0.9, 0.95, 0.2]
    fit({"loss": values}, checkpoint_dir="ckpts", callbacks=[Watch()])
    assert steps_written == [2, 6, 10]
    assert tk.load_checkpoint("ckpts/best.ckpt")["trainer"]["global_step"] == 10


def test_monitor_min_delta_applies():
    values = [1.0, 0.95, 0.85, 0.86, 0.80]
    trainer, result = fit({"loss": values}, monitor={"target": "val_loss", "min_delta": 0.1})
    assert expected_best(values, min_delta=0.1) == (2, 0.85)
    assert (result.best_metric, result.best_step) == (0.85, 6)


def test_monitor_mode_max():
    values = [0.2, 0.6, 0.5, 0.9, 0.1]
    trainer, result = fit({"loss": [1.0] * 5, "acc": values}, monitor={"target": "val_acc", "mode": "max"})
    assert (result.best_metric, result.best_step, result.best_epoch) == (0.9, 8, 2)


def test_monitor_defaults_to_the_early_stop_rule():
    # No monitor: the best follows early_stop's target, mode and min_delta (val_score, max, 0.1).
    script = {"loss": [0.1, 0.2, 0.3, 0.4, 0.5], "score": [1.0, 1.05, 1.2, 1.25, 1.35]}
    trainer, result = fit(
        script, early_stop={"target": "val_score", "mode": "max", "min_delta": 0.1, "patience": 9}
    )
    assert expected_best(script["score"], "max", 0.1) == (4, 1.35)
    assert (result.best_metric, result.best_step) == (1.35, 10)
    # With min_delta 0.1, 1.25 (step 8) did not beat 1.2 (step 6) by enough.
    trainer, result = fit(
        {**script, "score": [1.0, 1.05, 1.2, 1.25, 1.28]},
        early_stop={"target": "val_score", "mode": "max", "min_delta": 0.1, "patience": 9},
    )
    assert (result.best_metric, result.best_step) == (1.2, 6)


def test_explicit_monitor_overrides_early_stop():
    script = {"loss": [1.0, 0.5, 0.7, 0.4, 0.45], "acc": [0.1, 0.9, 0.3, 0.2, 0.95]}
    trainer, result = fit(
        script, early_stop={"target": "val_loss", "patience": 9}, monitor={"target": "val_acc", "mode": "max"}
    )
    assert (result.best_metric, result.best_step) == (0.95, 10)


def test_explicit_monitor_target_never_produced_is_an_error():
    with pytest.raises(tk.MetricNotFoundError) as info:
        fit({"loss": [1.0] * 5}, monitor={"target": "val_f1", "mode": "max"}, checkpoint_dir="ckpts")
    assert isinstance(info.value, ValueError)
    assert all(word in str(info.value) for word in ("monitor", "val_f1", "val_loss"))
    assert not os.path.exists("ckpts/best.ckpt")


def test_implicit_default_missing_warns_once_and_writes_no_best_file():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, result = fit({"acc": [0.1, 0.2, 0.3, 0.4, 0.5]}, checkpoint_dir="ckpts", save_interval=5)
    mentions = [w for w in caught if "val_loss" in str(w.message)]
    assert len(mentions) == 1, [str(w.message) for w in caught]
    assert "val_acc" in str(mentions[0].message)  # says what exists
    assert [r["step"] for r in trainer.history] == [2, 4, 6, 8, 10]  # fit went on
    assert (result.best_metric, result.best_step, result.best_epoch, result.best_checkpoint) == (None,) * 4
    assert sorted(os.listdir("ckpts")) == ["step_000000005.ckpt", "step_000000010.ckpt"]


def test_ema_val_target():
    base = [1.0, 0.9, 0.8, 0.7, 0.6]
    ema = [2.0, 0.3, 0.5, 0.4, 0.35]
    trainer, result = fit(
        {"loss": base}, ema_script={"loss": ema}, use_ema=True, monitor={"target": "ema_val_loss"}
    )
    assert [r["metrics"]["ema_val_loss"] for r in trainer.history] == ema
    assert [r["metrics"]["val_loss"] for r in trainer.history] == base
    assert (result.best_metric, result.best_step) == (0.3, 4)


def test_ema_val_target_in_early_stop():
    base = [1.0, 0.9, 0.8, 0.7, 0.6]
    ema = [1.0, 1.0, 1.0, 0.1, 0.1]
    trainer, result = fit(
        {"loss": base},
        ema_script={"loss": ema},
        use_ema=True,
        early_stop={"target": "ema_val_loss", "patience": 2},
    )
    assert (result.stop_reason, result.global_step) == ("early_stop", 6)
    assert (result.best_metric, result.best_step) == (1.0, 2)


def test_best_with_real_training_matches_history():
    # A real model: whatever the losses are, best_* is the history's first minimum.
    trainer = tk.Trainer(run_mode="step", max_steps=12, eval_interval=2, **quiet())
    result = trainer.fit(TinyClassifier(lr=0.5), make_loader(64), make_loader(64, seed=1))
    losses = [r["metrics"]["val_loss"] for r in trainer.history]
    i, best = expected_best(losses)
    assert (result.best_metric, result.best_step) == (best, trainer.history[i]["step"])
    assert result.best_epoch == trainer.history[i]["epoch"]
