"""The one loop, end to end on tiny CPU tasks: eval triggers, stop conditions, epoch rollover, parity with a
hand-written PyTorch loop, gradient accumulation, weighted evaluation metrics, precision and devices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, make_data, make_loader, quiet
from torch.utils.data import DataLoader, IterableDataset, Sampler, SequentialSampler

import trainkit as tk


def cpu(**kwargs) -> dict:
    """quiet() pinned to the CPU: exact comparisons stay exact on a machine that has a GPU."""
    return quiet(device="cpu", **kwargs)


# -- small tools -------------------------------------------------------------------------------------------


class EvalRecorder(tk.Callback):
    """Records (global_step, current_epoch, metrics) at every on_eval_end."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, dict[str, float]]] = []

    def on_eval_end(self, trainer, module, metrics):
        self.calls.append((trainer.global_step, trainer.current_epoch, dict(metrics)))


class CountingTask(TinyClassifier):
    """TinyClassifier that counts training_step calls and records what it sees of the trainer."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[bool, int, int, int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.trainer is not None, self.global_step, self.current_epoch, batch_idx))
        return super().training_step(batch, batch_idx)


class PlainSGD(TinyClassifier):
    """TinyClassifier with plain SGD (no momentum) and an optional scheduler factory."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler(opt)}


class DictOutTask(PlainSGD):
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}


def flat_params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def assert_params_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = list(a.parameters()), list(b.parameters())
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


def hand_loop(
    model: TinyClassifier,
    loader: DataLoader,
    max_steps: int,
    clip: float | None = None,
    accumulate: int = 1,
    lrs: list[float] | None = None,
) -> list[float]:
    """The plain PyTorch loop the Trainer must reproduce; returns the gradient norms before clipping."""
    cfg = model.configure_optimizers()
    if isinstance(cfg, dict):
        opt, sched = cfg["optimizer"], cfg.get("lr_scheduler")
    else:
        opt, sched = cfg, None
    model.train()
    opt.zero_grad(set_to_none=True)
    norms: list[float] = []
    step = 0
    while step < max_steps:
        batches = list(enumerate(loader))  # one pass; the sampler draws its order at iter() time
        for i, (batch_idx, batch) in enumerate(batches):
            out = model.training_step(batch, batch_idx)
            loss = out["loss"] if isinstance(out, dict) else out
            (loss / accumulate if accumulate > 1 else loss).backward()
            if (i + 1) % accumulate == 0 or i + 1 == len(batches):
                if lrs is not None:
                    lrs.append(opt.param_groups[0]["lr"])
                if clip is not None:
                    norms.append(float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)))
                opt.step()
                if sched is not None:
                    sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if step == max_steps:
                    break
    return norms


# -- eval triggers and stop conditions ------------------------------------------------------------------


def test_step_mode_evaluates_after_steps_3_6_9():
    rec = EvalRecorder()
    trainer = tk.Trainer(run_mode="step", eval_interval=3, max_steps=10, callbacks=[rec], **cpu())
    # 8 batches per pass: step 9 is the first step of the second pass.
    result = trainer.fit(TinyClassifier(), make_loader(64, 8), make_loader(32, 8))
    assert [r["step"] for r in trainer.history] == [3, 6, 9]
    assert [r["epoch"] for r in trainer.history] == [0, 0, 1]
    assert [(s, e) for s, e, _ in rec.calls] == [(3, 0), (6, 0), (9, 1)]
    assert [m for _, _, m in rec.calls] == [r["metrics"] for r in trainer.history]
    assert (result.global_step, result.epoch, result.stop_reason) == (10, 1, "max_steps")
    assert result.metrics == trainer.history[-1]["metrics"]
    assert set(result.metrics) == {"val_loss", "val_acc"}


def test_epoch_mode_evaluates_after_epochs_2_and_4():
    rec = EvalRecorder()
    trainer = tk.Trainer(run_mode="epoch", eval_interval=2, max_epochs=5, callbacks=[rec], **cpu())
    result = trainer.fit(TinyClassifier(), make_loader(32, 8), make_loader(16, 8))  # 4 batches per pass
    assert [r["epoch"] for r in trainer.history] == [2, 4]
    assert [r["step"] for r in trainer.history] == [8, 16]
    assert [(s, e) for s, e, _ in rec.calls] == [(8, 2), (16, 4)]
    # No evaluation is forced at the end of fit (epoch 5 is not a multiple of 2).
    assert (result.global_step, result.epoch, result.stop_reason) == (20, 5, "max_epochs")
    assert not result.stopped_early


def test_no_val_loader_means_no_evaluation():
    rec = EvalRecorder()
    trainer = tk.Trainer(run_mode="step", eval_interval=2, max_steps=6, callbacks=[rec], **cpu())
    result = trainer.fit(TinyClassifier(), make_loader(32, 8))
    assert rec.calls == [] and trainer.history == [] and result.metrics == {}
    assert result.global_step == 6


def test_max_steps_stops_mid_epoch():
    task = CountingTask()
    result = tk.Trainer(run_mode="step", max_steps=6, **cpu()).fit(task, make_loader(32, 8))
    assert (result.global_step, result.epoch, result.stop_reason) == (6, 1, "max_steps")
    assert len(task.seen) == 6  # not one batch more than the steps taken
    assert [b for *_, b in task.seen] == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize(
    ("max_steps", "max_epochs", "expected"),
    [
        (6, 5, (6, 1, "max_steps")),  # max_steps comes first
        (100, 2, (8, 2, "max_epochs")),  # max_epochs comes first
        (5, 100, (5, 1, "max_steps")),
        (13, 3, (12, 3, "max_epochs")),
    ],
)
def test_first_stop_condition_wins(max_steps, max_epochs, expected):
    for mode in ("step", "epoch"):
        trainer = tk.Trainer(run_mode=mode, max_steps=max_steps, max_epochs=max_epochs, **cpu())
        result = trainer.fit(TinyClassifier(), make_loader(32, 8))  # 4 batches per pass
        assert (result.global_step, result.epoch, result.stop_reason) == expected
        assert (trainer.global_step, trainer.current_epoch) == expected[:2]


def test_max_steps_and_max_epochs_meeting_at_the_same_step():
    result = tk.Trainer(max_steps=8, max_epochs=2, **cpu()).fit(TinyClassifier(), make_loader(32, 8))
    assert (result.global_step, result.epoch) == (8, 2)
    assert result.stop_reason in ("max_steps", "max_epochs")


class EpochSampler(Sampler[int]):
    def __init__(self, n: int) -> None:
        self.inner = SequentialSampler(range(n))
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def test_sampler_set_epoch_is_called_each_pass():
    sampler = EpochSampler(32)
    loader = DataLoader(make_data(32), batch_size=8, sampler=sampler)
    result = tk.Trainer(max_epochs=3, **cpu()).fit(TinyClassifier(), loader)
    assert result.epoch == 3
    assert sampler.epochs == [0, 1, 2]

    sampler = EpochSampler(32)
    loader = DataLoader(make_data(32), batch_size=8, sampler=sampler)
    tk.Trainer(run_mode="step", max_steps=10, **cpu()).fit(TinyClassifier(), loader)
    assert sampler.epochs == [0, 1, 2]  # steps 9 and 10 open the third pass


def test_distributed_sampler_reshuffles_per_epoch_through_set_epoch():
    """A DistributedSampler (world size 1) gives a different order each pass only because set_epoch is called."""
    data = make_data(16)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    orders: list[list[int]] = []

    class RecordX(TinyClassifier):
        def training_step(self, batch, batch_idx):
            orders.append([int(torch.nonzero((data.tensors[0] == row).all(1))[0]) for row in batch[0]])
            return super().training_step(batch, batch_idx)

    tk.Trainer(max_epochs=3, **cpu()).fit(RecordX(), DataLoader(data, batch_size=16, sampler=sampler))
    expected = []
    for epoch in range(3):
        g = torch.Generator().manual_seed(3 + epoch)
        expected.append(torch.randperm(16, generator=g).tolist())
    assert orders == expected
    assert orders[0] != orders[1]


def test_task_sees_trainer_global_step_and_current_epoch():
    task = CountingTask()
    trainer = tk.Trainer(run_mode="step", max_steps=6, **cpu())
    trainer.fit(task, make_loader(32, 8))
    assert task.seen == [
        (True, 0, 0, 0),
        (True, 1, 0, 1),
        (True, 2, 0, 2),
        (True, 3, 0, 3),
        (True, 4, 1, 0),
        (True, 5, 1, 1),
    ]
    assert task.trainer is trainer


def test_training_runs_in_train_mode_and_evaluation_in_eval_mode_without_grad():
    modes: list[tuple[str, bool, bool]] = []

    class ModeTask(TinyClassifier):
        def training_step(self, batch, batch_idx):
            modes.append(("train", self.training, torch.is_grad_enabled()))
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            modes.append(("val", self.net[2].training, torch.is_grad_enabled()))
            return super().validation_step(batch, batch_idx)

    task = ModeTask(dropout=0.5)
    tk.Trainer(run_mode="step", eval_interval=2, max_steps=3, **cpu()).fit(
        task, make_loader(32, 8), make_loader(8, 8)
    )
    assert modes == [
        ("train", True, True),
        ("train", True, True),
        ("val", False, False),
        ("train", True, True),
    ]
    assert task.training and all(m.training for m in task.modules())


# -- parity with a hand-written loop ---------------------------------------------------------------------


def test_parity_with_hand_written_loop_plain_sgd():
    # Dropout draws from the global RNG too, so the RNG stream must match the hand loop's exactly.
    # TinyClassifier seeds its own init; the seed set after construction drives shuffle and dropout.
    task = PlainSGD(lr=0.2, dropout=0.2)
    torch.manual_seed(123)
    result = tk.Trainer(run_mode="step", max_steps=20, **cpu()).fit(task, make_loader(64, 8, shuffle=True))
    assert (result.global_step, result.epoch) == (20, 2)

    reference = PlainSGD(lr=0.2, dropout=0.2)
    torch.manual_seed(123)
    hand_loop(reference, make_loader(64, 8, shuffle=True), max_steps=20)

    initial = PlainSGD(lr=0.2, dropout=0.2)
    assert any(not torch.equal(a, b) for a, b in zip(task.parameters(), initial.parameters()))
    assert_params_equal(task, reference)


def test_parity_detects_a_different_data_order():
    """The parity comparison is sharp: a different shuffle seed gives different parameters."""
    task = PlainSGD(lr=0.2)
    torch.manual_seed(123)
    tk.Trainer(run_mode="step", max_steps=12, **cpu()).fit(task, make_loader(64, 8, shuffle=True))
    reference = PlainSGD(lr=0.2)
    torch.manual_seed(124)
    hand_loop(reference, make_loader(64, 8, shuffle=True), max_steps=12)
    assert any(not torch.equal(a, b) for a, b in zip(task.parameters(), reference.parameters()))


def _warmup_cosine(opt):
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=15)
    return tk.WarmupScheduler(opt, warmup_steps=5, warmup_factor=0.1, main_scheduler=cosine)


def test_parity_with_clip_grad_and_warmup_cosine_scheduler():
    task = PlainSGD(lr=2.0, scheduler=_warmup_cosine)
    torch.manual_seed(7)
    trainer = tk.Trainer(run_mode="step", max_steps=20, clip_grad=0.3, **cpu())
    trainer.fit(task, make_loader(64, 8, shuffle=True))

    reference = PlainSGD(lr=2.0, scheduler=_warmup_cosine)
    torch.manual_seed(7)
    lrs: list[float] = []
    norms = hand_loop(reference, make_loader(64, 8, shuffle=True), max_steps=20, clip=0.3, lrs=lrs)
    assert sum(n > 0.3 for n in norms) >= 10  # clipping really acted
    assert lrs[:6] == pytest.approx([0.2, 0.56, 0.92, 1.28, 1.64, 2.0])  # the schedule really moved
    assert_params_equal(task, reference)
    assert trainer.optimizer.param_groups[0]["lr"] == reference_lr_after(20)


def reference_lr_after(steps: int) -> float:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = _warmup_cosine(opt)
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def test_parity_with_dict_training_step_output():
    task = DictOutTask(lr=0.3)
    torch.manual_seed(11)
    tk.Trainer(max_epochs=2, **cpu()).fit(task, make_loader(48, 8, shuffle=True))
    reference = DictOutTask(lr=0.3)
    torch.manual_seed(11)
    hand_loop(reference, make_loader(48, 8, shuffle=True), max_steps=12)
    assert_params_equal(task, reference)


# -- gradient accumulation -------------------------------------------------------------------------------


def test_accumulating_k_batches_equals_one_batch_of_k_times_b():
    accumulated = PlainSGD(lr=0.5)
    tk.Trainer(run_mode="step", max_steps=3, accumulate_grad_batches=4, **cpu()).fit(
        accumulated, make_loader(64, 4)
    )
    big = PlainSGD(lr=0.5)
    tk.Trainer(run_mode="step", max_steps=3, **cpu()).fit(big, make_loader(64, 16))
    untouched = PlainSGD(lr=0.5)
    for a, b, c in zip(accumulated.parameters(), big.parameters(), untouched.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(a, c, atol=1e-3)


def test_accumulation_steps_a_partial_group_at_the_end_of_a_pass():
    task = CountingTask(lr=0.5)
    trainer = tk.Trainer(max_epochs=2, accumulate_grad_batches=2, **cpu())
    result = trainer.fit(task, make_loader(20, 4))  # 5 batches per pass: groups of 2, 2, 1
    assert (result.global_step, result.epoch) == (6, 2)
    assert [g for _, g, _, _ in task.seen] == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    # The hand loop divides every loss by k, the partial group's too.
    reference = TinyClassifier(lr=0.5)
    hand_loop(reference, make_loader(20, 4), max_steps=6, accumulate=2)
    assert_params_equal(task, reference)


class BatchStream(IterableDataset):
    """An iterable dataset (no len): the loop only learns that a pass ended when it is exhausted."""

    def __init__(self, n_batches: int, batch_size: int = 4) -> None:
        self.data = make_data(n_batches * batch_size)
        self.n_batches, self.batch_size = n_batches, batch_size

    def __iter__(self):
        x, y = self.data.tensors
        for i in range(self.n_batches):
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield x[s], y[s]


@pytest.mark.parametrize(("n_batches", "steps_per_pass"), [(5, 3), (4, 2)])
def test_accumulation_on_an_iterable_loader(n_batches, steps_per_pass):
    loader = DataLoader(BatchStream(n_batches), batch_size=None)
    task = PlainSGD(lr=0.5)
    result = tk.Trainer(max_epochs=2, accumulate_grad_batches=2, **cpu()).fit(task, loader)
    assert (result.global_step, result.epoch) == (2 * steps_per_pass, 2)
    reference = PlainSGD(lr=0.5)
    hand_loop(reference, loader, max_steps=2 * steps_per_pass, accumulate=2)
    assert_params_equal(task, reference)


# -- evaluation metrics ----------------------------------------------------------------------------------


class SampleMetricTask(TinyClassifier):
    """validation_step returns the batch mean of a per-sample value, a python float and an int."""

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        return {"xsum": x.sum(1).mean(), "size": float(x.shape[0]), "one": 1}


def test_metrics_are_averaged_weighted_by_batch_size_on_an_uneven_last_batch():
    data = make_data(10)
    loader = DataLoader(data, batch_size=4)  # batches of 4, 4, 2
    metrics = tk.Trainer(max_steps=1, **cpu()).validate(SampleMetricTask(), loader)
    # By hand, the way the definition reads: sum over batches of (batch mean * batch size) / samples.
    x = data.tensors[0]
    means = [float(x[i : i + 4].sum(1).mean()) for i in (0, 4, 8)]
    expected = (means[0] * 4 + means[1] * 4 + means[2] * 2) / 10
    assert metrics["val_xsum"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # Equal to the mean over the 10 samples, and different from the plain mean of the 3 batch means.
    assert metrics["val_xsum"] == pytest.approx(float(x.double().sum(1).mean()), abs=1e-6)
    assert abs(metrics["val_xsum"] - sum(means) / 3) > 1e-3
    assert metrics["val_size"] == (4 * 4 + 4 * 4 + 2 * 2) / 10  # python floats are weighted too
    assert metrics["val_one"] == 1.0
    assert set(metrics) == {"val_xsum", "val_size", "val_one"}


def test_validate_and_test_standalone_prefixes_and_default_test_step():
    task = TinyClassifier()
    task.train()
    trainer = tk.Trainer(max_steps=1, **cpu())
    loader = make_loader(10, 4)
    val = trainer.validate(task, loader)
    test = trainer.test(task, loader)
    assert set(val) == {"val_loss", "val_acc"} and set(test) == {"test_loss", "test_acc"}
    assert val["val_loss"] == test["test_loss"] and val["val_acc"] == test["test_acc"]
    with torch.no_grad():
        x, y = make_data(10).tensors
        logits = task(x)
    assert val["val_loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert val["val_acc"] == pytest.approx(float((logits.argmax(1) == y).double().mean()), abs=1e-12)
    assert task.training  # train mode restored


def test_test_uses_test_step_when_defined_and_fit_evaluates_the_test_loader():
    class WithTestStep(TinyClassifier):
        def test_step(self, batch, batch_idx):
            return {"marker": torch.tensor(7.0)}

    trainer = tk.Trainer(max_steps=1, **cpu())
    assert trainer.test(WithTestStep(), make_loader(8, 4)) == {"test_marker": 7.0}
    assert set(trainer.validate(WithTestStep(), make_loader(8, 4))) == {"val_loss", "val_acc"}

    trainer = tk.Trainer(run_mode="step", eval_interval=2, max_steps=2, **cpu())
    result = trainer.fit(WithTestStep(), make_loader(32, 8), make_loader(8, 4), test_loader=make_loader(8, 4))
    assert set(result.metrics) == {"val_loss", "val_acc", "test_marker"}


def test_a_metric_that_is_not_a_scalar_raises():
    class VectorMetric(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            return {"per_sample": batch[0].sum(1)}

    with pytest.raises(ValueError, match="per_sample") as info:
        tk.Trainer(max_steps=1, **cpu()).validate(VectorMetric(), make_loader(8, 4))
    assert "scalar" in str(info.value) and "(4,)" in str(info.value)


def test_a_validation_step_that_returns_no_mapping_raises():
    class ListMetric(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            return [1.0]

    with pytest.raises(TypeError, match="validation_step"):
        tk.Trainer(max_steps=1, **cpu()).validate(ListMetric(), make_loader(8, 4))


# -- precision and devices -------------------------------------------------------------------------------


class AutocastProbe(PlainSGD):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dtypes: list[torch.dtype] = []
        self.losses: list[float] = []
        self.devices: list[torch.device] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.devices.append(x.device)
        logits = self(x)
        self.dtypes.append(logits.dtype)
        loss = F.cross_entropy(logits, y)
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        self.devices.append(batch[0].device)
        return super().validation_step(batch, batch_idx)


def test_bf16_mixed_trains_on_cpu():
    task = AutocastProbe(lr=0.5)
    before = flat_params(task)
    trainer = tk.Trainer(run_mode="step", max_steps=4, eval_interval=4, precision="bf16-mixed", **cpu())
    result = trainer.fit(task, make_loader(32, 8), make_loader(8, 8))
    assert task.dtypes == [torch.bfloat16] * 4  # autocast was on in training_step
    assert all(math.isfinite(v) for v in task.losses)
    assert all(p.dtype == torch.float32 for p in task.parameters())  # master weights stay fp32
    assert all(not torch.equal(a, b) for a, b in zip(before, task.parameters()))
    assert math.isfinite(result.metrics["val_loss"])


def test_default_precision_is_full_fp32():
    task = AutocastProbe()
    tk.Trainer(max_steps=2, **cpu()).fit(task, make_loader(16, 8))
    assert task.dtypes == [torch.float32] * 2


def test_device_cpu_keeps_everything_on_cpu():
    task = AutocastProbe()
    trainer = tk.Trainer(run_mode="step", eval_interval=2, max_steps=2, **quiet(device="cpu"))
    trainer.fit(task, make_loader(16, 8), make_loader(8, 8))
    assert trainer.device == torch.device("cpu")
    assert {d.type for d in task.devices} == {"cpu"}


# CUDA: skipped without a GPU (tests/conftest.py).


@pytest.mark.cuda
def test_cuda_device_is_selected_automatically_and_batches_land_on_it():
    class DictBatches(AutocastProbe):
        def training_step(self, batch, batch_idx):
            assert batch["x"].device.type == "cuda" and batch["y"].device.type == "cuda"
            return super().training_step((batch["x"], batch["y"]), batch_idx)

        def validation_step(self, batch, batch_idx):
            return super().validation_step((batch["x"], batch["y"]), batch_idx)

    def collate(items):
        return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}

    trainer = tk.Trainer(run_mode="step", eval_interval=2, max_steps=4, **quiet())
    assert trainer.device.type == "cuda"
    task = DictBatches()
    result = trainer.fit(
        task,
        DataLoader(make_data(32), batch_size=8, collate_fn=collate, pin_memory=True),
        DataLoader(make_data(8), batch_size=4, collate_fn=collate),
    )
    assert {d.type for d in task.devices} == {"cuda"}
    assert len(task.devices) == 4 + 2 * 2  # 4 train batches, 2 evaluations of 2 batches
    assert all(p.device.type == "cuda" for p in task.parameters())
    assert math.isfinite(result.metrics["val_loss"])


@pytest.mark.cuda
def test_cuda_16_mixed_uses_a_grad_scaler_and_clips_after_unscaling():
    clip = 0.01

    class StepDelta(tk.Callback):
        def __init__(self) -> None:
            self.before: list[torch.Tensor] = []
            self.deltas: list[float] = []

        def on_batch_start(self, trainer, module, batch, batch_idx):
            self.before = flat_params(module)

        def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
            diff = [p.detach() - b for p, b in zip(module.parameters(), self.before)]
            self.deltas.append(float(torch.linalg.vector_norm(torch.cat([d.flatten() for d in diff]))))

    probe = StepDelta()
    task = AutocastProbe(lr=1.0)  # plain SGD, lr 1: a step moves the weights by exactly the clipped gradient
    trainer = tk.Trainer(
        run_mode="step", max_steps=8, precision="16-mixed", clip_grad=clip, callbacks=[probe], **quiet()
    )
    trainer.fit(task, make_loader(64, 16))
    assert isinstance(trainer._scaler, torch.amp.GradScaler)
    assert task.dtypes == [torch.float16] * 8
    assert all(math.isfinite(v) for v in task.losses)
    taken = [d for d in probe.deltas if d > 0]  # a step skipped for inf/nan gradients moves nothing
    assert len(taken) >= 6
    # Clipping the scaled gradients would move the weights by clip / scale (about 1.5e-7).
    assert taken == pytest.approx([clip] * len(taken), rel=1e-3)


@pytest.mark.cuda
def test_cuda_bf16_mixed_trains():
    task = AutocastProbe(lr=0.5)
    before = [p.cuda() for p in flat_params(task)]
    trainer = tk.Trainer(run_mode="step", max_steps=4, eval_interval=4, precision="bf16-mixed", **quiet())
    result = trainer.fit(task, make_loader(32, 8), make_loader(8, 8))
    assert task.dtypes == [torch.bfloat16] * 4
    assert all(math.isfinite(v) for v in task.losses)
    assert all(not torch.equal(a, b) for a, b in zip(before, task.parameters()))
    assert math.isfinite(result.metrics["val_loss"])
