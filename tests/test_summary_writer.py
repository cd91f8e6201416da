"""``trainer.summary_writer``: the one TensorBoard writer, open to users, created only when first needed.

Everything is read back from the real event files with TensorBoard's own ``EventAccumulator`` and
``EventFileLoader``; images are decoded from their PNG bytes.
"""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pytest
import torch
from helpers import TinyClassifier, make_loader, quiet
from PIL import Image  # tensorboard depends on Pillow; torch's add_image needs it too
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

import trainkit as tk

ALL = {"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}


def accumulate(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance=ALL)
    acc.Reload()
    return acc


def event_files(log_dir: str = "runs") -> list[str]:
    return sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))


def picture(step: int) -> torch.Tensor:
    """A 3 x 4 x 5 (C, H, W) float image in [0, 1] that differs at every step."""
    return (torch.arange(60, dtype=torch.float32).reshape(3, 4, 5) + step) % 60 / 59.0


class ImagesAndHistograms(tk.Callback):
    """At every evaluation: an image and a histogram of the first layer's weights, through the trainer's
    writer; remembers the writer and the weights it saw."""

    def __init__(self) -> None:
        self.writers: list = []
        self.weights: dict[int, torch.Tensor] = {}

    def on_eval_end(self, trainer, module, metrics):
        writer = trainer.summary_writer
        self.writers.append(writer)
        step = trainer.global_step
        self.weights[step] = module.net[0].weight.detach().clone()
        writer.add_image("predictions", picture(step), step)
        writer.add_histogram("weights/net.0", self.weights[step], step)


def test_a_callbacks_images_and_histograms_land_in_the_run_of_val_loss():
    cb = ImagesAndHistograms()
    trainer = tk.Trainer(
        **quiet(
            run_mode="step",
            max_steps=12,
            eval_interval=4,
            log_every_n_steps=3,
            log_dir="runs",
            callbacks=[cb],
        )
    )
    assert trainer.summary_writer is None  # nothing before fit: the rank is known only then
    trainer.fit(TinyClassifier(), make_loader(), make_loader())

    # One writer, the trainer's, during and after fit; one event file, holding everything.
    assert len(cb.writers) == 3 and all(w is cb.writers[0] for w in cb.writers)
    assert cb.writers[0] is trainer.summary_writer
    assert len(event_files()) == 1
    acc = accumulate("runs")
    assert [e.step for e in acc.Scalars("val_loss")] == [4, 8, 12]

    images = acc.Images("predictions")
    assert [e.step for e in images] == [4, 8, 12]
    for event in images:
        assert (event.width, event.height) == (5, 4)
        pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))  # H x W x C, uint8
        expected = (picture(event.step).permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
        assert np.array_equal(pixels, expected)

    histograms = acc.Histograms("weights/net.0")
    assert [e.step for e in histograms] == [4, 8, 12]
    for event in histograms:
        weights = cb.weights[event.step].double()
        value = event.histogram_value
        assert value.num == 16 * 8
        assert (value.min, value.max) == (weights.min().item(), weights.max().item())
        assert value.sum == pytest.approx(weights.sum().item(), rel=1e-9, abs=1e-12)
    # The weights moved between evaluations, so the histograms are three different ones.
    assert len({e.histogram_value.sum for e in histograms}) == 3


def test_after_fit_the_same_writer_reopens_in_the_same_run_directory():
    trainer = tk.Trainer(**quiet(run_mode="step", max_steps=8, eval_interval=4, log_dir="runs"))
    trainer.fit(TinyClassifier(), make_loader(), make_loader())
    writer = trainer.summary_writer
    assert writer is not None and len(event_files()) == 1
    # fit closed the event file; torch's SummaryWriter opens a new one in the same directory on next use.
    writer.add_scalar("test_score", 0.75, 8)
    writer.add_text("notes", "written after fit", 8)
    writer.flush()
    assert trainer.summary_writer is writer
    assert len(event_files()) == 2
    acc = accumulate("runs")
    assert [(e.step, e.value) for e in acc.Scalars("test_score")] == [(8, 0.75)]
    assert [e.step for e in acc.Scalars("val_loss")] == [4, 8]
    writer.close()


def test_summary_writer_is_none_without_log_dir():
    seen = []

    class Look(tk.Callback):
        def on_fit_start(self, trainer, module):
            seen.append(trainer.summary_writer)

    trainer = tk.Trainer(**quiet(run_mode="step", max_steps=2, callbacks=[Look()]))
    trainer.fit(TinyClassifier(), make_loader())
    assert seen == [None] and trainer.summary_writer is None
    assert os.listdir(".") == []


class FailsAtFirstStep(TinyClassifier):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("broken training_step")


class FailsInConfigure(TinyClassifier):
    def configure_optimizers(self):
        raise RuntimeError("broken configure_optimizers")


@pytest.mark.parametrize("task", [FailsAtFirstStep, FailsInConfigure], ids=["training_step", "configure"])
def test_a_fit_that_fails_before_its_first_step_leaves_no_event_file(task):
    trainer = tk.Trainer(**quiet(run_mode="step", max_steps=4, log_dir="runs"))
    with pytest.raises(RuntimeError, match="broken"):
        trainer.fit(task(), make_loader(), make_loader())
    assert not os.path.exists("runs")


def test_the_writer_exists_from_the_first_log_step_not_from_fit_start():
    created: list[tuple[int, bool]] = []

    class Watch(tk.Callback):
        def on_batch_end(self, trainer, module, outputs, batch, batch_idx):
            created.append((trainer.global_step, os.path.exists("runs")))

    trainer = tk.Trainer(
        **quiet(
            run_mode="step",
            max_steps=4,
            eval_interval=100,
            log_every_n_steps=3,
            log_dir="runs",
            callbacks=[Watch()],
        )
    )
    trainer.fit(TinyClassifier(), make_loader())
    # on_batch_end runs before the step's logging: the directory appears with the log of step 3.
    assert created == [(1, False), (2, False), (3, False), (4, True)]


def _hparams_events(path: str) -> dict[str, list]:
    by_tag: dict[str, list] = {}
    for event in EventFileLoader(path).Load():
        for value in event.summary.value:
            if value.tag.startswith("_hparams_/"):
                by_tag.setdefault(value.tag, []).append(value)
    return by_tag


def test_a_run_that_never_evaluates_still_records_its_settings():
    trainer = tk.Trainer(**quiet(run_mode="step", max_steps=4, log_every_n_steps=100, log_dir="runs"))
    trainer.fit(TinyClassifier(), make_loader())  # no log step, no evaluation: nothing written during fit
    [path] = event_files()
    by_tag = _hparams_events(path)
    assert sorted(by_tag) == [
        "_hparams_/experiment",
        "_hparams_/session_end_info",
        "_hparams_/session_start_info",
    ]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        by_tag["_hparams_/experiment"][0].metadata.plugin_data.content
    ).experiment
    assert list(experiment.metric_infos) == []
    assert "max_steps" in {h.name for h in experiment.hparam_infos}


def test_hparams_list_the_evaluation_metrics_as_the_experiments_metric_columns():
    trainer = tk.Trainer(
        **quiet(
            run_mode="step", max_steps=8, eval_interval=4, log_every_n_steps=3, use_ema=True, log_dir="runs"
        )
    )
    trainer.fit(TinyClassifier(), make_loader(), make_loader(), test_loader=make_loader(n=16, seed=1))
    [path] = event_files()
    by_tag = _hparams_events(path)
    assert {tag: len(values) for tag, values in by_tag.items()} == {
        "_hparams_/experiment": 1,
        "_hparams_/session_start_info": 1,
        "_hparams_/session_end_info": 1,
    }
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        by_tag["_hparams_/experiment"][0].metadata.plugin_data.content
    ).experiment
    columns = [(m.name.group, m.name.tag) for m in experiment.metric_infos]
    assert columns == [("", name) for name in trainer.history[0]["metrics"]]
    assert sorted(tag for _, tag in columns) == sorted(
        f"{p}{s}_{m}" for p in ("", "ema_") for s in ("val", "test") for m in ("loss", "acc")
    )
