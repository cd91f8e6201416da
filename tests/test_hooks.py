"""Hooks: which fire, how often, in what order (TaskModule first, then callbacks in order), what they see,
on_exception, and trainer.should_stop set from a hook."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyClassifier, make_loader, quiet

import trainkit as tk


def cpu(**kwargs) -> dict:
    """quiet() pinned to the CPU: exact comparisons stay exact on a machine that has a GPU."""
    return quiet(device="cpu", **kwargs)


HOOKS = (
    "on_fit_start",
    "on_fit_end",
    "on_epoch_start",
    "on_epoch_end",
    "on_batch_start",
    "on_batch_end",
    "on_eval_start",
    "on_eval_end",
    "on_exception",
)


def _recorder(name: str, log: list):
    """A method for every hook that appends (name, hook, global_step, current_epoch) to ``log``."""

    def make(hook: str):
        def method(self, trainer, module, *args):
            log.append((name, hook, trainer.global_step, trainer.current_epoch))
            self.args.setdefault(hook, []).append(args)

        return method

    return {hook: make(hook) for hook in HOOKS}


def recording_callback(name: str, log: list) -> tk.Callback:
    cls = type(f"Rec_{name}", (tk.Callback,), _recorder(name, log))
    cb = cls()
    cb.args = {}
    return cb


def recording_task(log: list, base: type = TinyClassifier, **kwargs) -> TinyClassifier:
    cls = type("RecTask", (base,), _recorder("module", log))
    task = cls(**kwargs)
    task.args = {}
    return task


def hooks_only(log: list) -> list[tuple[str, str]]:
    return [(who, hook) for who, hook, _, _ in log]


def each(hook: str) -> list[tuple[str, str]]:
    return [("module", hook), ("a", hook), ("b", hook)]


def test_hook_order_in_epoch_mode():
    log: list = []
    task = recording_task(log)
    a, b = recording_callback("a", log), recording_callback("b", log)
    trainer = tk.Trainer(max_epochs=2, callbacks=[a, b], **cpu())
    trainer.fit(task, make_loader(16, 8), make_loader(8, 8))  # 2 batches per pass

    one_pass = (
        each("on_epoch_start")
        + (each("on_batch_start") + each("on_batch_end")) * 2
        + each("on_eval_start")
        + each("on_eval_end")
        + each("on_epoch_end")
    )
    assert hooks_only(log) == each("on_fit_start") + one_pass * 2 + each("on_fit_end")
    # on_batch_end comes after the optimizer step; on_epoch_end after the pass is counted.
    steps = [(s, e) for who, hook, s, e in log if who == "a" and hook == "on_batch_end"]
    assert steps == [(1, 0), (2, 0), (3, 1), (4, 1)]  # the last batch still belongs to its pass
    epoch_ends = [(s, e) for who, hook, s, e in log if who == "a" and hook == "on_epoch_end"]
    assert epoch_ends == [(2, 1), (4, 2)]
    assert [(s, e) for who, hook, s, e in log if who == "a" and hook == "on_fit_end"] == [(4, 2)]


def test_hook_arguments():
    log: list = []
    task = recording_task(log)
    a = recording_callback("a", log)
    trainer = tk.Trainer(max_epochs=1, callbacks=[a], **cpu())
    train = make_loader(16, 8)
    trainer.fit(task, train, make_loader(8, 8))
    for who in (task, a):
        starts = who.args["on_batch_start"]
        ends = who.args["on_batch_end"]
        assert [idx for _, idx in starts] == [0, 1]
        assert [idx for _, _, idx in ends] == [0, 1]
        for (batch, _), expected in zip(starts, train):
            assert all(torch.equal(x, y) for x, y in zip(batch, expected))
        for outputs, _, _ in ends:  # training_step's output: the loss tensor
            assert isinstance(outputs, torch.Tensor) and outputs.dim() == 0
        (metrics,) = who.args["on_eval_end"][0]
        assert metrics == trainer.history[0]["metrics"]
        assert set(metrics) == {"val_loss", "val_acc"}
        assert who.args["on_fit_start"] == [()] and who.args["on_eval_start"] == [()]


def test_hook_order_in_step_mode_stopping_mid_epoch():
    log: list = []
    task = recording_task(log)
    a, b = recording_callback("a", log), recording_callback("b", log)
    trainer = tk.Trainer(run_mode="step", eval_interval=2, max_steps=3, callbacks=[a, b], **cpu())
    trainer.fit(task, make_loader(16, 8), make_loader(8, 8))
    batch = each("on_batch_start") + each("on_batch_end")
    expected = (
        each("on_fit_start")
        + each("on_epoch_start")
        + batch * 2
        + each("on_eval_start")  # step 2: evaluation, then the pass ends
        + each("on_eval_end")
        + each("on_epoch_end")
        + each("on_epoch_start")
        + batch  # step 3: max_steps, mid-pass: no on_epoch_end
        + each("on_fit_end")
    )
    assert hooks_only(log) == expected


@pytest.mark.parametrize(("max_steps", "starts", "ends"), [(6, 2, 1), (8, 2, 2), (9, 3, 2)])
def test_on_epoch_end_fires_once_per_completed_pass(max_steps, starts, ends):
    log: list = []
    a = recording_callback("a", log)
    tk.Trainer(run_mode="step", max_steps=max_steps, callbacks=[a], **cpu()).fit(
        TinyClassifier(), make_loader(32, 8)
    )
    hooks = [h for _, h, _, _ in log]
    assert hooks.count("on_epoch_start") == starts
    assert hooks.count("on_epoch_end") == ends
    assert hooks.count("on_batch_start") == hooks.count("on_batch_end") == max_steps
    assert hooks.count("on_fit_start") == hooks.count("on_fit_end") == 1


def test_batch_hooks_fire_per_train_batch_with_accumulation():
    log: list = []
    a = recording_callback("a", log)
    tk.Trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[a], **cpu()).fit(
        TinyClassifier(), make_loader(40, 8)
    )  # 5 batches: optimizer steps after batches 2, 4 and 5
    starts = [s for _, h, s, _ in log if h == "on_batch_start"]
    ends = [s for _, h, s, _ in log if h == "on_batch_end"]
    assert starts == [0, 0, 1, 1, 2]
    assert ends == [0, 1, 1, 2, 3]
    assert [idx for _, _, idx in a.args["on_batch_end"]] == [0, 1, 2, 3, 4]


class Boom(RuntimeError):
    pass


def test_on_exception_fires_and_the_exception_propagates():
    class Failing(TinyClassifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise Boom("step 3 failed")
            return super().training_step(batch, batch_idx)

    log: list = []
    task = recording_task(log, base=Failing)
    a, b = recording_callback("a", log), recording_callback("b", log)
    with pytest.raises(Boom, match="step 3 failed") as info:
        tk.Trainer(max_steps=10, callbacks=[a, b], **cpu()).fit(task, make_loader(32, 8))
    raised = [(w, h) for w, h in hooks_only(log) if h in ("on_exception", "on_fit_end")]
    assert raised == each("on_exception")
    assert log[-3:] == [
        ("module", "on_exception", 2, 0),
        ("a", "on_exception", 2, 0),
        ("b", "on_exception", 2, 0),
    ]
    for who in (task, a, b):
        assert who.args["on_exception"] == [(info.value,)]


def test_an_exception_in_a_callback_propagates_and_reaches_on_exception():
    class FailingCallback(tk.Callback):
        def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                raise Boom("callback failed")

    log: list = []
    a = recording_callback("a", log)
    with pytest.raises(Boom, match="callback failed"):
        tk.Trainer(max_steps=10, callbacks=[FailingCallback(), a], **cpu()).fit(
            TinyClassifier(), make_loader(32, 8)
        )
    assert [(s, h) for _, h, s, _ in log if h in ("on_exception", "on_fit_end")] == [(3, "on_exception")]


class StopAt(tk.Callback):
    def __init__(self, hook: str, step: int) -> None:
        self.hook, self.step = hook, step

    def _maybe_stop(self, trainer) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True

    def on_batch_start(self, trainer, module, batch, batch_idx):
        if self.hook == "on_batch_start":
            self._maybe_stop(trainer)

    def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.hook == "on_batch_end":
            self._maybe_stop(trainer)

    def on_eval_end(self, trainer, module, metrics):
        if self.hook == "on_eval_end":
            self._maybe_stop(trainer)


@pytest.mark.parametrize(
    ("hook", "at_step", "expected_step"),
    [
        ("on_batch_end", 3, 3),  # after step 3's optimizer step: stop right there
        ("on_batch_start", 3, 4),  # during step 4: the step is finished, then fit ends
        ("on_eval_end", 4, 4),
    ],
)
def test_should_stop_from_a_hook_ends_fit_after_the_current_step(hook, at_step, expected_step):
    trainer = tk.Trainer(
        run_mode="step", eval_interval=2, max_steps=20, callbacks=[StopAt(hook, at_step)], **cpu()
    )
    result = trainer.fit(TinyClassifier(), make_loader(40, 8), make_loader(8, 8))
    assert (result.global_step, result.stop_reason) == (expected_step, "should_stop")
    assert trainer.global_step == expected_step
    assert not result.stopped_early


def test_should_stop_mid_accumulation_finishes_the_optimizer_step():
    trainer = tk.Trainer(
        max_steps=20, accumulate_grad_batches=3, callbacks=[StopAt("on_batch_end", 0)], **cpu()
    )
    result = trainer.fit(TinyClassifier(), make_loader(64, 8))
    assert (result.global_step, result.stop_reason) == (1, "should_stop")


def test_should_stop_from_the_task_module_hook_and_reset_on_the_next_fit():
    class StopsItself(TinyClassifier):
        stop_at = 2

        def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == self.stop_at:
                trainer.should_stop = True

    trainer = tk.Trainer(run_mode="step", max_steps=5, **cpu())
    task = StopsItself()
    assert trainer.fit(task, make_loader(32, 8)).stop_reason == "should_stop"
    assert trainer.global_step == 2
    task.stop_at = -1
    result = trainer.fit(task, make_loader(32, 8))
    assert (result.global_step, result.stop_reason) == (5, "max_steps")
