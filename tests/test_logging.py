"""TensorBoard scalars, hparams, ``metrics.jsonl`` and the progress display, read back with real readers.

Expected values come from a hand-written PyTorch loop over the same data (SGD, momentum 0.9, lr 0.1), never
from the library under test; evaluation metrics are compared with ``trainer.history`` and, for ``val_loss``,
with a hand-computed batch-size-weighted mean.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, make_loader, quiet
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

import trainkit as tk

BATCHES_PER_PASS = 8  # make_loader(): 64 samples, batch 8, not shuffled


# -- readers and references ---------------------------------------------------------------------------


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event under ``log_dir``, as ``{tag: [(step, value), ...]}`` in file order."""
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(x: float) -> float:
    """What a TensorBoard scalar holds for the Python float ``x``."""
    return float(np.float32(x))


class TaskWithAcc(TinyClassifier):
    """training_step returns a dict: the loss plus a training metric ``acc`` (logged as ``train_acc``)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}


class TwoGroups(TinyClassifier):
    """Two param groups (first layer lr 0.1, last layer lr 0.02) under a StepLR that halves every 2 steps."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(
            [
                {"params": self.net[0].parameters(), "lr": 0.1},
                {"params": self.net[3].parameters(), "lr": 0.02},
            ],
            lr=0.1,
            momentum=0.9,
        )
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        }


def reference_run(steps: int, eval_steps=(), accumulate: int = 1) -> dict:
    """The same training by hand: per-step train loss and acc (of the step's last micro-batch; the loss is
    the mean over micro-batches) and val_loss after each step in ``eval_steps``."""
    model = TinyClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = list(make_loader())
    losses, accs, val_loss = {}, {}, {}
    i = 0
    for step in range(1, steps + 1):
        total = None
        for _ in range(accumulate):
            x, y = batches[i % len(batches)]
            i += 1
            logits = model(x)
            loss = F.cross_entropy(logits, y) / accumulate
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
            accs[step] = (logits.argmax(1) == y).float().mean().item()
        opt.step()
        opt.zero_grad()
        losses[step] = total.item()
        if step in eval_steps:
            with torch.no_grad():  # float64 sum of (batch loss * batch size), over the sample count
                total_val = torch.zeros((), dtype=torch.float64)
                for x, y in batches:
                    total_val += F.cross_entropy(model(x), y).to(torch.float64) * len(x)
                val_loss[step] = (total_val / 64.0).item()
    return {"loss": losses, "acc": accs, "val_loss": val_loss}


def fit_logged(module=None, test_loader=True, **kwargs):
    params = dict(
        run_mode="step", max_steps=12, eval_interval=4, log_every_n_steps=3, use_ema=True, log_dir="runs"
    )
    params.update(kwargs)
    trainer = tk.Trainer(**quiet(**params))
    result = trainer.fit(
        module if module is not None else TaskWithAcc(),
        make_loader(),
        make_loader(),
        test_loader=make_loader(n=24, seed=1) if test_loader else None,
    )
    return trainer, result


# -- TensorBoard scalars -------------------------------------------------------------------------------


def test_tensorboard_scalars_have_exact_tags_steps_and_values():
    trainer, _ = fit_logged()
    scalars = read_scalars("runs")
    eval_metrics = [f"{p}{s}_{m}" for p in ("", "ema_") for s in ("val", "test") for m in ("loss", "acc")]
    assert set(scalars) == {"train_loss", "train_acc", "lr", "epoch", *eval_metrics}

    ref = reference_run(12, eval_steps=(4, 8, 12))
    log_steps = [3, 6, 9, 12]
    assert scalars["train_loss"] == [(s, f32(ref["loss"][s])) for s in log_steps]
    assert scalars["train_acc"] == [(s, f32(ref["acc"][s])) for s in log_steps]
    assert scalars["lr"] == [(s, f32(0.1)) for s in log_steps]
    # The epoch (completed passes) at every log step and every evaluation step, once per step.
    assert scalars["epoch"] == [(s, float(s // BATCHES_PER_PASS)) for s in (3, 4, 6, 8, 9, 12)]

    assert [r["step"] for r in trainer.history] == [4, 8, 12]
    for name in eval_metrics:
        assert scalars[name] == [(r["step"], f32(r["metrics"][name])) for r in trainer.history], name
    # The logged val_loss is the base model's, not the EMA's: check it against the hand-written loop.
    assert [r["metrics"]["val_loss"] for r in trainer.history] == [ref["val_loss"][s] for s in (4, 8, 12)]
    assert [r["metrics"]["ema_val_loss"] for r in trainer.history] != [
        r["metrics"]["val_loss"] for r in trainer.history
    ]


def test_train_loss_with_accumulation_is_the_mean_over_micro_batches():
    _, result = fit_logged(
        module=TinyClassifier(), test_loader=False, use_ema=False, accumulate_grad_batches=2,
        max_steps=8, eval_interval=100, log_every_n_steps=2,
    )  # fmt: skip
    assert result.global_step == 8
    ref = reference_run(8, accumulate=2)
    scalars = read_scalars("runs")
    assert set(scalars) == {"train_loss", "lr", "epoch"}
    assert scalars["train_loss"] == [(s, f32(ref["loss"][s])) for s in (2, 4, 6, 8)]
    assert scalars["epoch"] == [(2, 0.0), (4, 1.0), (6, 1.0), (8, 2.0)]  # 4 optimizer steps per pass


def test_lr_of_every_param_group_is_logged_under_its_own_tag():
    fit_logged(module=TwoGroups(), test_loader=False, use_ema=False, max_steps=8, log_every_n_steps=2)
    scalars = read_scalars("runs")
    assert "lr" not in scalars
    # StepLR(step_size=2, gamma=0.5) has stepped s times after optimizer step s.
    for tag, base in (("lr/pg0", 0.1), ("lr/pg1", 0.02)):
        assert scalars[tag] == [(s, f32(base * 0.5 ** (s // 2))) for s in (2, 4, 6, 8)], tag


def test_hparams_are_written_once_with_the_trainer_settings():
    fit_logged()
    events = glob.glob(os.path.join("runs", "events.out.tfevents.*"))
    assert len(events) == 1
    assert sorted(os.listdir("runs")) == sorted([os.path.basename(events[0]), "metrics.jsonl"])

    by_tag: dict[str, list] = {}
    for event in EventFileLoader(events[0]).Load():
        for value in event.summary.value:
            by_tag.setdefault(value.tag, []).append(value)
    hparam_tags = ["_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"]
    for tag in hparam_tags + ["hparams/text_summary"]:
        assert len(by_tag[tag]) == 1, tag
    start = plugin_data_pb2.HParamsPluginData.FromString(
        by_tag["_hparams_/session_start_info"][0].metadata.plugin_data.content
    ).session_start_info.hparams
    assert start["max_steps"].number_value == 12
    assert start["log_every_n_steps"].number_value == 3
    assert start["eval_interval"].number_value == 4
    assert start["run_mode"].string_value == "step"
    assert start["use_ema"].number_value == 1  # torch writes bools as numbers
    text = by_tag["hparams/text_summary"][0].tensor.string_val[0].decode()
    assert "| max_steps | 12 |" in text and "| log_every_n_steps | 3 |" in text


def test_log_dir_none_writes_no_files():
    trainer = tk.Trainer(run_mode="step", max_steps=6, eval_interval=3, log_every_n_steps=1, **quiet())
    trainer.fit(TinyClassifier(), make_loader(), make_loader())
    assert [r["step"] for r in trainer.history] == [3, 6]
    assert os.listdir(".") == []


# -- metrics.jsonl ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, expected",
    [
        (dict(run_mode="step", max_steps=12, eval_interval=4), [(4, 0), (8, 1), (12, 1)]),
        (dict(run_mode="epoch", max_epochs=3, max_steps=None, eval_interval=1), [(8, 1), (16, 2), (24, 3)]),
    ],
)
def test_metrics_jsonl_lines_match_history(mode, expected):
    trainer, _ = fit_logged(**mode)
    with open(os.path.join("runs", "metrics.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert [(r["step"], r["epoch"]) for r in trainer.history] == expected
    assert lines == [dict(r) for r in trainer.history]
    assert [line["step"] for line in lines] == [s for s, _ in expected]
    assert [line["epoch"] for line in lines] == [e for _, e in expected]
    ref = reference_run(expected[-1][0], eval_steps=[s for s, _ in expected])
    assert [line["metrics"]["val_loss"] for line in lines] == [ref["val_loss"][s] for s, _ in expected]
    assert set(lines[0]["metrics"]) == {
        f"{p}{s}_{m}" for p in ("", "ema_") for s in ("val", "test") for m in ("loss", "acc")
    }


# -- the progress display --------------------------------------------------------------------------------

LINE = re.compile(r"^\[trainkit\] step (\d+)/(\d+) epoch=(\d+) loss=(\S+) lr=(\S+)(.*) ([\d.]+) steps/s$")


@pytest.mark.parametrize("log_dir", ["runs", None])
def test_progress_prints_one_compact_line_per_log_interval_when_not_a_tty(capfd, log_dir):
    trainer, _ = fit_logged(progress_bar=True, log_dir=log_dir)
    out, err = capfd.readouterr()
    assert out == ""
    lines = err.splitlines()
    ref = reference_run(12)
    assert len(lines) == 4, err
    for line, step in zip(lines, [3, 6, 9, 12]):
        match = LINE.match(line)
        assert match, line
        assert (int(match[1]), int(match[2]), int(match[3])) == (step, 12, step // BATCHES_PER_PASS)
        assert match[4] == f"{ref['loss'][step]:.4g}"
        assert match[5] == f"{0.1:.3g}"
        # The line comes after the step's own evaluation, so it shows the metrics of step 12 at step 12.
        seen = [r for r in trainer.history if r["step"] <= step]
        shown = dict(kv.split("=") for kv in match[6].split())
        if not seen:
            assert shown == {}
        else:
            latest = seen[-1]["metrics"]
            assert shown == {k: f"{v:.4g}" for k, v in latest.items() if k.startswith(("val_", "ema_val_"))}


def test_progress_total_in_epoch_mode_counts_optimizer_steps(capfd):
    fit_logged(progress_bar=True, log_dir=None, run_mode="epoch", max_epochs=2, max_steps=None,
               eval_interval=1, log_every_n_steps=4, accumulate_grad_batches=2)  # fmt: skip
    lines = capfd.readouterr().err.splitlines()
    assert [LINE.match(line).group(1, 2) for line in lines] == [("4", "8"), ("8", "8")]


def test_progress_bar_false_prints_nothing(capfd):
    fit_logged(progress_bar=False, log_dir="runs")
    assert capfd.readouterr() == ("", "")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_draws_a_tqdm_bar_instead_of_lines(monkeypatch):
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    fit_logged(progress_bar=True, log_dir=None, use_ema=False, test_loader=False)
    text = screen.getvalue()
    assert "[trainkit] step" not in text
    final = text.split("\r")[-1]
    assert final.startswith("train: 100%") and "12/12" in final
    assert "loss=" in final and "lr=0.1" in final and "val_loss=" in final


# -- no host-device sync on steps that do not log --------------------------------------------------------

# Every way of turning a tensor into a Python number; on a GPU each one waits for the device.
_CONVERSIONS = {
    torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
    torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__format__,
    torch.Tensor.__repr__,
}  # fmt: skip


class Watched(torch.Tensor):
    """A tensor that records, for each conversion to a Python number, the trainer's global_step then."""

    conversions: list[tuple[str, int]] = []
    trainer: tk.Trainer | None = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _CONVERSIONS and cls.trainer is not None:
            cls.conversions.append((func.__name__, cls.trainer.global_step))
        return super().__torch_function__(func, types, args, kwargs or {})


class WatchedTask(TinyClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return {
            "loss": F.cross_entropy(logits, y).as_subclass(Watched),
            "acc": (logits.argmax(1) == y).float().mean().as_subclass(Watched),
        }


@pytest.mark.parametrize(
    "outputs, expected_steps",
    [
        (dict(log_dir="runs", progress_bar=False), [5, 10]),
        (dict(log_dir=None, progress_bar=True), [5, 10]),
        (dict(log_dir=None, progress_bar=False), []),
    ],
)
def test_training_loss_is_converted_to_a_number_only_at_log_steps(monkeypatch, outputs, expected_steps):
    trainer = tk.Trainer(
        **quiet(run_mode="step", max_steps=12, eval_interval=4, log_every_n_steps=5, **outputs)
    )
    monkeypatch.setattr(Watched, "conversions", [])
    monkeypatch.setattr(Watched, "trainer", trainer)
    trainer.fit(WatchedTask(), make_loader(), make_loader())
    assert trainer.global_step == 12
    assert sorted({step for _, step in Watched.conversions}) == expected_steps
    if outputs["log_dir"] is not None:  # the loss and the training metric, each converted once per log step
        assert sorted(Watched.conversions, key=lambda c: c[1]) == [("__float__", s) for s in (5, 5, 10, 10)]
