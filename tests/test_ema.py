"""EMA: trainkit.EMA alone and inside the Trainer against torch.optim.swa_utils.AveragedModel driven with
get_ema_multi_avg_fn (first update_parameters at fit start, then after every optimizer step), bitwise."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, make_loader, quiet
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import trainkit as tk


class BNClassifier(TinyClassifier):
    """TinyClassifier with a BatchNorm layer, so the model has buffers that change during training."""

    def __init__(self, lr: float = 0.1, seed: int = 0):
        super().__init__(lr=lr, seed=seed)
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )


def warmup_multi_avg_fn(decay: float):
    """The issue's warmup written against AveragedModel's counter: its n-th call (n_averaged = n, n >= 1)
    is trainkit's update number t = n - 1, with decay_t = min(decay, (1 + t) / (10 + t))."""

    def fn(ema_params, params, n_averaged):
        t = int(n_averaged) - 1
        get_ema_multi_avg_fn(min(decay, (1 + t) / (10 + t)))(ema_params, params, n_averaged)

    return fn


class DriveAveragedModel(tk.Callback):
    """Drives a reference AveragedModel from the loop's hooks: once at fit start, then after every step
    (``on_batch_end`` follows the optimizer step when there is no gradient accumulation)."""

    def __init__(self, multi_avg_fn):
        self.multi_avg_fn = multi_avg_fn
        self.reference: AveragedModel | None = None
        self.updates = 0

    def on_fit_start(self, trainer, module):
        self.reference = AveragedModel(module, multi_avg_fn=self.multi_avg_fn)
        self.reference.update_parameters(module)

    def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.reference.update_parameters(module)
        self.updates += 1


def assert_params_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def assert_buffers_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys() and ba
    for name in ba:
        assert torch.equal(ba[name], bb[name]), name


def eval_loss(model: torch.nn.Module, loader) -> float:
    """The Trainer's metric by hand: batch losses weighted by batch size, summed in float64."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for x, y in loader:
            total += F.cross_entropy(model(x), y).to(torch.float64) * len(x)
            count += len(x)
    return float(total / count)


# -- trainkit.EMA alone ------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.9, 0.999, 0.0, 1.0])
def test_standalone_ema_equals_averaged_model(decay):
    model = BNClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = tk.EMA(model, decay=decay)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    reference.update_parameters(model)
    initial = copy.deepcopy(model)
    for x, y in make_loader(64, batch_size=8):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        reference.update_parameters(model)
        assert_params_equal(ema.module, reference.module)
    assert ema.num_updates == 8
    assert_buffers_equal(ema.module, model)  # buffers are copied, not averaged
    if decay == 1.0:
        assert_params_equal(ema.module, initial)
    if decay == 0.0:
        assert_params_equal(ema.module, model)
    if decay == 0.9:  # the average really lags behind the model
        assert not torch.equal(ema.module.net[0].weight, model.net[0].weight)


def test_standalone_ema_warmup_equals_averaged_model_with_warmup_decay():
    model = TinyClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = tk.EMA(model, decay=0.5, warmup=True)
    reference = AveragedModel(model, multi_avg_fn=warmup_multi_avg_fn(0.5))
    reference.update_parameters(model)
    for _ in range(2):
        for x, y in make_loader(64, batch_size=8):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update()
            reference.update_parameters(model)
    assert ema.num_updates == 16  # t ran past 8, where (1 + t) / (10 + t) reaches 0.5
    assert_params_equal(ema.module, reference.module)
    plain = AveragedModel(TinyClassifier(), multi_avg_fn=get_ema_multi_avg_fn(0.5))
    assert not torch.equal(plain.module.net[0].weight, ema.module.net[0].weight)


def test_warmup_decay_schedule():
    ema = tk.EMA(TinyClassifier(), decay=0.5, warmup=True)
    seen = []
    for _ in range(12):
        seen.append(ema.current_decay())
        ema.update()
    assert seen == [min(0.5, (1 + t) / (10 + t)) for t in range(12)]
    assert seen[:3] == [0.1, 2 / 11, 3 / 12] and seen[-1] == 0.5
    assert tk.EMA(TinyClassifier(), decay=0.5).current_decay() == 0.5  # warmup is off by default
    assert tk.EMA(TinyClassifier()).decay == 0.999


def test_shadow_is_a_separate_copy_starting_at_the_weights():
    model = TinyClassifier()
    ema = tk.EMA(model, decay=0.9)
    assert ema.module is not model and type(ema.module) is TinyClassifier
    for (name, p), s in zip(model.named_parameters(), ema.module.parameters()):
        assert torch.equal(p, s), name
        assert p.data_ptr() != s.data_ptr(), name
    with torch.no_grad():
        model.net[0].weight.add_(1.0)
    assert not torch.equal(model.net[0].weight, ema.module.net[0].weight)


def test_non_floating_parameters_are_copied():
    model = torch.nn.Linear(2, 2)
    model.counter = torch.nn.Parameter(torch.tensor([3]), requires_grad=False)
    ema = tk.EMA(model, decay=0.9)
    with torch.no_grad():
        model.counter.fill_(7)
    ema.update()
    assert torch.equal(ema.module.counter, torch.tensor([7]))


def test_state_dict_round_trip_and_loads_into_a_fresh_model():
    model = TinyClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = tk.EMA(model, decay=0.9, warmup=True)
    for x, y in make_loader(32, batch_size=8):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ema.update()
    state = ema.state_dict()
    restored = tk.EMA(TinyClassifier(seed=5), decay=0.9, warmup=True)
    restored.load_state_dict(state)
    assert restored.num_updates == 4
    assert_params_equal(restored.module, ema.module)
    fresh = TinyClassifier(seed=7)
    fresh.load_state_dict(state["state_dict"])
    assert_params_equal(fresh, ema.module)


@pytest.mark.parametrize("decay", [-0.1, 1.5, "0.9", True])
def test_bad_decay_is_rejected(decay):
    with pytest.raises(ValueError, match="decay"):
        tk.EMA(TinyClassifier(), decay=decay)


@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_trainer_rejects_bad_ema_decay(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        tk.Trainer(max_steps=1, use_ema=True, ema_decay=decay, **quiet())


# -- inside the Trainer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [False, True])
def test_trainer_ema_equals_averaged_model(warmup):
    decay = 0.9 if not warmup else 0.5
    fn = warmup_multi_avg_fn(decay) if warmup else get_ema_multi_avg_fn(decay)
    driver = DriveAveragedModel(fn)
    module = BNClassifier()
    trainer = tk.Trainer(
        run_mode="step", max_steps=14, eval_interval=7, use_ema=True, ema_decay=decay, ema_warmup=warmup,
        callbacks=[driver], **quiet(),
    )  # fmt: skip
    trainer.fit(module, make_loader(64, shuffle=True), make_loader(32))
    assert driver.updates == 14  # crosses an epoch boundary (8 steps per pass)
    assert_params_equal(trainer.ema_module, driver.reference.module)
    assert_buffers_equal(trainer.ema_module, module)
    assert not torch.equal(trainer.ema_module.net[0].weight, module.net[0].weight)
    # BatchNorm statistics moved during training, and the shadow follows them.
    assert not torch.equal(module.net[1].running_mean, torch.zeros(16))
    assert int(trainer.ema_module.net[1].num_batches_tracked) == 14


def test_trainer_ema_updates_once_per_optimizer_step_with_accumulation():
    class DrivePerStep(DriveAveragedModel):
        def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step > self.updates:  # an optimizer step happened at this batch
                super().on_batch_end(trainer, module, outputs, batch, batch_idx)

    driver = DrivePerStep(get_ema_multi_avg_fn(0.9))
    trainer = tk.Trainer(
        run_mode="step", max_steps=6, eval_interval=6, use_ema=True, ema_decay=0.9, accumulate_grad_batches=3,
        callbacks=[driver], **quiet(),
    )  # fmt: skip
    trainer.fit(TinyClassifier(), make_loader(48), make_loader(8))
    assert driver.updates == 6
    assert_params_equal(trainer.ema_module, driver.reference.module)


def test_trainer_ema_matches_a_hand_written_pytorch_loop():
    """Independent of the hooks: the same training written in plain PyTorch, EMA by AveragedModel."""
    decay, steps = 0.8, 12
    trainer = tk.Trainer(
        run_mode="step", max_steps=steps, eval_interval=steps, use_ema=True, ema_decay=decay, **quiet()
    )
    module = TinyClassifier()
    trainer.fit(module, make_loader(64), make_loader(32))

    model = TinyClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    reference.update_parameters(model)
    done = 0
    while done < steps:
        for x, y in make_loader(64):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            reference.update_parameters(model)
            done += 1
            if done == steps:
                break
    assert_params_equal(module, model)
    assert_params_equal(trainer.ema_module, reference.module)


def test_ema_module_is_a_task_module_distinct_from_the_model():
    module = TinyClassifier()
    trainer = tk.Trainer(max_steps=3, use_ema=True, **quiet())
    assert trainer.ema_module is None  # nothing to average before fit
    trainer.fit(module, make_loader(24), make_loader(8))
    ema = trainer.ema_module
    assert isinstance(ema, tk.TaskModule) and type(ema) is TinyClassifier
    assert ema is not module
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ema.parameters(), module.parameters()))
    assert not any(isinstance(m, torch.nn.parallel.DistributedDataParallel) for m in ema.modules())
    # Usable for inference as it is.
    with torch.no_grad():
        assert ema(torch.zeros(2, 8)).shape == (2, 3)
    assert tk.Trainer(max_steps=3, **quiet()).ema_module is None


def test_no_ema_means_no_ema_metrics():
    trainer = tk.Trainer(run_mode="step", max_steps=4, eval_interval=2, **quiet())
    result = trainer.fit(TinyClassifier(), make_loader(32), make_loader(16), test_loader=make_loader(16))
    assert sorted(result.metrics) == ["test_acc", "test_loss", "val_acc", "val_loss"]
    assert trainer.ema_module is None


def test_ema_metrics_are_the_averaged_model_evaluated():
    driver = DriveAveragedModel(get_ema_multi_avg_fn(0.9))
    val, test = make_loader(64, batch_size=16, seed=1), make_loader(32, batch_size=16, seed=2)
    module = TinyClassifier(lr=0.5)
    trainer = tk.Trainer(
        run_mode="step",
        max_steps=8,
        eval_interval=8,
        use_ema=True,
        ema_decay=0.9,
        callbacks=[driver],
        **quiet(),
    )
    result = trainer.fit(module, make_loader(64), val, test_loader=test)
    metrics = result.metrics
    assert sorted(metrics) == [
        "ema_test_acc", "ema_test_loss", "ema_val_acc", "ema_val_loss", "test_acc", "test_loss", "val_acc", "val_loss",
    ]  # fmt: skip
    assert metrics["val_loss"] == pytest.approx(eval_loss(module, val), rel=1e-12)
    assert metrics["ema_val_loss"] == pytest.approx(eval_loss(driver.reference.module, val), rel=1e-12)
    assert metrics["ema_test_loss"] == pytest.approx(eval_loss(driver.reference.module, test), rel=1e-12)
    assert metrics["ema_val_loss"] != metrics["val_loss"]
    assert metrics["ema_test_loss"] != metrics["test_loss"]


def test_decay_zero_ema_metrics_equal_base_metrics():
    trainer = tk.Trainer(
        run_mode="step", max_steps=6, eval_interval=3, use_ema=True, ema_decay=0.0, **quiet()
    )
    trainer.fit(TinyClassifier(lr=0.5), make_loader(64), make_loader(32))
    for record in trainer.history:
        m = record["metrics"]
        assert (m["ema_val_loss"], m["ema_val_acc"]) == (m["val_loss"], m["val_acc"])


def test_decay_one_ema_metrics_stay_at_the_initial_model():
    val = make_loader(32)
    initial = eval_loss(TinyClassifier(), val)
    trainer = tk.Trainer(
        run_mode="step", max_steps=6, eval_interval=3, use_ema=True, ema_decay=1.0, **quiet()
    )
    trainer.fit(TinyClassifier(lr=0.5), make_loader(64), val)
    assert [r["metrics"]["ema_val_loss"] for r in trainer.history] == pytest.approx(
        [initial, initial], rel=1e-12
    )
    assert trainer.history[-1]["metrics"]["val_loss"] != pytest.approx(initial)


def test_validate_and_test_report_ema_metrics_after_fit():
    module = TinyClassifier(lr=0.5)
    trainer = tk.Trainer(max_steps=5, use_ema=True, ema_decay=0.9, **quiet())
    trainer.fit(module, make_loader(64), make_loader(32))
    loader = make_loader(32, seed=3)
    val = trainer.validate(module, loader)
    assert sorted(val) == ["ema_val_acc", "ema_val_loss", "val_acc", "val_loss"]
    assert val["ema_val_loss"] == pytest.approx(eval_loss(trainer.ema_module, loader), rel=1e-12)
    assert val["val_loss"] == pytest.approx(eval_loss(module, loader), rel=1e-12)
    assert sorted(trainer.test(module, loader)) == ["ema_test_acc", "ema_test_loss", "test_acc", "test_loss"]


def test_ema_update_does_not_change_evaluation_mode_of_the_model():
    modes: list[bool] = []

    class Watch(tk.Callback):
        def on_batch_start(self, trainer, module, batch, batch_idx):
            modes.append(module.training)

    module = TinyClassifier(dropout=0.5)
    trainer = tk.Trainer(
        run_mode="step", max_steps=4, eval_interval=1, use_ema=True, callbacks=[Watch()], **quiet()
    )
    trainer.fit(module, make_loader(32), make_loader(8))
    assert modes == [True] * 4


def test_ema_state_in_checkpoints():
    decay = 0.9
    driver = DriveAveragedModel(warmup_multi_avg_fn(decay))
    trainer = tk.Trainer(
        run_mode="step", max_steps=6, eval_interval=100, save_interval=6, use_ema=True, ema_decay=decay,
        ema_warmup=True, callbacks=[driver], **quiet(checkpoint_dir="ckpts"),
    )  # fmt: skip
    trainer.fit(TinyClassifier(), make_loader(64), make_loader(8))
    ckpt = tk.load_checkpoint("ckpts/step_000000006.ckpt")
    state = ckpt["ema"]
    assert state["num_updates"] == 6 and state["decay"] == decay
    assert state["state_dict"].keys() == trainer.ema_module.state_dict().keys()
    for name, tensor in driver.reference.module.state_dict().items():
        assert torch.equal(state["state_dict"][name], tensor), name
    fresh = tk.load_weights(TinyClassifier(seed=3), "ckpts/step_000000006.ckpt", ema=True)
    assert_params_equal(fresh, trainer.ema_module)


def test_ema_resumes_exactly_with_warmup():
    """6 steps straight == 3 steps, save, resume, 3 more: the shadow and its update count round-trip."""

    def run(max_steps, ckpt_path=None, checkpoint_dir=None):
        module = TinyClassifier()
        trainer = tk.Trainer(
            run_mode="step", max_steps=max_steps, eval_interval=100, save_interval=3, use_ema=True,
            ema_decay=0.5, ema_warmup=True, **quiet(checkpoint_dir=checkpoint_dir),
        )  # fmt: skip
        trainer.fit(module, make_loader(64, batch_size=16), make_loader(8), ckpt_path=ckpt_path)
        return trainer

    straight = run(6)
    run(3, checkpoint_dir="ckpts")
    resumed = run(6, ckpt_path="ckpts/step_000000003.ckpt")
    assert resumed.global_step == 6
    assert_params_equal(resumed.ema_module, straight.ema_module)
    # Had the update count been lost, warmup would restart at t = 0 and the average would differ.
    ckpt = tk.load_checkpoint("ckpts/step_000000003.ckpt")
    assert ckpt["ema"]["num_updates"] == 3
    ckpt["ema"]["num_updates"] = 0
    torch.save(ckpt, "count_lost.ckpt")
    restarted = run(6, ckpt_path="count_lost.ckpt")
    assert not torch.equal(restarted.ema_module.net[0].weight, straight.ema_module.net[0].weight)
