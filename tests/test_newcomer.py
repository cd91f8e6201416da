"""What a newcomer meets in the first hour (issue 13): Lightning habits, metric objects, seeding, compiled
submodules. DDP runs are real gloo processes under torchrun; F1 is checked against scikit-learn."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyClassifier, make_loader, quiet
from newcomer_worker import VAL_BATCH, VAL_N, F1Task
from test_distributed import LAUNCH_TIMEOUT, finish, free_port, start, worker_env

import trainkit as tk
from trainkit import checkpoint as tk_checkpoint

torchmetrics = pytest.importorskip("torchmetrics")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

WORKER = str(Path(__file__).with_name("newcomer_worker.py"))


def expected_f1(module: torch.nn.Module, loader) -> float:
    """scikit-learn's macro F1 over the whole set at once, from the module's eval-mode predictions."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        preds = torch.cat([module(x).argmax(1) for x, _ in loader])
    module.train(was_training)
    targets = torch.cat([y for _, y in loader])
    assert set(targets.tolist()) == {0, 1, 2} and len(set(preds.tolist())) >= 2
    # A class never predicted has precision 0/0: both libraries then count its F1 as 0.
    return float(sklearn_metrics.f1_score(targets.numpy(), preds.numpy(), average="macro", zero_division=0))


def batch_mean_f1(module: torch.nn.Module, loader) -> float:
    """What averaging per-batch F1 values by batch size would give (what trainkit must *not* report)."""
    module.eval()
    total = n = 0.0
    with torch.no_grad():
        for x, y in loader:
            f1 = sklearn_metrics.f1_score(y.numpy(), module(x).argmax(1).numpy(), average="macro", zero_division=0)
            total, n = total + f1 * len(y), n + len(y)
    return total / n


# -- seed_everything and exports ----------------------------------------------------------------------------


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_seed_everything_seeds_python_numpy_torch_and_returns_the_seed():
    assert tk.seed_everything(1234) == 1234
    first = draws()
    draws()  # move every generator on
    assert tk.seed_everything(np.int64(1234)) == 1234
    again = draws()
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    tk.seed_everything(1235)
    assert draws()[0] != first[0]


@pytest.mark.parametrize(
    "seed, error, words",
    [(-1, ValueError, "[0, 4294967295]"), (2**32, ValueError, "4294967296"), (1.5, TypeError, "float"),
     ("7", TypeError, "str"), (True, TypeError, "bool")],
)  # fmt: skip
def test_seed_everything_rejects_bad_seeds(seed, error, words):
    with pytest.raises(error, match="seed") as info:
        tk.seed_everything(seed)
    assert words in str(info.value)


def test_public_names():
    from trainkit.checkpoint import CheckpointNotFoundError

    assert tk.CheckpointNotFoundError is CheckpointNotFoundError
    assert {"CheckpointNotFoundError", "seed_everything"} <= set(tk.__all__)
    assert tk.qWarmupScheduler is tk.WarmupScheduler
    with pytest.raises(tk.CheckpointNotFoundError, match="nowhere.ckpt"):
        tk.load_checkpoint("nowhere.ckpt")


# -- predict_step and self.log ------------------------------------------------------------------------------


def test_predict_step_defaults_to_forward_on_the_batch():
    module = TinyClassifier()
    x = torch.randn(5, 8)
    assert torch.equal(module.predict_step(x, 0), module(x))

    class NoForward(tk.TaskModule):
        pass

    with pytest.raises(NotImplementedError, match=r"no forward\(\).*override predict_step"):
        NoForward().predict_step(x, 0)


class Logs(TinyClassifier):
    """Lightning habit: self.log / self.log_dict inside a step."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.where == "train":
            self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        if self.where == "val":
            self.log_dict(out)
        return out


@pytest.mark.parametrize("where, call", [("train", "self.log('train_loss', ...)"), ("val", "self.log_dict(...)")])
def test_self_log_in_a_step_raises_a_pointed_error(where, call):
    trainer = tk.Trainer(max_steps=2, eval_interval=1, run_mode="step", **quiet())
    with pytest.raises(RuntimeError) as info:
        trainer.fit(Logs(where), make_loader(16), make_loader(8))
    message = str(info.value)
    assert message.startswith(call)
    assert "return a dict from training_step/validation_step instead" in message


# -- metric objects -----------------------------------------------------------------------------------------


def val_loader():
    return make_loader(VAL_N, batch_size=VAL_BATCH, seed=1)  # batches of 5, 5, ... and a last one of 2


def test_torchmetrics_f1_is_computed_over_the_whole_set_then_reset():
    module, loader = F1Task(), val_loader()
    trainer = tk.Trainer(max_epochs=1, **quiet())
    expected = expected_f1(module, loader)
    assert abs(batch_mean_f1(module, loader) - expected) > 1e-3  # so a batch mean could not pass
    metrics = trainer.validate(module, loader)
    assert sorted(metrics) == ["val_f1", "val_loss"]
    assert metrics["val_f1"] == pytest.approx(expected, rel=1e-6)
    assert module.val_f1.update_count == 0  # reset after the loader
    assert trainer.validate(module, loader) == metrics  # so a second pass starts from nothing
    assert trainer.test(module, loader)["test_f1"] == pytest.approx(expected, rel=1e-6)


def test_metric_object_per_named_evaluation_set():
    module, whole, half = F1Task(), val_loader(), make_loader(20, batch_size=VAL_BATCH, seed=1)
    metrics = tk.Trainer(**quiet()).validate(module, {"whole": whole, "part": half})
    assert metrics["val_whole_f1"] == pytest.approx(expected_f1(module, whole), rel=1e-6)
    assert metrics["val_part_f1"] == pytest.approx(expected_f1(module, half), rel=1e-6)
    assert module.val_f1.update_count == 0


def test_metric_objects_during_fit_with_ema_and_a_test_loader():
    module, loader = F1Task(), val_loader()
    trainer = tk.Trainer(run_mode="step", max_steps=4, eval_interval=2, use_ema=True, ema_decay=0.5, **quiet())
    result = trainer.fit(module, make_loader(32, batch_size=4), loader, test_loader=loader)
    assert [r.step for r in trainer.history] == [2, 4]
    base, ema = expected_f1(module, loader), expected_f1(trainer.ema_module, loader)
    assert base != ema
    for name, value in [("val_f1", base), ("test_f1", base), ("ema_val_f1", ema), ("ema_test_f1", ema)]:
        assert result.metrics[name] == pytest.approx(value, rel=1e-6), name
    assert module.val_f1.update_count == 0 and trainer.ema_module.val_f1.update_count == 0


class Duck:
    """A metric object without torchmetrics: counts correct predictions over the whole set."""

    def __init__(self) -> None:
        self.reset()

    def update(self, correct: torch.Tensor) -> None:
        self.right += int(correct.sum())
        self.seen += correct.numel()

    def compute(self) -> dict[str, float]:
        return {"right": float(self.right), "rate": self.right / self.seen}

    def reset(self) -> None:
        self.right = self.seen = 0


class DuckTask(TinyClassifier):
    def __init__(self, fresh_each_batch: bool = False) -> None:
        super().__init__()
        self.duck, self.fresh = Duck(), fresh_each_batch

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if self.fresh:
            self.duck = Duck()
        self.duck.update(self(x).argmax(1) == y)
        return {"hits": self.duck}


def test_duck_typed_metric_object_with_a_mapping_result():
    module, loader = DuckTask(), val_loader()
    module.eval()
    with torch.no_grad():
        right = sum(int((module(x).argmax(1) == y).sum()) for x, y in loader)
    metrics = tk.Trainer(max_epochs=1, **quiet()).validate(module, loader)
    assert metrics == {"val_hits_right": float(right), "val_hits_rate": right / VAL_N}
    assert module.duck.seen == 0


def test_a_new_metric_object_every_batch_is_refused():
    with pytest.raises(ValueError, match=r"different metric object for 'hits'.*same object every batch"):
        tk.Trainer(max_epochs=1, **quiet()).validate(DuckTask(fresh_each_batch=True), val_loader())


def test_metric_objects_under_two_rank_ddp(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", WORKER, str(tmp_path)]  # fmt: skip
    code, out = finish(start(cmd, worker_env()), LAUNCH_TIMEOUT)
    assert code == 0, out[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["fit"] == ranks[1]["fit"] and ranks[0]["validate"] == ranks[1]["validate"]
    loader = val_loader()  # the whole set, in one process
    module, ema = F1Task(), F1Task()
    module.load_state_dict(ranks[0]["model"])
    ema.load_state_dict(ranks[0]["ema"])
    base, averaged = expected_f1(module, loader), expected_f1(ema, loader)
    assert abs(batch_mean_f1(module, loader) - base) > 1e-3
    fit, validate, test = ranks[0]["fit"], ranks[0]["validate"], ranks[0]["test"]
    for name, got, want in [
        ("fit val_f1", fit["val_f1"], base), ("fit test_f1", fit["test_f1"], base),
        ("fit ema_val_f1", fit["ema_val_f1"], averaged), ("fit ema_test_f1", fit["ema_test_f1"], averaged),
        ("validate val_f1", validate["val_f1"], base), ("validate ema_val_f1", validate["ema_val_f1"], averaged),
        ("test test_f1", test["test_f1"], base),
    ]:  # fmt: skip
        assert got == pytest.approx(want, rel=1e-6), name


# -- torch.compile'd submodules -----------------------------------------------------------------------------


def compiled(module: TinyClassifier) -> TinyClassifier:
    module.net = torch.compile(module.net, backend="eager")  # an OptimizedModule: `_orig_mod.` keys
    return module


def test_strip_compile_prefix():
    module = compiled(TinyClassifier())
    keys = list(module.state_dict())
    assert keys[0] == "net._orig_mod.0.weight"
    state = module.state_dict()
    stripped = tk_checkpoint.strip_compile_prefix(state)
    assert list(stripped) == list(TinyClassifier().state_dict())
    assert all(stripped[k.replace("_orig_mod.", "")] is v for k, v in state.items())
    whole = torch.compile(TinyClassifier(), backend="eager")
    assert list(tk_checkpoint.strip_compile_prefix(whole.state_dict())) == list(TinyClassifier().state_dict())


def test_load_weights_between_plain_and_compiled_modules(tmp_path):
    trainer = tk.Trainer(run_mode="step", max_steps=2, save_interval=2, **quiet(checkpoint_dir=str(tmp_path)))
    trained = TinyClassifier()
    trainer.fit(trained, make_loader(16))
    plain_ckpt = str(tmp_path / "step_000000002.ckpt")
    # A checkpoint whose keys carry `_orig_mod.` (as one saved from a compiled module would).
    ckpt = tk.load_checkpoint(plain_ckpt)
    ckpt["model"] = compiled(TinyClassifier(seed=5)).state_dict()
    for k, v in ckpt["model"].items():
        v.copy_(trained.state_dict()[k.replace("_orig_mod.", "")])
    compiled_ckpt = str(tmp_path / "compiled.ckpt")
    torch.save(ckpt, compiled_ckpt)
    for path in (plain_ckpt, compiled_ckpt):
        for target in (TinyClassifier(seed=1), compiled(TinyClassifier(seed=1)),
                       torch.compile(TinyClassifier(seed=1), backend="eager")):  # fmt: skip
            tk.load_weights(target, path)
            got = tk_checkpoint.strip_compile_prefix(target.state_dict())
            assert got.keys() == trained.state_dict().keys()
            assert all(torch.equal(got[k], v) for k, v in trained.state_dict().items())
