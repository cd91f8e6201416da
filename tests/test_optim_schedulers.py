"""Optimization: clip_grad, WarmupScheduler against API.md's formula, scheduler intervals, ReduceLROnPlateau
on its monitor, and every configure_optimizers return form (and the bad ones)."""

from __future__ import annotations

import copy
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, make_loader, quiet
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, ReduceLROnPlateau, StepLR

import trainkit as tk


def cpu(**kwargs) -> dict:
    """quiet() pinned to the CPU: exact comparisons stay exact on a machine that has a GPU."""
    return quiet(device="cpu", **kwargs)


class Configurable(TinyClassifier):
    """Plain SGD (lr 1.0 unless given); ``configure`` turns the optimizer into configure_optimizers' return
    value. Records the lr seen by every training_step."""

    def __init__(self, configure=None, lr: float = 1.0, **kwargs) -> None:
        super().__init__(lr=lr, **kwargs)
        self.configure = configure
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizer.param_groups[0]["lr"])
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return opt if self.configure is None else self.configure(opt)


def lone_optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lr_sequence(opt: torch.optim.Optimizer, sched, steps: int) -> list[float]:
    """The lr in effect at each of ``steps`` optimizer steps."""
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def cosine(k: int, t_max: int, base: float = 1.0) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * k / t_max))


# API.md: warmup 4, factor 0.1, base lr 1.0, then CosineAnnealingLR(T_max=10) with its own count from 0.
EXPECTED_WARMUP_COSINE = [0.1, 0.325, 0.55, 0.775, 1.0] + [cosine(k, 10) for k in range(1, 11)]


def warmup_cosine(opt, cls=tk.WarmupScheduler):
    return cls(opt, warmup_steps=4, warmup_factor=0.1, main_scheduler=CosineAnnealingLR(opt, T_max=10))


# -- clip_grad -----------------------------------------------------------------------------------------


def one_step_by_hand(task: TinyClassifier, batch, clip: float | None) -> float:
    opt = torch.optim.SGD(task.parameters(), lr=task.lr)
    x, y = batch
    F.cross_entropy(task(x), y).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in task.parameters()]))
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(task.parameters(), clip)
    opt.step()
    return float(norm)


@pytest.mark.parametrize("clip", [0.05, 0.5, 100.0])
def test_clip_grad_matches_clip_grad_norm(clip):
    loader = make_loader(16, 16)
    task = Configurable(lr=1.0)
    tk.Trainer(max_steps=1, clip_grad=clip, **cpu()).fit(task, loader)

    reference = Configurable(lr=1.0)
    norm = one_step_by_hand(reference, next(iter(loader)), clip)
    for a, b in zip(task.parameters(), reference.parameters()):
        assert torch.equal(a, b)

    unclipped = Configurable(lr=1.0)
    one_step_by_hand(unclipped, next(iter(loader)), None)
    same = all(torch.equal(a, b) for a, b in zip(task.parameters(), unclipped.parameters()))
    assert same == (norm <= clip)  # the small clips act; 100 does not
    assert (norm > clip) == (clip < 1.0)


def test_clip_grad_limits_the_total_norm_of_the_update():
    # Plain SGD with lr 1: the update is the clipped gradient, whose total 2-norm is clip_grad.
    task = Configurable(lr=1.0)
    before = [p.detach().clone() for p in task.parameters()]
    tk.Trainer(max_steps=1, clip_grad=0.01, **cpu()).fit(task, make_loader(16, 16))
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(task.parameters(), before)])
    assert float(torch.linalg.vector_norm(delta)) == pytest.approx(0.01, rel=1e-4)


# -- WarmupScheduler -----------------------------------------------------------------------------------


def test_warmup_scheduler_follows_the_formula_step_by_step():
    opt = lone_optimizer(1.0)
    sched = warmup_cosine(opt)
    assert isinstance(sched, LRScheduler)
    lrs = lr_sequence(opt, sched, 15)
    assert lrs[:5] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0], abs=1e-15)
    assert lrs == pytest.approx(EXPECTED_WARMUP_COSINE, abs=1e-12)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]


def test_warmup_scheduler_general_formula_with_several_param_groups():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.4}, {"params": [b], "lr": 2.0}], lr=1.0)
    sched = tk.WarmupScheduler(opt, warmup_steps=5, warmup_factor=0.2)
    for t in range(9):
        factor = 0.2 + 0.8 * t / 5 if t < 5 else 1.0
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4 * factor, 2.0 * factor], abs=1e-15)
        opt.step()
        sched.step()


def test_warmup_scheduler_defaults_and_no_warmup():
    opt = lone_optimizer(1.0)
    assert lr_sequence(opt, tk.WarmupScheduler(opt, warmup_steps=4), 7) == [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
        1.0,
    ]
    opt = lone_optimizer(1.0)
    sched = tk.WarmupScheduler(opt, warmup_steps=0, main_scheduler=CosineAnnealingLR(opt, T_max=10))
    assert lr_sequence(opt, sched, 6) == pytest.approx([cosine(k, 10) for k in range(6)], abs=1e-12)


def test_qwarmupscheduler_is_the_same_class():
    assert tk.qWarmupScheduler is tk.WarmupScheduler
    assert "qWarmupScheduler" in tk.__all__ and "WarmupScheduler" in tk.__all__
    opt = lone_optimizer(1.0)
    assert lr_sequence(opt, warmup_cosine(opt, tk.qWarmupScheduler), 15) == pytest.approx(
        EXPECTED_WARMUP_COSINE, abs=1e-12
    )


@pytest.mark.parametrize("at", [2, 4, 7])
def test_warmup_scheduler_state_dict_round_trip(at):
    opt = lone_optimizer(1.0)
    sched = warmup_cosine(opt)
    lr_sequence(opt, sched, at)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # checkpoints must load without unpickling objects

    opt2 = lone_optimizer(1.0)
    sched2 = warmup_cosine(opt2)  # a fresh one starts at 0.1 ...
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])  # ... and continues where the first left off
    assert (
        opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(EXPECTED_WARMUP_COSINE[at])
    )
    assert lr_sequence(opt2, sched2, 15 - at) == lr_sequence(opt, sched, 15 - at)
    assert opt2.param_groups[0]["lr"] == pytest.approx(cosine(11, 10), abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(warmup_steps=-1), ValueError, ["warmup_steps", "-1"]),
        (dict(warmup_steps=2.5), ValueError, ["warmup_steps", "2.5"]),
        (dict(warmup_steps=3, warmup_factor=1.5), ValueError, ["warmup_factor", "1.5"]),
    ],
)
def test_warmup_scheduler_bad_arguments(kwargs, error, words):
    with pytest.raises(error) as info:
        tk.WarmupScheduler(lone_optimizer(), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_warmup_scheduler_main_scheduler_must_fit():
    opt, other = lone_optimizer(), lone_optimizer()
    with pytest.raises(ValueError, match="main_scheduler"):
        tk.WarmupScheduler(opt, 2, main_scheduler=CosineAnnealingLR(other, T_max=4))
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        tk.WarmupScheduler(opt, 2, main_scheduler=ReduceLROnPlateau(opt))


def test_warmup_scheduler_steps_once_per_optimizer_step_in_fit():
    task = Configurable(configure=lambda opt: {"optimizer": opt, "lr_scheduler": warmup_cosine(opt)})
    trainer = tk.Trainer(run_mode="step", max_steps=15, **cpu())
    trainer.fit(task, make_loader(32, 8))
    assert task.lrs == pytest.approx(EXPECTED_WARMUP_COSINE, abs=1e-12)

    task = Configurable(configure=lambda opt: (opt, warmup_cosine(opt)))
    tk.Trainer(run_mode="step", max_steps=6, accumulate_grad_batches=2, **cpu()).fit(task, make_loader(64, 8))
    assert task.lrs == pytest.approx([lr for lr in EXPECTED_WARMUP_COSINE[:6] for _ in (0, 1)], abs=1e-12)


# -- scheduler intervals ---------------------------------------------------------------------------------


def test_epoch_interval_scheduler_steps_once_per_pass():
    def configure(opt):
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": StepLR(opt, 1, gamma=0.5), "interval": "epoch"},
        }

    task = Configurable(configure)
    trainer = tk.Trainer(max_epochs=3, **cpu())
    trainer.fit(task, make_loader(32, 8))  # 4 batches per pass
    assert task.lrs == [1.0] * 4 + [0.5] * 4 + [0.25] * 4
    assert trainer.optimizer.param_groups[0]["lr"] == 0.125

    task = Configurable(configure)
    tk.Trainer(run_mode="step", max_steps=6, **cpu()).fit(task, make_loader(32, 8))
    assert task.lrs == [1.0] * 4 + [0.5] * 2


def test_step_interval_is_the_default():
    task = Configurable(lambda opt: (opt, StepLR(opt, 1, gamma=0.5)))
    trainer = tk.Trainer(max_epochs=1, **cpu())
    trainer.fit(task, make_loader(32, 8))
    assert task.lrs == [1.0, 0.5, 0.25, 0.125]
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0625


# -- ReduceLROnPlateau -----------------------------------------------------------------------------------


class Scored(Configurable):
    """validation_step reports a chosen score per evaluation (one val batch per evaluation)."""

    def __init__(self, configure, scores: list[float]) -> None:
        super().__init__(configure)
        self.scores = list(scores)
        self.evals = 0

    def validation_step(self, batch, batch_idx):
        score = self.scores[self.evals]
        self.evals += 1
        return {"score": torch.tensor(score), "loss": torch.tensor(1.0)}


def test_plateau_scheduler_steps_on_its_monitor_after_each_evaluation():
    scores = [5.0, 4.0, 4.0, 4.0, 4.0, 3.0]

    def configure(opt):
        plateau = ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val_score"}}

    task = Scored(configure, scores)
    trainer = tk.Trainer(run_mode="step", eval_interval=2, max_steps=12, **cpu())
    trainer.fit(task, make_loader(64, 8), make_loader(8, 8))
    assert [r["metrics"]["val_score"] for r in trainer.history] == scores

    # The same plateau rule fed the same numbers by hand.
    opt = lone_optimizer(1.0)
    plateau = ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1)
    after_eval = []
    for score in scores:
        plateau.step(score)
        after_eval.append(opt.param_groups[0]["lr"])
    assert after_eval != [1.0] * 6  # the schedule really reduced the lr
    expected = [1.0, 1.0] + [lr for lr in after_eval[:5] for _ in (0, 1)]
    assert task.lrs == expected
    assert trainer.optimizer.param_groups[0]["lr"] == after_eval[-1]


def test_plateau_scheduler_defaults_to_val_loss_and_ignores_steps():
    holder: dict = {}

    def configure(opt):
        holder["plateau"] = ReduceLROnPlateau(opt, patience=0, factor=0.5)
        return opt, holder["plateau"]

    task = Scored(configure, [0.0] * 3)
    trainer = tk.Trainer(run_mode="step", eval_interval=3, max_steps=9, **cpu())
    trainer.fit(task, make_loader(64, 8), make_loader(8, 8))
    # val_loss is the constant 1.0: evaluation 1 sets the best, 2 and 3 each halve the lr (patience 0).
    assert holder["plateau"].last_epoch == 3
    assert task.lrs == [1.0] * 6 + [0.5] * 3
    assert trainer.optimizer.param_groups[0]["lr"] == 0.25


def test_plateau_scheduler_unknown_monitor_names_the_available_metrics():
    def configure(opt):
        return {"optimizer": opt, "lr_scheduler": {"scheduler": ReduceLROnPlateau(opt), "monitor": "val_los"}}

    trainer = tk.Trainer(run_mode="step", eval_interval=2, max_steps=6, **cpu())
    with pytest.raises(ValueError) as info:
        trainer.fit(Configurable(configure), make_loader(32, 8), make_loader(8, 8))
    assert isinstance(info.value, tk.MetricNotFoundError)
    for word in ("'val_los'", "val_loss", "val_acc", "monitor"):
        assert word in str(info.value)
    assert trainer.global_step == 2  # at the first evaluation


# -- configure_optimizers forms --------------------------------------------------------------------------


def _step(opt):
    return StepLR(opt, 1, gamma=0.5)


GOOD_FORMS = {
    "optimizer": (lambda opt: opt, 1.0),
    "[optimizer]": (lambda opt: [opt], 1.0),
    "(optimizer, scheduler)": (lambda opt: (opt, _step(opt)), 0.0625),
    "[optimizer, scheduler]": (lambda opt: [opt, _step(opt)], 0.0625),
    "([optimizer], [scheduler])": (lambda opt: ([opt], [_step(opt)]), 0.0625),
    "dict optimizer": (lambda opt: {"optimizer": opt}, 1.0),
    "dict scheduler": (lambda opt: {"optimizer": opt, "lr_scheduler": _step(opt)}, 0.0625),
    "dict scheduler dict": (
        lambda opt: {"optimizer": opt, "lr_scheduler": {"scheduler": _step(opt)}},
        0.0625,
    ),
    "dict step interval": (
        lambda opt: {"optimizer": opt, "lr_scheduler": {"scheduler": _step(opt), "interval": "step"}},
        0.0625,
    ),
    "dict epoch interval": (
        lambda opt: {"optimizer": opt, "lr_scheduler": {"scheduler": _step(opt), "interval": "epoch"}},
        0.25,
    ),
}


@pytest.mark.parametrize("form", list(GOOD_FORMS))
def test_configure_optimizers_return_forms(form):
    configure, final_lr = GOOD_FORMS[form]
    task = Configurable(configure)
    initial = copy.deepcopy(task)
    trainer = tk.Trainer(max_epochs=2, **cpu())
    trainer.fit(task, make_loader(16, 8))  # 4 optimizer steps over 2 passes
    assert trainer.optimizer.param_groups[0]["lr"] == final_lr
    assert all(p is q for p, q in zip(trainer.optimizer.param_groups[0]["params"], task.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(task.parameters(), initial.parameters()))


def _other_optimizer_scheduler(opt):
    return opt, _step(lone_optimizer())


BAD_FORMS = {
    "None": (lambda opt: None, TypeError, ["configure_optimizers", "None", "Optimizer"]),
    "a string": (lambda opt: "sgd", TypeError, ["configure_optimizers", "'sgd'", "Optimizer"]),
    "two optimizers": (lambda opt: (opt, lone_optimizer()), TypeError, ["configure_optimizers", "Optimizer"]),
    "unknown dict key": (
        lambda opt: {"opt": opt},
        ValueError,
        ["configure_optimizers", "'opt'", "'optimizer'"],
    ),
    "dict without optimizer": (
        lambda opt: {"lr_scheduler": _step(opt)},
        ValueError,
        ["configure_optimizers", "'optimizer'"],
    ),
    "scheduler dict without scheduler": (
        lambda opt: {"optimizer": opt, "lr_scheduler": {"interval": "step"}},
        ValueError,
        ["lr_scheduler", "'scheduler'"],
    ),
    "bad interval": (
        lambda opt: {"optimizer": opt, "lr_scheduler": {"scheduler": _step(opt), "interval": "batch"}},
        ValueError,
        ["interval", "'batch'", "'step'", "'epoch'"],
    ),
    "unknown scheduler key": (
        lambda opt: {"optimizer": opt, "lr_scheduler": {"scheduler": _step(opt), "every": 2}},
        ValueError,
        ["lr_scheduler", "every"],
    ),
    "unsupported frequency": (
        lambda opt: {"optimizer": opt, "lr_scheduler": {"scheduler": _step(opt), "frequency": 2}},
        ValueError,
        ["frequency", "2"],
    ),
    "not a scheduler": (
        lambda opt: {"optimizer": opt, "lr_scheduler": "cosine"},
        TypeError,
        ["lr_scheduler", "'cosine'"],
    ),
    "scheduler of another optimizer": (_other_optimizer_scheduler, ValueError, ["lr_scheduler", "optimizer"]),
}


@pytest.mark.parametrize("form", list(BAD_FORMS))
def test_bad_configure_optimizers_forms_raise_before_anything_is_written(form):
    configure, error, words = BAD_FORMS[form]
    with pytest.raises(error) as info:
        tk.Trainer(max_steps=2).fit(Configurable(configure), make_loader(16, 8))  # default dirs
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    assert os.listdir(".") == []
