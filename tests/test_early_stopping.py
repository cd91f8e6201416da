"""Early stopping: the pure arithmetic (EarlyStopChecker, MetricTracker) on scripted sequences, then the
loop glue end to end with a TaskModule whose validation metrics follow a script."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_loader, quiet

import trainkit as tk

NAN = float("nan")
INF = float("inf")

# The issue's sequence: patience 2, min_delta 0.1, mode min -> stop at the 5th value.
SEQ = [1.0, 0.95, 0.85, 0.86, 0.80]


class Scripted(tk.TaskModule):
    """A task whose k-th evaluation (k = number of evaluations already in ``trainer.history``) reports
    ``script[name][k]`` for each scripted metric; training is a real linear classifier so the loop runs.

    ``ema_script``, when given, is what the EMA copy reports instead (the copy is told apart by identity:
    it is ``trainer.ema_module``). Running past the script raises, so a loop that evaluates too often fails.
    Values are Python floats and batches hold 8 samples, so the batch-size weighted mean is exact.
    """

    def __init__(self, script: dict[str, list[float]], ema_script: dict[str, list[float]] | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 3)
        self.script = script
        self.ema_script = ema_script

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.lin(x), y)

    def validation_step(self, batch, batch_idx):
        k = len(self.trainer.history)
        is_ema = self is self.trainer.ema_module
        script = self.ema_script if (is_ema and self.ema_script is not None) else self.script
        return {name: values[k] for name, values in script.items()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StopCounter(tk.Callback):
    def __init__(self):
        self.calls: list[int] = []

    def on_early_stop(self, trainer, module):
        self.calls.append(trainer.global_step)


def fit_scripted(values, eval_interval=2, max_steps=40, callbacks=(), **early):
    """Step mode, one evaluation every ``eval_interval`` steps, early stopping on ``val_loss``."""
    module = Scripted({"loss": values})
    trainer = tk.Trainer(
        run_mode="step",
        max_steps=max_steps,
        eval_interval=eval_interval,
        early_stop={"target": "val_loss", **early},
        callbacks=list(callbacks),
        **quiet(),
    )
    result = trainer.fit(module, make_loader(32), make_loader(8))
    return trainer, result


# -- the pure arithmetic ------------------------------------------------------------------------------------


def updates(checker, values):
    return [checker.update(v) for v in values]


def test_issue_sequence_min_mode_stops_at_fifth_value():
    checker = tk.EarlyStopChecker(patience=2, mode="min", min_delta=0.1)
    assert updates(checker, SEQ) == [False, False, False, False, True]
    assert (checker.best, checker.wait, checker.stopped, checker.reason) == (0.85, 2, True, "early_stop")


def test_issue_sequence_counter_after_each_value():
    # best: 1.0; 0.95 is not below 0.9 (wait 1); 0.85 is (reset); 0.86, 0.80 are not below 0.75.
    checker = tk.EarlyStopChecker(patience=10, mode="min", min_delta=0.1)
    waits, bests = [], []
    for v in SEQ:
        checker.update(v)
        waits.append(checker.wait)
        bests.append(checker.best)
    assert waits == [0, 1, 0, 1, 2]
    assert bests == [1.0, 1.0, 0.85, 0.85, 0.85]


def test_without_min_delta_the_same_sequence_does_not_stop():
    # With min_delta 0, 0.95 and 0.80 are improvements, so the counter never reaches 2.
    checker = tk.EarlyStopChecker(patience=2, mode="min", min_delta=0.0)
    assert updates(checker, SEQ) == [False] * 5
    assert checker.best == 0.80


def test_max_mode_mirrors_min_mode():
    checker = tk.EarlyStopChecker(patience=2, mode="max", min_delta=0.1)
    assert updates(checker, [-v for v in SEQ]) == [False, False, False, False, True]
    assert checker.best == -0.85
    # A rising sequence in max mode never stops.
    rising = tk.EarlyStopChecker(patience=2, mode="max", min_delta=0.1)
    assert updates(rising, [1.0, 1.2, 1.4, 1.6, 1.8]) == [False] * 5


def test_min_delta_zero_equal_values_are_no_improvement():
    checker = tk.EarlyStopChecker(patience=2, mode="min", min_delta=0.0)
    assert updates(checker, [1.0, 1.0, 1.0]) == [False, False, True]
    maxed = tk.EarlyStopChecker(patience=2, mode="max", min_delta=0.0)
    assert updates(maxed, [3.0, 3.0, 3.0]) == [False, False, True]


def test_improvement_must_beat_min_delta_strictly():
    tracker = tk.MetricTracker(mode="min", min_delta=0.5)
    assert tracker.update(2.0) is True  # the first value sets the reference
    assert tracker.update(1.5) is False  # exactly best - min_delta: not strictly better
    assert tracker.update(1.25) is True
    assert tracker.best == 1.25
    tracker_max = tk.MetricTracker(mode="max", min_delta=0.5)
    assert [tracker_max.update(v) for v in [2.0, 2.5, 2.75]] == [True, False, True]


def test_first_value_sets_the_reference_whatever_it_is():
    for mode, first in (("min", 1e9), ("max", -1e9)):
        tracker = tk.MetricTracker(mode=mode)
        assert tracker.best is None
        assert tracker.update(first) is True
        assert tracker.best == first


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_is_never_an_improvement(bad):
    tracker = tk.MetricTracker(mode="min")
    assert tracker.update(bad) is False  # not even as the first value
    assert tracker.best is None
    assert tracker.update(1.0) is True
    assert tracker.update(bad) is False
    assert tracker.best == 1.0


def test_nan_counts_as_no_improvement_without_check_finite():
    checker = tk.EarlyStopChecker(patience=3, mode="min", check_finite=False)
    assert updates(checker, [1.0, NAN, NAN]) == [False, False, False]
    assert checker.wait == 2
    assert checker.update(0.5) is False  # a real improvement resets the counter
    assert (checker.wait, checker.best) == (0, 0.5)
    assert updates(checker, [NAN, NAN, NAN]) == [False, False, True]
    assert checker.reason == "early_stop"


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_stops_at_once_with_check_finite(bad):
    checker = tk.EarlyStopChecker(patience=5, mode="min")  # check_finite defaults to True
    assert updates(checker, [1.0, 0.9, bad]) == [False, False, True]
    assert (checker.stopped, checker.reason) == (True, "non_finite")


def test_state_dict_round_trip_continues_identically():
    original = tk.EarlyStopChecker(patience=2, mode="min", min_delta=0.1)
    updates(original, SEQ[:2])
    state = original.state_dict()
    # The state is plain data: it survives a weights_only torch round trip.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = tk.EarlyStopChecker(patience=2, mode="min", min_delta=0.1)
    restored.load_state_dict(state)
    assert (restored.best, restored.wait) == (1.0, 1)
    assert updates(restored, SEQ[2:]) == [False, False, True]
    assert updates(original, SEQ[2:]) == [False, False, True]
    assert restored.state_dict() == original.state_dict()


def test_tracker_state_dict_round_trip():
    tracker = tk.MetricTracker(mode="max", min_delta=0.25)
    tracker.update(3.0)
    restored = tk.MetricTracker(mode="max", min_delta=0.25)
    restored.load_state_dict(tracker.state_dict())
    assert restored.best == 3.0
    assert restored.update(3.25) is False
    assert restored.update(3.5) is True


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"patience": 0}, "patience"),
        ({"patience": 1.5}, "patience"),
        ({"mode": "avg"}, "mode"),
        ({"min_delta": -0.1}, "min_delta"),
    ],
)
def test_checker_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        tk.EarlyStopChecker(**kwargs)


# -- the loop glue ------------------------------------------------------------------------------------------


def test_trainer_stops_at_the_fifth_evaluation():
    counter = StopCounter()
    trainer, result = fit_scripted(SEQ, patience=2, min_delta=0.1, callbacks=[counter])
    assert [r["step"] for r in trainer.history] == [2, 4, 6, 8, 10]
    assert [r["metrics"]["val_loss"] for r in trainer.history] == SEQ
    assert (result.global_step, trainer.global_step) == (10, 10)
    assert (result.stop_reason, result.stopped_early) == ("early_stop", True)
    assert counter.calls == [10]  # on_early_stop fires once, at the stopping evaluation
    assert (result.best_metric, result.best_step) == (0.85, 6)


def test_trainer_max_mode_mirrors():
    counter = StopCounter()
    trainer, result = fit_scripted(
        [-v for v in SEQ], patience=2, min_delta=0.1, mode="max", callbacks=[counter]
    )
    assert [r["step"] for r in trainer.history] == [2, 4, 6, 8, 10]
    assert (result.stop_reason, result.stopped_early, counter.calls) == ("early_stop", True, [10])
    assert (result.best_metric, result.best_step) == (-0.85, 6)


def test_trainer_equal_values_are_no_improvement():
    trainer, result = fit_scripted([0.5, 0.5, 0.5, 0.5], patience=2, min_delta=0.0)
    assert [r["step"] for r in trainer.history] == [2, 4, 6]
    assert (result.global_step, result.stop_reason) == (6, "early_stop")
    assert (result.best_metric, result.best_step) == (0.5, 2)


def test_trainer_runs_to_max_steps_while_improving():
    trainer, result = fit_scripted([1.0, 0.8, 0.6, 0.4], max_steps=8, patience=1, min_delta=0.1)
    assert [r["step"] for r in trainer.history] == [2, 4, 6, 8]
    assert (result.stop_reason, result.stopped_early) == ("max_steps", False)


def test_trainer_patience_counts_evaluations_not_steps_in_epoch_mode():
    # 32 samples / batch 8 = 4 steps per epoch; one evaluation per epoch.
    module = Scripted({"loss": [1.0, 1.0, 1.0, 1.0]})
    trainer = tk.Trainer(max_epochs=10, early_stop={"patience": 3}, **quiet())
    result = trainer.fit(module, make_loader(32), make_loader(8))
    assert [(r["step"], r["epoch"]) for r in trainer.history] == [(4, 1), (8, 2), (12, 3), (16, 4)]
    assert (result.stop_reason, result.epoch, result.global_step) == ("early_stop", 4, 16)


def test_defaults_target_val_loss_patience_ten_mode_min():
    values = [1.0] + [2.0] * 10
    trainer, result = fit_scripted(values, eval_interval=1, max_steps=40)
    assert [r["step"] for r in trainer.history] == list(range(1, 12))
    assert (result.stop_reason, result.global_step) == ("early_stop", 11)


def test_missing_target_errors_at_first_evaluation_naming_available_metrics():
    module = Scripted({"loss": [1.0] * 5, "acc": [0.5] * 5})
    trainer = tk.Trainer(
        run_mode="step", max_steps=20, eval_interval=3, early_stop={"target": "val_accuracy"}, **quiet()
    )
    with pytest.raises(tk.MetricNotFoundError) as info:
        trainer.fit(module, make_loader(32), make_loader(8))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for word in ("early_stop", "val_accuracy", "val_loss", "val_acc"):
        assert word in message
    assert trainer.global_step == 3  # raised at the first evaluation, not later


def test_nan_target_stops_fit_with_non_finite_reason():
    counter = StopCounter()
    trainer, result = fit_scripted([1.0, 0.9, NAN, 0.1, 0.1], patience=5, callbacks=[counter])
    assert [r["step"] for r in trainer.history] == [2, 4, 6]
    assert math.isnan(trainer.history[-1]["metrics"]["val_loss"])
    assert (result.stop_reason, result.stopped_early, result.global_step) == ("non_finite", True, 6)
    assert counter.calls == [6]
    assert (result.best_metric, result.best_step) == (0.9, 4)


def test_nan_without_check_finite_only_counts_as_no_improvement():
    trainer, result = fit_scripted([1.0, NAN, 0.5, NAN, NAN], patience=2, check_finite=False)
    assert [r["step"] for r in trainer.history] == [2, 4, 6, 8, 10]
    assert (result.stop_reason, result.best_metric, result.best_step) == ("early_stop", 0.5, 6)


def test_should_stop_is_set_on_early_stop_and_not_before():
    seen: list[tuple[int, bool]] = []

    class Watch(tk.Callback):
        def on_eval_end(self, trainer, module, metrics):
            seen.append((trainer.global_step, trainer.should_stop))

    trainer, result = fit_scripted([1.0, 1.0, 1.0], patience=2, callbacks=[Watch()])
    assert seen == [(2, False), (4, False), (6, False)]  # the decision comes after the evaluation hooks
    assert result.stop_reason == "early_stop"


@pytest.mark.parametrize(
    "early_stop, word",
    [
        ({"target": "val_loss", "patiense": 3}, "patiense"),
        ({"patience": 0}, "patience"),
        ({"patience": 2.5}, "patience"),
        ({"mode": "maximum"}, "mode"),
        ({"min_delta": -1.0}, "min_delta"),
        ({"target": ""}, "target"),
        ({"check_finite": "yes"}, "check_finite"),
    ],
)
def test_trainer_rejects_bad_early_stop_at_construction(early_stop, word):
    with pytest.raises(ValueError, match=word) as info:
        tk.Trainer(max_steps=1, early_stop=early_stop, **quiet())
    assert "early_stop" in str(info.value)


def test_early_stop_must_be_a_dict():
    with pytest.raises(TypeError, match="early_stop"):
        tk.Trainer(max_steps=1, early_stop=["val_loss"], **quiet())
