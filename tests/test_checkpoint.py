"""Checkpoints through fsspec on a local directory, file:// and memory://: the exact file layout, every key
round-tripping, atomic writes under failure, and refusing unsafe, truncated or foreign files.
(The same behaviour on a real S3 server is in test_s3.py.)"""

from __future__ import annotations

import io
import os
import pickle
import random

import fsspec
import numpy as np
import pytest
import torch
from helpers import TinyClassifier, make_loader, quiet
from test_early_stopping import Scripted

import trainkit as tk

# Evaluations every 2 steps with this script improve at steps 2, 4 and 8: the best ends at step 8.
SCRIPT = [1.0, 0.5, 0.7, 0.4, 0.45, 0.6]
REGULAR = ["step_000000003.ckpt", "step_000000006.ckpt", "step_000000009.ckpt", "step_000000012.ckpt"]




def scripted_run(checkpoint_dir, *, script=SCRIPT, max_steps=12, save_interval=3, module=None, **kwargs):
    module = module if module is not None else Scripted({"loss": script})
    trainer = tk.Trainer(
        run_mode="step",
        max_steps=max_steps,
        eval_interval=2,
        save_interval=save_interval,
        **quiet(checkpoint_dir=checkpoint_dir),
        **kwargs,
    )
    result = trainer.fit(module, make_loader(32), make_loader(8))
    return trainer, result


def names_in(url: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(url)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))


def assert_tree_equal(a, b, where="checkpoint"):
    """Nested dicts/lists of tensors and plain values are equal, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def file_bytes(url: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path)


# -- layout ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "file_url", "memory", "local_async"])
def test_exact_file_list_and_contents(kind, memfs, tmp_path):
    url = {
        "local": "ckpts",
        "file_url": f"file://{tmp_path}/ckpts",
        "memory": "memory://run",
        "local_async": "ckpts",
    }[kind]
    module = Scripted({"loss": SCRIPT})
    trainer, result = scripted_run(url, module=module, async_checkpoint=kind == "local_async")
    assert names_in(url) == ["best.ckpt", *REGULAR]  # every regular file kept, one best, no temp files
    if kind != "memory":
        assert sorted(os.listdir(tmp_path / "ckpts")) == ["best.ckpt", *REGULAR]
    # Name order is step order (zero-padded: step 12 sorts after step 9).
    steps = [tk.load_checkpoint(f"{url}/{n}")["trainer"]["global_step"] for n in REGULAR]
    assert steps == [3, 6, 9, 12]
    best = tk.load_checkpoint(result.best_checkpoint)
    assert result.best_checkpoint == trainer.best_checkpoint_path
    assert result.best_checkpoint.endswith("best.ckpt")
    assert best["trainer"]["global_step"] == result.best_step == 8
    # Every file loads with plain torch.load(weights_only=True), from its raw bytes.
    for name in ["best.ckpt", *REGULAR]:
        obj = torch.load(io.BytesIO(file_bytes(f"{url}/{name}")), weights_only=True)
        assert obj["trainkit_format"] == 1
    assert_tree_equal(tk.load_checkpoint(f"{url}/step_000000012.ckpt")["model"], module.state_dict())


def test_memory_location_is_a_url_that_loads(memfs):
    trainer, result = scripted_run("memory://run")
    assert result.best_checkpoint.startswith("memory://")
    assert memfs.exists("/run/best.ckpt")
    assert tk.load_checkpoint(result.best_checkpoint)["trainer"]["global_step"] == 8


def test_no_files_without_save_interval_or_improvement(memfs):
    # Only the first evaluation improves: best at step 2, no regular files.
    scripted_run("memory://run", script=[1.0, 1.0, 2.0], max_steps=6, save_interval=None)
    assert names_in("memory://run") == ["best.ckpt"]
    assert tk.load_checkpoint("memory://run/best.ckpt")["trainer"]["global_step"] == 2


def test_checkpoint_dir_none_writes_nothing(tmp_path):
    scripted_run(None)
    assert os.listdir(tmp_path) == []


def test_save_interval_works_in_epoch_mode():
    # 4 steps per epoch, save every 3 optimizer steps, whatever the run mode.
    trainer = tk.Trainer(max_epochs=2, save_interval=3, **quiet(checkpoint_dir="ckpts"))
    trainer.fit(TinyClassifier(), make_loader(32), make_loader(8))
    assert sorted(os.listdir("ckpts")) == ["best.ckpt", "step_000000003.ckpt", "step_000000006.ckpt"]
    ckpt = tk.load_checkpoint("ckpts/step_000000006.ckpt")
    assert (ckpt["trainer"]["global_step"], ckpt["trainer"]["epoch"], ckpt["trainer"]["batch_in_epoch"]) == (
        6,
        1,
        2,
    )


# -- contents ---------------------------------------------------------------------------------------------


class CountingCallback(tk.Callback):
    """A stateful callback with a custom state_key."""

    def __init__(self):
        self.count = 0
        self.loaded = None

    @property
    def state_key(self):
        return "counter"

    def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.count += 1

    def state_dict(self):
        return {"count": self.count, "trace": torch.arange(self.count)}

    def load_state_dict(self, state):
        self.loaded = state
        self.count = state["count"]


class DefaultKeyCallback(tk.Callback):
    def state_dict(self):
        return {"x": 1.5}

    def load_state_dict(self, state):
        self.loaded = state


class RngAtSave(tk.Callback):
    """Records the generators at save time and at fit start (after a resume has restored them)."""

    def __init__(self):
        self.at_save = None
        self.at_fit_start = None

    @staticmethod
    def capture():
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}

    def on_save_checkpoint(self, trainer, module, checkpoint):
        self.at_save = self.capture()

    def on_fit_start(self, trainer, module):
        self.at_fit_start = self.capture()


class TaskWithState(TinyClassifier):
    def __init__(self, **kwargs):
        super().__init__(
            scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5), **kwargs
        )
        self.loaded_task = None

    def on_save_checkpoint(self, checkpoint):
        checkpoint["task"]["note"] = {
            "text": "hello",
            "step": torch.tensor(self.global_step),
            "pair": (1, 2.5),
        }

    def on_load_checkpoint(self, checkpoint):
        self.loaded_task = checkpoint["task"]


def contents_run(max_steps, ckpt_path=None, checkpoint_dir=None, save_interval=6):
    callbacks = [CountingCallback(), DefaultKeyCallback(), RngAtSave()]
    module = TaskWithState()
    trainer = tk.Trainer(
        run_mode="step", max_steps=max_steps, eval_interval=2, save_interval=save_interval, use_ema=True,
        ema_decay=0.9, early_stop={"target": "val_loss", "patience": 50, "min_delta": 0.001},
        callbacks=callbacks, **quiet(checkpoint_dir=checkpoint_dir),
    )  # fmt: skip
    # 40 samples in batches of 8: 5 steps per pass, so step 6 is one batch into the second pass.
    train = make_loader(40, shuffle=True)
    trainer.fit(module, train, make_loader(16, seed=1), ckpt_path=ckpt_path)
    return trainer, module, callbacks


def test_every_key_is_present_and_matches_the_live_state():
    trainer, module, (counter, default_cb, rng) = contents_run(6, checkpoint_dir="ckpts")
    ckpt = tk.load_checkpoint("ckpts/step_000000006.ckpt")
    assert set(ckpt) == {
        "trainkit_format", "model", "ema", "optimizers", "schedulers", "grad_scaler", "trainer", "callbacks", "task",
    }  # fmt: skip
    assert ckpt["trainkit_format"] == 1
    assert_tree_equal(ckpt["model"], module.state_dict(), "model")
    assert_tree_equal(ckpt["ema"]["state_dict"], trainer.ema_module.state_dict(), "ema")
    assert ckpt["ema"]["num_updates"] == 6
    assert_tree_equal(ckpt["optimizers"], [trainer.optimizer.state_dict()], "optimizers")
    assert ckpt["optimizers"][0]["state"][0]["momentum_buffer"].shape == (16, 8)
    assert_tree_equal(ckpt["schedulers"], [trainer.schedulers[0].state_dict()], "schedulers")
    assert ckpt["schedulers"][0]["last_epoch"] == 6
    assert ckpt["grad_scaler"] is None  # precision 32 has no scaler

    state = ckpt["trainer"]
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (6, 1, 1)
    assert state["latest_metrics"] == trainer.history[-1]["metrics"]
    assert sorted(state["latest_metrics"]) == ["ema_val_acc", "ema_val_loss", "val_acc", "val_loss"]
    assert (state["best"]["metric"], state["best"]["step"], state["best"]["epoch"]) == (
        trainer.best_metric,
        trainer.best_step,
        trainer.best_epoch,
    )
    assert state["best"]["metric"] is not None
    losses = [r["metrics"]["val_loss"] for r in trainer.history]
    assert state["early_stop"]["tracker"]["best"] == trainer.best_metric
    assert state["early_stop"]["wait"] == len(losses) - 1 - losses.index(min(losses))

    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert torch.equal(state["rng"]["torch"], rng.at_save["torch"])
    np_state = rng.at_save["numpy"]
    assert torch.equal(state["rng"]["numpy"]["keys"], torch.from_numpy(np_state[1].astype(np.int64)))
    assert state["rng"]["numpy"]["pos"] == np_state[2]
    py = state["rng"]["python"]
    assert (py[0], tuple(py[1]), py[2]) == rng.at_save["python"]

    assert ckpt["callbacks"]["counter"]["count"] == 6
    assert torch.equal(ckpt["callbacks"]["counter"]["trace"], torch.arange(6))
    assert ckpt["callbacks"]["DefaultKeyCallback"] == {"x": 1.5}
    note = ckpt["task"]["note"]
    assert (note["text"], int(note["step"]), tuple(note["pair"])) == ("hello", 6, (1, 2.5))
    torch.load("ckpts/step_000000006.ckpt", weights_only=True)


def test_every_key_round_trips_through_resume():
    trainer, module, (counter, _, rng) = contents_run(6, checkpoint_dir="ckpts")
    saved = tk.load_checkpoint("ckpts/step_000000006.ckpt")
    # Resume with nothing left to do: the restored state is visible as it was loaded.
    resumed, module2, (counter2, default2, rng2) = contents_run(6, ckpt_path="ckpts/step_000000006.ckpt")
    assert (resumed.global_step, resumed.current_epoch) == (6, 1)
    assert_tree_equal(module2.state_dict(), saved["model"], "model")
    assert_tree_equal(resumed.ema_module.state_dict(), saved["ema"]["state_dict"], "ema")
    assert_tree_equal(resumed.optimizer.state_dict(), saved["optimizers"][0], "optimizer")
    assert_tree_equal(resumed.schedulers[0].state_dict(), saved["schedulers"][0], "scheduler")
    assert resumed.optimizer.param_groups[0]["lr"] == trainer.optimizer.param_groups[0]["lr"] == 0.05
    assert (resumed.best_metric, resumed.best_step, resumed.best_epoch) == (
        trainer.best_metric,
        trainer.best_step,
        trainer.best_epoch,
    )
    assert [dict(r) for r in resumed.history] == [dict(r) for r in trainer.history]
    assert counter2.loaded["count"] == 6 and counter2.count == 6
    assert default2.loaded == {"x": 1.5}
    assert module2.loaded_task["note"]["text"] == "hello"
    # The generators are back where they were when the file was written.
    assert rng2.at_fit_start["python"] == rng.at_save["python"]
    assert torch.equal(rng2.at_fit_start["torch"], rng.at_save["torch"])
    assert np.array_equal(rng2.at_fit_start["numpy"][1], rng.at_save["numpy"][1])


def test_position_inside_the_epoch_and_early_stop_state_round_trip():
    seen: list[tuple[int, int]] = []

    class Where(tk.Callback):
        def on_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((trainer.current_epoch, batch_idx))

    straight, module_straight, _ = contents_run(9)
    contents_run(6, checkpoint_dir="ckpts")
    callbacks = [CountingCallback(), Where()]
    module = TaskWithState()
    trainer = tk.Trainer(
        run_mode="step", max_steps=9, eval_interval=2, use_ema=True, ema_decay=0.9,
        early_stop={"target": "val_loss", "patience": 50, "min_delta": 0.001}, callbacks=callbacks, **quiet(),
    )  # fmt: skip
    trainer.fit(
        module, make_loader(40, shuffle=True), make_loader(16, seed=1), ckpt_path="ckpts/step_000000006.ckpt"
    )
    assert seen == [(1, 1), (1, 2), (1, 3)]  # picks up one batch into the second pass
    assert_tree_equal(module.state_dict(), module_straight.state_dict(), "model")
    assert_tree_equal(trainer.ema_module.state_dict(), straight.ema_module.state_dict(), "ema")
    assert [dict(r) for r in trainer.history] == [dict(r) for r in straight.history]
    assert (trainer.best_metric, trainer.best_step) == (straight.best_metric, straight.best_step)


def test_early_stop_counter_round_trips(memfs):
    # Straight: stops at the 5th evaluation (step 10). Resumed from step 6 (3 evaluations in): the same.
    script = [1.0, 0.95, 0.85, 0.86, 0.80, 0.1]
    early = {"target": "val_loss", "patience": 2, "min_delta": 0.1}
    _, straight = scripted_run(None, script=script, max_steps=20, save_interval=None, early_stop=early)
    assert (straight.global_step, straight.stop_reason) == (10, "early_stop")
    scripted_run("memory://run", script=script, max_steps=6, save_interval=6, early_stop=early)
    saved = tk.load_checkpoint("memory://run/step_000000006.ckpt")["trainer"]["early_stop"]
    assert (saved["wait"], saved["tracker"]["best"], saved["stopped"]) == (0, 0.85, False)
    module = Scripted({"loss": script})
    trainer = tk.Trainer(run_mode="step", max_steps=20, eval_interval=2, early_stop=early, **quiet())
    result = trainer.fit(
        module, make_loader(32), make_loader(8), ckpt_path="memory://run/step_000000006.ckpt"
    )
    assert (result.global_step, result.stop_reason, result.best_metric, result.best_step) == (
        10,
        "early_stop",
        0.85,
        6,
    )


def test_grad_scaler_state_round_trips():
    def run(max_steps, ckpt_path=None, directory="a"):
        trainer = tk.Trainer(
            run_mode="step", max_steps=max_steps, eval_interval=100, save_interval=2, precision="16-mixed",
            **quiet(checkpoint_dir=directory),
        )  # fmt: skip
        trainer.fit(TinyClassifier(), make_loader(32), make_loader(8), ckpt_path=ckpt_path)

    run(4, directory="a")
    at2 = tk.load_checkpoint("a/step_000000002.ckpt")["grad_scaler"]
    at4 = tk.load_checkpoint("a/step_000000004.ckpt")["grad_scaler"]
    assert at2["scale"] == 65536.0 and at2["_growth_tracker"] == 2 and at4["_growth_tracker"] == 4
    run(4, ckpt_path="a/step_000000002.ckpt", directory="b")
    # Had the scaler restarted, its growth tracker would read 2 again.
    assert tk.load_checkpoint("b/step_000000004.ckpt")["grad_scaler"] == at4


def test_last_resumes_from_the_newest_file():
    scripted_run("ckpts", max_steps=12)  # regular files up to step 12, best at step 8
    module = Scripted({"loss": SCRIPT + [0.1, 0.1]})
    trainer = tk.Trainer(run_mode="step", max_steps=14, eval_interval=2, **quiet(checkpoint_dir="ckpts"))
    result = trainer.fit(module, make_loader(32), make_loader(8), ckpt_path="last")
    assert [r["step"] for r in trainer.history] == [2, 4, 6, 8, 10, 12, 14]
    assert (result.best_metric, result.best_step) == (0.1, 14)


# -- atomic writes --------------------------------------------------------------------------------------------


class FailsWhenPickled:
    """Raises from inside torch.save, after part of the file has been written; first it records what the
    checkpoint directory looks like at that moment."""

    def __init__(self, url: str):
        self.url = url
        self.seen: dict[str, object] = {}

    def __reduce__(self):
        self.seen["names"] = names_in(self.url)
        self.seen["best_step"] = tk.load_checkpoint(f"{self.url}/best.ckpt")["trainer"]["global_step"]
        raise RuntimeError("boom while serialising")


class NotWeightsOnlySafe:
    """Pickles fine, but torch.load(weights_only=True) would refuse it."""


class Saboteur(Scripted):
    def __init__(self, script, payload, from_step):
        super().__init__(script)
        self.payload = payload
        self.from_step = from_step

    def on_save_checkpoint(self, checkpoint):
        if self.global_step >= self.from_step:
            # A big tensor first, so that the failure comes after real bytes were written.
            checkpoint["task"]["big"] = torch.zeros(1 << 18)
            checkpoint["task"]["bad"] = self.payload


@pytest.mark.parametrize("kind", ["local", "memory", "local_async"])
def test_failure_while_serialising_the_best_leaves_the_previous_best(kind, memfs):
    url = "memory://run" if kind == "memory" else "ckpts"
    payload = FailsWhenPickled(url)
    module = Saboteur({"loss": [1.0, 0.5, 0.2]}, payload, from_step=4)  # improves at step 4: a new best
    trainer = tk.Trainer(
        run_mode="step", max_steps=6, eval_interval=2, async_checkpoint=kind == "local_async",
        **quiet(checkpoint_dir=url),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="boom while serialising"):
        trainer.fit(module, make_loader(32), make_loader(8))
    # Mid-write, the final name still held the complete previous best.
    assert payload.seen["best_step"] == 2 and "best.ckpt" in payload.seen["names"]
    # Afterwards: nothing new under the final name, no temporary file, the old best intact.
    assert names_in(url) == ["best.ckpt"]
    if kind != "memory":
        assert os.listdir("ckpts") == ["best.ckpt"]
    best = tk.load_checkpoint(f"{url}/best.ckpt")
    assert best["trainer"]["global_step"] == 2 and "bad" not in best["task"]


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_failure_while_serialising_a_regular_file_writes_nothing(kind, memfs):
    url = "memory://run" if kind == "memory" else "ckpts"
    module = Saboteur({"loss": [1.0, 1.0, 1.0]}, FailsWhenPickled(url), from_step=3)
    trainer = tk.Trainer(
        run_mode="step", max_steps=6, eval_interval=2, save_interval=3, **quiet(checkpoint_dir=url)
    )
    with pytest.raises(RuntimeError, match="boom while serialising"):
        trainer.fit(module, make_loader(32), make_loader(8))
    assert trainer.global_step == 3
    assert names_in(url) == ["best.ckpt"]


@pytest.mark.parametrize("payload", [NotWeightsOnlySafe(), np.arange(3)], ids=["object", "ndarray"])
@pytest.mark.parametrize("kind", ["local", "memory"])
def test_unsafe_contents_are_refused_before_reaching_the_final_name(kind, payload, memfs):
    url = "memory://run" if kind == "memory" else "ckpts"
    module = Saboteur({"loss": [1.0, 0.5, 0.2]}, payload, from_step=4)
    trainer = tk.Trainer(run_mode="step", max_steps=6, eval_interval=2, **quiet(checkpoint_dir=url))
    with pytest.raises(TypeError, match="weights_only") as info:
        trainer.fit(module, make_loader(32), make_loader(8))
    assert type(payload).__name__ in str(info.value) and "bad" in str(info.value)
    assert names_in(url) == ["best.ckpt"]
    assert tk.load_checkpoint(f"{url}/best.ckpt")["trainer"]["global_step"] == 2


# -- loading: refuse what is unsafe or not ours ---------------------------------------------------------------


class CreatesSentinel:
    """Unpickling this calls open(path, "w"): a file appears if any code from the checkpoint runs."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def craft(path: str, sentinel: str, how: str) -> None:
    payload = {
        "trainkit_format": 1,
        "model": CreatesSentinel(sentinel),
        "optimizers": [],
        "schedulers": [],
        "trainer": {},
    }
    if how == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_a_crafted_file_is_refused_and_runs_no_code(how, tmp_path):
    craft("evil.ckpt", str(tmp_path / "sentinel"), how)
    with pytest.raises(tk.CheckpointError) as info:
        tk.load_checkpoint("evil.ckpt")
    assert "evil.ckpt" in str(info.value) and "refused" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(tk.CheckpointError, match="evil.ckpt"):
        tk.load_weights(TinyClassifier(), "evil.ckpt")
    with pytest.raises(tk.CheckpointError, match="evil.ckpt"):
        tk.Trainer(max_steps=2, **quiet()).fit(TinyClassifier(), make_loader(16), ckpt_path="evil.ckpt")
    assert not (tmp_path / "sentinel").exists()
    # The payload is real: loading it the unsafe way does create the sentinel.
    craft("evil2.ckpt", str(tmp_path / "proof"), how)
    if how == "torch":
        torch.load("evil2.ckpt", weights_only=False)
    else:
        with open("evil2.ckpt", "rb") as f:
            pickle.load(f)
    assert (tmp_path / "proof").exists()


def test_a_crafted_file_on_memory_is_refused(memfs, tmp_path):
    craft("evil.ckpt", str(tmp_path / "sentinel"), "torch")
    memfs.pipe("/run/evil.ckpt", open("evil.ckpt", "rb").read())
    with pytest.raises(tk.CheckpointError, match="memory://run/evil.ckpt"):
        tk.load_checkpoint("memory://run/evil.ckpt")
    assert not (tmp_path / "sentinel").exists()


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_a_truncated_checkpoint_gives_a_clear_error(keep):
    scripted_run("ckpts", max_steps=3)
    data = open("ckpts/step_000000003.ckpt", "rb").read()
    with open("cut.ckpt", "wb") as f:
        f.write(data[: int(len(data) * keep)])
    with pytest.raises(tk.CheckpointError) as info:
        tk.load_checkpoint("cut.ckpt")
    assert "cut.ckpt" in str(info.value)
    assert "truncated" in str(info.value) or "corrupt" in str(info.value)
    with pytest.raises(tk.CheckpointError, match="cut.ckpt"):
        tk.Trainer(max_steps=4, **quiet()).fit(
            Scripted({"loss": [1.0]}), make_loader(32), ckpt_path="cut.ckpt"
        )


def test_garbage_bytes_give_a_clear_error():
    with open("noise.ckpt", "wb") as f:
        f.write(bytes(range(256)) * 8)
    with pytest.raises(tk.CheckpointError, match="noise.ckpt"):
        tk.load_checkpoint("noise.ckpt")


@pytest.mark.parametrize(
    "obj, word",
    [
        ({"weights": torch.ones(2)}, "not a trainkit checkpoint"),
        (torch.ones(2), "not a trainkit checkpoint"),
        ({"trainkit_format": 1, "model": {}}, "lacks"),
        ({"trainkit_format": 99, "model": {}, "optimizers": [], "schedulers": [], "trainer": {}}, "newer"),
    ],
    ids=["dict", "tensor", "missing-keys", "future-format"],
)
def test_a_foreign_torch_file_gives_a_clear_error(obj, word):
    torch.save(obj, "foreign.pt")
    with pytest.raises(tk.CheckpointError) as info:
        tk.load_checkpoint("foreign.pt")
    assert "foreign.pt" in str(info.value) and word in str(info.value)
    with pytest.raises(tk.CheckpointError, match="foreign.pt"):
        tk.Trainer(max_steps=2, **quiet()).fit(TinyClassifier(), make_loader(16), ckpt_path="foreign.pt")


def test_a_missing_file_names_it(memfs):
    with pytest.raises(FileNotFoundError, match="nothing_here.ckpt"):
        tk.load_checkpoint("nothing_here.ckpt")
    with pytest.raises(FileNotFoundError, match="memory://run/nope.ckpt"):
        tk.load_checkpoint("memory://run/nope.ckpt")


def test_missing_filesystem_package_names_the_extra():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed; the missing-package path cannot be reached with gs://")
    with pytest.raises(ImportError, match=r"trainkit\[gcs\]"):
        tk.load_checkpoint("gs://bucket/run/best.ckpt")
    with pytest.raises(ImportError, match=r"trainkit\[gcs\]"):
        tk.Trainer(max_steps=1, checkpoint_dir="gs://bucket/run", log_dir=None)


# -- loading weights for inference ----------------------------------------------------------------------------


def test_load_weights_raw_and_ema_into_a_fresh_module():
    trainer = tk.Trainer(
        run_mode="step", max_steps=4, eval_interval=2, save_interval=4, use_ema=True, ema_decay=0.9,
        **quiet(checkpoint_dir="ckpts"),
    )  # fmt: skip
    module = TinyClassifier(lr=0.5)
    trainer.fit(module, make_loader(32), make_loader(8))
    raw = tk.load_weights(TinyClassifier(seed=9), "ckpts/step_000000004.ckpt")
    ema = tk.load_weights(TinyClassifier(seed=9), "ckpts/step_000000004.ckpt", ema=True)
    assert_tree_equal(raw.state_dict(), module.state_dict(), "raw")
    assert_tree_equal(ema.state_dict(), trainer.ema_module.state_dict(), "ema")
    assert not torch.equal(raw.net[0].weight, ema.net[0].weight)


def test_load_weights_ema_without_ema_is_an_error():
    scripted_run("ckpts", max_steps=3)
    with pytest.raises(tk.CheckpointError, match="EMA"):
        tk.load_weights(Scripted({}), "ckpts/step_000000003.ckpt", ema=True)
    assert isinstance(tk.load_weights(Scripted({}), "ckpts/step_000000003.ckpt"), Scripted)
