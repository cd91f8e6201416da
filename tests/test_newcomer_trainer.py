"""Issue 13 on the Trainer side: not mixing runs silently, settings that can do nothing, what is logged and
shown, predict, Trainer() without limits, save_last, compiled submodules in checkpoints, and pointed
errors for Lightning's argument names."""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, make_loader, quiet

import trainkit as tk
from trainkit import checkpoint as tk_checkpoint


def files(path) -> list[str]:
    return sorted(os.listdir(path))


def step_fit(checkpoint_dir: str | None = "ckpts", **kwargs) -> tk.Trainer:
    return tk.Trainer(**quiet(run_mode="step", checkpoint_dir=checkpoint_dir, **kwargs))


# -- don't silently mix runs ------------------------------------------------------------------------------


def test_fit_without_ckpt_path_into_a_used_checkpoint_dir_warns_once(recwarn):
    step_fit(max_steps=6, save_interval=2, eval_interval=3).fit(TinyClassifier(), make_loader(), make_loader())
    assert files("ckpts") == ["best.ckpt", "step_000000002.ckpt", "step_000000004.ckpt", "step_000000006.ckpt"]
    recwarn.clear()
    step_fit(max_steps=2, save_interval=2).fit(TinyClassifier(), make_loader())
    mixing = [w for w in recwarn if "already holds checkpoints" in str(w.message)]
    assert len(mixing) == 1
    message = str(mixing[0].message)
    assert "(step_000000002.ckpt, ..., step_000000006.ckpt, best.ckpt)" in message
    assert "ckpt_path='last' to continue" in message
    assert mixing[0].filename == __file__  # points at the user's fit() call
    recwarn.clear()
    step_fit(max_steps=8, save_interval=2).fit(TinyClassifier(), make_loader(), ckpt_path="last")
    step_fit("fresh", max_steps=2, save_interval=2).fit(TinyClassifier(), make_loader())
    assert not [w for w in recwarn if "already holds checkpoints" in str(w.message)]


def test_resuming_last_says_which_file_and_step_at_warning_level(caplog, capsys, monkeypatch):
    step_fit(max_steps=4, save_interval=4).fit(TinyClassifier(), make_loader())
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        step_fit(max_steps=6, save_interval=4).fit(TinyClassifier(), make_loader(), ckpt_path="last")
    (record,) = [r for r in caplog.records if "resuming from" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "trainkit: ckpt_path='last': continuing at step 4, resuming from "
        + os.path.join(os.getcwd(), "ckpts", "step_000000004.ckpt")
    )
    # With no logging configured at all (no handler anywhere), Python's last-resort handler prints it.
    monkeypatch.setattr(logging.root, "handlers", [])
    capsys.readouterr()
    step_fit(max_steps=8, save_interval=4).fit(TinyClassifier(), make_loader(), ckpt_path="last")
    assert "continuing at step 6, resuming from" not in capsys.readouterr().err  # 6 is not a save step
    step_fit(max_steps=10, save_interval=4).fit(TinyClassifier(), make_loader(), ckpt_path="last")
    assert "trainkit: ckpt_path='last': continuing at step 8, resuming from" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, words",
    [(dict(save_interval=5), "save_interval=5 has no effect with checkpoint_dir=None"),
     (dict(save_last=True), "save_last=True has no effect with checkpoint_dir=None"),
     (dict(save_interval=5, save_last=True), "save_interval=5 and save_last=True have no effect")],
)  # fmt: skip
def test_checkpoint_settings_without_checkpoint_dir_warn_once(kwargs, words):
    with pytest.warns(UserWarning) as record:
        trainer = tk.Trainer(max_steps=2, **quiet(**kwargs))
    (idle,) = [w for w in record if "no effect" in str(w.message)]
    assert str(idle.message).startswith(words) and idle.filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fit says nothing more
        trainer.fit(TinyClassifier(), make_loader())


@pytest.mark.parametrize(
    "kwargs, words",
    [(dict(early_stop={"patience": 2}), "early_stop={'patience': 2} has no effect without a val_loader"),
     (dict(monitor={"target": "val_acc", "mode": "max"}), "monitor={'target': 'val_acc', 'mode': 'max'} has no"),
     (dict(early_stop={"patience": 2}, monitor={"target": "val_acc"}), "early_stop={'patience': 2} and monitor=")],
)  # fmt: skip
def test_early_stop_or_monitor_without_a_val_loader_warns_once(kwargs, words):
    trainer = step_fit(None, max_steps=2, **kwargs)
    with pytest.warns(UserWarning) as record:
        trainer.fit(TinyClassifier(), make_loader())
    idle = [w for w in record if "without a val_loader" in str(w.message)]
    assert len(idle) == 1 and str(idle[0].message).startswith(words) and idle[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_fit(None, max_steps=2, eval_interval=1, **kwargs).fit(TinyClassifier(), make_loader(), make_loader())


# -- what is logged and shown -----------------------------------------------------------------------------


class GradMetric(TinyClassifier):
    """The README's pattern: extra training outputs that still require grad."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "scaled": loss * 2, "acc": (logits.argmax(1) == y).float().mean()}


def test_logged_training_outputs_are_detached_no_torch_warning(tmp_path):
    trainer = step_fit(None, max_steps=3, log_every_n_steps=1, log_dir=str(tmp_path / "runs"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*requires_grad=True to a scalar")
        trainer.fit(GradMetric(), make_loader())
    assert trainer.global_step == 3


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Losses(tk.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs.detach()))


@pytest.mark.parametrize("eval_last", [False, True])
def test_progress_bar_last_frame_shows_the_final_step(monkeypatch, eval_last):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    losses = Losses()
    trainer = tk.Trainer(**quiet(run_mode="step", max_steps=5, log_every_n_steps=2, eval_interval=5 if eval_last else 100,
                                 progress_bar=True, callbacks=[losses]))  # fmt: skip
    trainer.fit(TinyClassifier(), make_loader(), make_loader())
    frames = [f for f in terminal.getvalue().split("\r") if f.startswith("train")]
    last = frames[-1]
    assert "5/5" in last and f"loss={losses.losses[-1]:.4g}" in last, last
    assert f"loss={losses.losses[3]:.4g}" not in last  # step 4, the last log step
    if eval_last:
        assert f"val_loss={trainer.latest_metrics['val_loss']:.4g}" in last


# -- predict ----------------------------------------------------------------------------------------------


class Predictor(TinyClassifier):
    def __init__(self) -> None:
        super().__init__(dropout=0.5)
        self.seen: list[tuple[bool, bool, bool]] = []

    def predict_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((torch.is_inference_mode_enabled(), self.training, self.net[2].training))
        logits = self(x)
        return {"logits": logits, "pair": (logits.argmax(1), [y]), "idx": batch_idx}


def test_predict_returns_outputs_in_loader_order_in_eval_and_inference_mode():
    module = Predictor()
    module.net[0].eval()  # a submodule in its own mode: restored as it was
    loader = make_loader(n=12, batch_size=5)  # 5, 5, 2
    trainer = tk.Trainer(**quiet())  # neither max_steps nor max_epochs: fine for predict
    out = trainer.predict(module, loader)
    assert module.seen == [(True, False, False)] * 3
    assert module.training and module.net[2].training and not module.net[0].training
    assert [o["idx"] for o in out] == [0, 1, 2]
    module.eval()
    for (x, y), o in zip(loader, out):
        assert torch.equal(o["logits"], module(x)) and o["logits"].device.type == "cpu"
        assert torch.equal(o["pair"][0], module(x).argmax(1)) and torch.equal(o["pair"][1][0], y)
    plain = trainer.predict(TinyClassifier(), [torch.ones(2, 8)])  # the default predict_step: self(batch)
    assert torch.equal(plain[0], TinyClassifier()(torch.ones(2, 8)))


def test_predict_takes_one_loader_not_a_mapping_of_sets():
    with pytest.raises(TypeError, match="predict takes one loader"):
        tk.Trainer(**quiet()).predict(TinyClassifier(), {"a": [torch.ones(2, 8)]})


def test_predict_restores_train_mode_after_a_failure():
    class Fails(TinyClassifier):
        def predict_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    module = Fails()
    with pytest.raises(RuntimeError, match="boom"):
        tk.Trainer(**quiet()).predict(module, make_loader())
    assert all(m.training for m in module.modules())


def test_trainer_without_limits_evaluates_and_predicts_but_fit_raises():
    trainer = tk.Trainer()  # the defaults: checkpoint_dir="checkpoints", log_dir="runs"
    module = TinyClassifier()
    assert set(trainer.validate(module, make_loader())) == {"val_loss", "val_acc"}
    assert set(trainer.test(module, make_loader())) == {"test_loss", "test_acc"}
    assert len(trainer.predict(module, [torch.ones(2, 8)] * 3)) == 3
    with pytest.raises(ValueError) as info:
        trainer.fit(module, make_loader())
    for word in ("max_epochs", "max_steps", "None", "fit"):
        assert word in str(info.value)
    assert os.listdir(".") == []  # raised before anything was written


# -- save_last --------------------------------------------------------------------------------------------


class CountSaves(tk.Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.saved: list[int] = []
        self.stop_at = stop_at

    def on_save_checkpoint(self, trainer, module, checkpoint):
        self.saved.append(trainer.global_step)

    def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.stop_at:
            trainer.should_stop = True


@pytest.mark.parametrize(
    "kwargs, save_last, expected",
    [(dict(max_steps=5), True, [2, 4, 5]), (dict(max_steps=5), False, [2, 4]), (dict(max_steps=4), True, [2, 4]),
     (dict(max_epochs=1), True, [2, 4, 6, 8]), (dict(max_steps=50, stop_at=3), True, [2, 3])],
)  # fmt: skip
def test_save_last_writes_the_final_step_once(kwargs, save_last, expected):
    saves = CountSaves(kwargs.pop("stop_at", None))
    trainer = step_fit(save_interval=2, save_last=save_last, callbacks=[saves], **kwargs)
    trainer.fit(TinyClassifier(), make_loader())  # 8 batches a pass
    assert saves.saved == expected
    assert files("ckpts") == [f"step_{s:09d}.ckpt" for s in expected]


def test_save_last_also_after_early_stop_but_not_after_an_exception():
    class Flat(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            return {"loss": torch.tensor(1.0)}

    result = step_fit(max_steps=50, eval_interval=1, save_last=True, early_stop={"patience": 2}).fit(
        Flat(), make_loader(), make_loader()
    )
    assert result.stop_reason == "early_stop" and result.global_step == 3
    assert files("ckpts") == ["best.ckpt", "step_000000003.ckpt"]

    class Boom(TinyClassifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom"):
        step_fit("boom", max_steps=50, save_last=True).fit(Boom(), make_loader())
    assert not os.path.exists("boom")


# -- compiled submodules ----------------------------------------------------------------------------------


def compiled(module: TinyClassifier) -> TinyClassifier:
    module.net = torch.compile(module.net, backend="eager")
    return module


def test_compiled_submodules_save_plain_keys_and_load_both_ways():
    trainer = step_fit(max_steps=4, save_interval=4, use_ema=True, ema_decay=0.5)
    trained = compiled(TinyClassifier())
    trainer.fit(trained, make_loader())
    path = os.path.join("ckpts", "step_000000004.ckpt")
    ckpt = tk.load_checkpoint(path)
    plain_keys = list(TinyClassifier().state_dict())
    assert list(ckpt["model"]) == plain_keys and list(ckpt["ema"]["state_dict"]) == plain_keys
    want = tk_checkpoint.strip_compile_prefix(trained.state_dict())
    want_ema = tk_checkpoint.strip_compile_prefix(trainer.ema_module.state_dict())
    for ema, expected in ((False, want), (True, want_ema)):
        for target in (TinyClassifier(seed=3), compiled(TinyClassifier(seed=3))):
            got = tk_checkpoint.strip_compile_prefix(tk.load_weights(target, path, ema=ema).state_dict())
            assert all(torch.equal(got[k], v) for k, v in expected.items())
    # Resume both ways: the compiled run's file into a plain module, and a plain run's file into a compiled one.
    for module in (TinyClassifier(seed=3), compiled(TinyClassifier(seed=3))):
        resumed = step_fit(max_steps=4, use_ema=True, ema_decay=0.5)
        resumed.fit(module, make_loader(), ckpt_path=path)
        got = tk_checkpoint.strip_compile_prefix(module.state_dict())
        assert all(torch.equal(got[k], v) for k, v in want.items())
        got_ema = tk_checkpoint.strip_compile_prefix(resumed.ema_module.state_dict())
        assert all(torch.equal(got_ema[k], v) for k, v in want_ema.items())


# -- Lightning's argument names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [(dict(accelerator="gpu"), ["accelerator=", "Lightning", "device="]),
     (dict(devices=2), ["devices=", "device=", "distributed=True", "torchrun"]),
     (dict(num_nodes=2), ["num_nodes=", "torchrun --nnodes=N", "distributed=True"]),
     (dict(gradient_clip_val=1.0), ["gradient_clip_val=", "clip_grad="]),
     (dict(max_step=3), ["max_step=", "not a parameter", "did you mean max_steps="])],
)  # fmt: skip
def test_lightning_trainer_arguments_get_trainkit_names(kwargs, words):
    with pytest.raises(TypeError) as info:
        tk.Trainer(max_steps=2, **kwargs)
    message = str(info.value)
    assert message.startswith("Trainer() got unexpected keyword arguments")
    for word in words:
        assert word in message, message
    assert os.listdir(".") == []


@pytest.mark.parametrize(
    "kwargs, words",
    [(dict(train_dataloaders=[1]), ["train_dataloaders=", "train_loader="]),
     (dict(val_dataloaders=[1]), ["val_dataloaders=", "val_loader="]),
     (dict(datamodule=object()), ["datamodule=", "train_loader="])],
)  # fmt: skip
def test_lightning_fit_arguments_get_trainkit_names(kwargs, words):
    args = () if "train_dataloaders" in kwargs else (make_loader(),)
    with pytest.raises(TypeError) as info:
        tk.Trainer(max_steps=2).fit(TinyClassifier(), *args, **kwargs)
    message = str(info.value)
    assert message.startswith("fit() got unexpected keyword arguments")
    for word in words:
        assert word in message, message
    assert os.listdir(".") == []
