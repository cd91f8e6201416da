"""Several evaluation sets: ``val_loader``/``test_loader`` as a mapping of set names to loaders.

Every expected number comes from a run that evaluates one set alone (a fit given that loader only, or
``trainer.validate`` on it), or from a scripted metric sequence; the DDP case compares two gloo ranks with one
process (tests/eval_sets_worker.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, make_data, make_loader, quiet
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk

STEPS = dict(run_mode="step", max_steps=12, eval_interval=4)
# A mapping has no plain val_loss, so the default monitor warns (once per fit); that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:no 'val_loss' metric")


def id_loader() -> DataLoader:
    return make_loader(n=40, batch_size=8, seed=1)


def ood_loader() -> DataLoader:
    return make_loader(n=23, batch_size=5, seed=2)  # a short last batch: the batch-size weights matter


def hard_loader() -> DataLoader:
    return make_loader(n=18, batch_size=4, seed=3)


def renamed(metrics: dict[str, float], old: str, new: str) -> dict[str, float]:
    """``{old + rest: v}`` -> ``{new + rest: v}`` for the names that start with ``old``."""
    return {new + k[len(old) :]: v for k, v in metrics.items() if k.startswith(old)}


def per_set(metrics: dict[str, float], stage: str, name: str) -> dict[str, float]:
    """One set's metrics (base and EMA), under the names a fit given that set alone would use."""
    out = renamed(metrics, f"{stage}_{name}_", f"{stage}_")
    out.update(renamed(metrics, f"ema_{stage}_{name}_", f"ema_{stage}_"))
    return out


def fit(val, test=None, **kwargs) -> tuple[tk.Trainer, TinyClassifier]:
    module = TinyClassifier()
    trainer = tk.Trainer(**quiet(**{**STEPS, "use_ema": True, "ema_decay": 0.9, **kwargs}))
    trainer.fit(module, make_loader(), val, test_loader=test)
    return trainer, module


# -- each set is evaluated on its own ------------------------------------------------------------------------


def test_each_named_set_gives_exactly_what_it_gives_alone():
    trainer, module = fit({"id": id_loader(), "ood": ood_loader()}, {"hard": hard_loader()})
    assert [r["step"] for r in trainer.history] == [4, 8, 12]
    names = [
        f"{p}{s}_{m}"
        for p in ("", "ema_")
        for s in ("val_id", "val_ood", "test_hard")
        for m in ("acc", "loss")
    ]
    for record in trainer.history:
        assert sorted(record["metrics"]) == sorted(names)  # a mapping reports only the named sets

    # The same training with each set alone: evaluation never changes training, so every number matches.
    alone = {
        ("val", "id"): fit(id_loader())[0].history,
        ("val", "ood"): fit(ood_loader())[0].history,
        ("test", "hard"): fit(None, hard_loader())[0].history,
    }
    for (stage, name), history in alone.items():
        for got, ref in zip(trainer.history, history, strict=True):
            assert got["step"] == ref["step"]
            assert per_set(got["metrics"], stage, name) == ref["metrics"], (stage, name, got["step"])

    # ... and what trainer.validate/test give for each set alone with the final weights (base and EMA).
    last = trainer.history[-1]["metrics"]
    for stage, name, loader in (
        ("val", "id", id_loader()),
        ("val", "ood", ood_loader()),
        ("test", "hard", hard_loader()),
    ):
        alone_now = (trainer.validate if stage == "val" else trainer.test)(module, loader)
        assert per_set(last, stage, name) == alone_now
    # The sets really differ (different data), so a mix-up would show.
    assert last["val_id_loss"] != last["val_ood_loss"]


def test_a_set_weighs_its_batches_by_size_over_that_set_alone():
    module = TinyClassifier()
    got = tk.Trainer(max_steps=1, **quiet()).validate(module, {"id": id_loader(), "ood": ood_loader()})
    for name, n, seed in (("id", 40, 1), ("ood", 23, 2)):
        x, y = make_data(n, seed=seed).tensors
        with torch.no_grad():
            logits = module(x)
        assert got[f"val_{name}_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
        assert got[f"val_{name}_acc"] == pytest.approx(
            (logits.argmax(1) == y).double().mean().item(), rel=1e-6
        )


class ErrTask(TinyClassifier):
    def test_step(self, batch, batch_idx):
        x, y = batch
        return {"err": (self(x).argmax(1) != y).float().mean()}


def test_validate_and_test_accept_a_mapping():
    module = ErrTask()
    trainer = tk.Trainer(max_steps=1, **quiet())
    both = trainer.validate(module, {"id": id_loader(), "ood": ood_loader()})
    expected = {
        **renamed(trainer.validate(module, id_loader()), "val_", "val_id_"),
        **renamed(trainer.validate(module, ood_loader()), "val_", "val_ood_"),
    }
    assert both == expected and list(both) == list(expected)  # mapping order, then metric names
    tested = trainer.test(module, {"hard": hard_loader()})
    assert tested == renamed(trainer.test(module, hard_loader()), "test_", "test_hard_")
    assert list(tested) == ["test_hard_err"]


# -- early stopping and the best checkpoint may watch any set ---------------------------------------------


class Scripted(TinyClassifier):
    """Validation loss by set and step: ``id`` improves at every evaluation; ``ood`` is 1.0, 0.9, 0.95,
    0.97, 0.5 at steps 2, 4, 6, 8, 10 (patience 2 in min mode: stop at step 8). The set is told by the third
    tensor of its batches (0: id, 1: ood)."""

    OOD = {2: 1.0, 4: 0.9, 6: 0.95, 8: 0.97, 10: 0.5}

    def validation_step(self, batch, batch_idx):
        _, _, flag = batch
        step = self.global_step
        loss = self.OOD[step] if int(flag[0]) == 1 else 1.0 / step
        return {"loss": torch.tensor(loss)}


def flagged(flag: int, n: int = 12) -> DataLoader:
    x, y = make_data(n, seed=flag).tensors
    return DataLoader(TensorDataset(x, y, torch.full((n,), flag)), batch_size=4)


def test_early_stop_on_one_set_follows_that_sets_values(tmp_path):
    trainer = tk.Trainer(
        **quiet(
            run_mode="step", max_steps=20, eval_interval=2,
            early_stop={"target": "val_ood_loss", "patience": 2}, checkpoint_dir=str(tmp_path / "ckpt"),
        )
    )  # fmt: skip
    result = trainer.fit(Scripted(), make_loader(), {"id": flagged(0), "ood": flagged(1)})
    assert (result.global_step, result.stop_reason) == (8, "early_stop")
    assert [r["metrics"]["val_ood_loss"] for r in trainer.history] == [
        pytest.approx(v) for v in (1.0, 0.9, 0.95, 0.97)
    ]
    assert [r["metrics"]["val_id_loss"] for r in trainer.history] == [
        pytest.approx(1 / s) for s in (2, 4, 6, 8)
    ]
    # The best checkpoint follows the early-stop target (no monitor given): the ood set's minimum.
    assert (result.best_step, result.best_metric) == (4, pytest.approx(0.9))
    assert tk.load_checkpoint(result.best_checkpoint)["trainer"]["global_step"] == 4


def test_monitor_may_watch_another_set_than_early_stop(tmp_path):
    trainer = tk.Trainer(
        **quiet(
            run_mode="step", max_steps=20, eval_interval=2, early_stop={"target": "val_ood_loss", "patience": 2},
            monitor={"target": "val_id_loss"}, checkpoint_dir=str(tmp_path / "ckpt"),
        )
    )  # fmt: skip
    result = trainer.fit(Scripted(), make_loader(), {"id": flagged(0), "ood": flagged(1)})
    assert (result.global_step, result.best_step) == (8, 8)  # id improved at every evaluation
    assert result.best_metric == pytest.approx(1 / 8)


def test_a_target_that_names_no_set_lists_the_metrics_that_exist():
    trainer = tk.Trainer(
        **quiet(run_mode="step", max_steps=4, eval_interval=2, early_stop={"target": "val_loss"})
    )
    with pytest.raises(ValueError, match=r"'val_loss'.*val_id_loss.*val_ood_loss"):
        trainer.fit(Scripted(), make_loader(), {"id": flagged(0), "ood": flagged(1)})


# -- logs, metrics.jsonl, TensorBoard and the progress line carry every set --------------------------------

LINE = re.compile(r"^\[trainkit\] step (\d+)/12 epoch=\d+ loss=\S+ lr=\S+(.*) [\d.]+ steps/s$")


def test_history_jsonl_tensorboard_and_progress_line_carry_every_set(capfd):
    trainer, _ = fit(
        {"id": id_loader(), "ood": ood_loader()}, {"hard": hard_loader()}, log_dir="runs", progress_bar=True,
        log_every_n_steps=4,
    )  # fmt: skip
    names = list(trainer.history[0]["metrics"])
    lines = [json.loads(line) for line in Path("runs/metrics.jsonl").read_text().splitlines()]
    assert lines == [dict(r) for r in trainer.history]

    acc = EventAccumulator("runs", size_guidance={"scalars": 0})
    acc.Reload()
    assert set(names) <= set(acc.Tags()["scalars"])
    for name in names:
        expected = [(r["step"], float(np.float32(r["metrics"][name]))) for r in trainer.history]
        assert [(e.step, e.value) for e in acc.Scalars(name)] == expected, name

    shown = [
        dict(kv.split("=") for kv in LINE.match(line)[2].split())
        for line in capfd.readouterr().err.splitlines()
    ]
    assert len(shown) == 3
    for record, fields in zip(trainer.history, shown):
        assert fields == {
            k: f"{v:.4g}" for k, v in record["metrics"].items() if k.startswith(("val_", "ema_val_"))
        }
        assert {"val_id_loss", "val_ood_loss", "ema_val_id_loss", "ema_val_ood_loss"} <= set(fields)


# -- bad mappings fail before anything runs or is written --------------------------------------------------


class Counting(TinyClassifier):
    calls = 0

    def training_step(self, batch, batch_idx):
        Counting.calls += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    "where, value, error, words",
    [
        ("val_loader", {}, ValueError, ["val_loader={}", "non-empty mapping"]),
        ("test_loader", {}, ValueError, ["test_loader={}", "non-empty mapping"]),
        ("val_loader", {"in-domain": 0}, ValueError, ["val_loader", "'in-domain'", "identifiers"]),
        ("val_loader", {"1st": 0}, ValueError, ["val_loader", "'1st'", "identifiers"]),
        ("val_loader", {"": 0}, ValueError, ["val_loader", "''", "identifiers"]),
        ("test_loader", {3: 0}, ValueError, ["test_loader", "3", "identifiers"]),
        ("val_loader", {"ok": 0, "ood": 5}, TypeError, ["val_loader['ood']=5", "iterable of batches"]),
    ],
)
def test_a_bad_mapping_is_an_error_naming_the_parameter_before_any_step_or_file(where, value, error, words):
    value = {k: (id_loader() if v == 0 else v) for k, v in value.items()}
    Counting.calls = 0
    trainer = tk.Trainer(**STEPS, checkpoint_dir="ckpt", log_dir="runs", progress_bar=False)
    loaders = {"val_loader": id_loader(), "test_loader": None, where: value}
    with pytest.raises(error) as info:
        trainer.fit(Counting(), make_loader(), loaders["val_loader"], test_loader=loaders["test_loader"])
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert Counting.calls == 0
    assert os.listdir(".") == []


def test_validate_names_its_loader_parameter_for_a_bad_mapping():
    trainer = tk.Trainer(max_steps=1, **quiet())
    with pytest.raises(ValueError, match=r"loader=\{\} is not valid.*non-empty mapping"):
        trainer.validate(TinyClassifier(), {})
    with pytest.raises(ValueError, match=r"loader has set name 'a b'.*identifiers"):
        trainer.test(TinyClassifier(), {"a b": id_loader()})


class Clashing(TinyClassifier):
    """Set ``a`` (flag 0) reports ``b_loss``, set ``a_b`` (flag 1) reports ``loss``: both ``val_a_b_loss``."""

    def validation_step(self, batch, batch_idx):
        x, y, flag = batch
        loss = F.cross_entropy(self(x), y)
        return {"b_loss": loss} if int(flag[0]) == 0 else {"loss": loss}


def test_two_sets_that_would_report_the_same_metric_name_are_an_error():
    trainer = tk.Trainer(max_steps=1, **quiet())
    with pytest.raises(ValueError, match=r"\['val_a_b_loss'\].*rename a set"):
        trainer.validate(Clashing(), {"a": flagged(0), "a_b": flagged(1)})


# -- DDP: two gloo ranks give one process's numbers --------------------------------------------------------

WORKER = str(Path(__file__).with_name("eval_sets_worker.py"))


@pytest.mark.timeout(300)
def test_two_ddp_ranks_give_the_numbers_of_one_process(tmp_path):
    from eval_sets_worker import run as run_worker_config

    ref_trainer, ref = run_worker_config(rank=0, world_size=1, out=None)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", WORKER, str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    assert ranks[0]["history"] == ranks[1]["history"]  # every rank reduced the same numbers
    assert ranks[0]["validate"] == ranks[1]["validate"]
    for got, want in zip(ranks[0]["history"], ref["history"], strict=True):
        assert got["step"] == want["step"]
        assert list(got["metrics"]) == list(want["metrics"])
        assert got["metrics"] == pytest.approx(want["metrics"], rel=1e-5, abs=1e-6)
    assert ranks[0]["validate"] == pytest.approx(ref["validate"], rel=1e-5, abs=1e-6)
    assert list(ranks[0]["validate"]) == [f"val_{s}_{m}" for s in ("id", "ood") for m in ("acc", "loss")] + [
        f"ema_val_{s}_{m}" for s in ("id", "ood") for m in ("acc", "loss")
    ]
    # The writer exists on rank 0 only, and rank 1 wrote no log directory.
    assert (ranks[0]["has_writer"], ranks[1]["has_writer"]) == (True, False)
    assert sorted(os.listdir(tmp_path)) == ["rank0.pt", "rank1.pt", "runs0"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
