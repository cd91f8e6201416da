"""Evaluations during fit and the decisions taken on them: history, best model, early stop, plateau.

At an evaluation (see the Trainer's loop): the validation set(s), and the test set(s) when given, for the
base model and, with EMA, for the EMA model; then ``ReduceLROnPlateau`` schedulers, then the best-model
check, then early stopping. The arithmetic of "improved" lives in :mod:`trainkit.early_stopping`; this module is
the glue that feeds it and remembers the outcome (``state_dict``: the deciding half of the checkpoint's
``"trainer"`` entry). One pass over one loader is :func:`trainkit.evaluation.run_eval_loop`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import TrainerConfig
from .distributed import DistContext
from .early_stopping import EarlyStopChecker, MetricTracker
from .evaluation import loader_sets, merge_set_metrics, metric_prefix, run_eval_loop

log = logging.getLogger("trainkit")

__all__ = ["EvalRecord", "Evaluator", "FitResult", "MetricNotFoundError"]


class MetricNotFoundError(ValueError, KeyError):
    """A metric named by ``early_stop``, ``monitor`` or a plateau scheduler was not produced."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class EvalRecord(dict):
    """One evaluation: ``record["step"]``, ``record["epoch"]``, ``record["metrics"]`` (also as attributes)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns."""

    global_step: int
    epoch: int
    best_metric: float | None
    best_step: int | None
    best_epoch: int | None
    best_checkpoint: str | None
    stopped_early: bool
    stop_reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[EvalRecord] = field(default_factory=list)


def find_metric(metrics: dict[str, float], name: str, what: str) -> float:
    if name not in metrics:
        raise MetricNotFoundError(
            f"{what} {name!r} was not produced by the evaluation; available metrics: {sorted(metrics)}"
        )
    return metrics[name]


class Evaluator:
    """Runs evaluations for one Trainer and keeps what they decided.

    ``models`` are ``(prefix, module)`` pairs (``""`` and, with EMA, ``"ema_"``); ``loaders`` are
    ``(stage, loader)`` pairs (``"val"``, ``"test"``), where a loader may be a mapping of named sets, each
    evaluated on its own (``val_<set>_<metric>``). ``emit(hook_name, *args)`` calls the hooks.
    """

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        self.emit: Callable[..., None] = lambda name, *args: None
        self.device = torch.device("cpu")
        self.dist = DistContext()
        self.autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        self.services: Any = None
        self.plateau_schedulers: list[Any] = []
        self.models: list[tuple[str, Any]] = []  # what fit evaluates
        self.loaders: list[tuple[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        cfg = self.config
        self.history: list[EvalRecord] = []
        self.latest_metrics: dict[str, float] = {}
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.best_epoch: int | None = None
        self.early_reason: str | None = None
        self.best_pending = False
        self._warned_monitor = False
        self._best = MetricTracker(cfg.monitor_rule.mode, cfg.monitor_rule.min_delta)
        rule = cfg.early_stop_rule
        self.stopper = (
            EarlyStopChecker(rule.patience, rule.mode, rule.min_delta, rule.check_finite)
            if rule is not None
            else None
        )

    @staticmethod
    def models_of(module: Any, ema: Any) -> list[tuple[str, Any]]:
        """The base model, and the EMA model when ``ema`` averages this very module."""
        return [("", module)] + ([("ema_", ema.module)] if ema is not None and ema.model is module else [])

    def loaders_of(self, val: Any, test: Any) -> list[tuple[str, Any]]:
        loaders = [(stage, loader) for stage, loader in (("val", val), ("test", test)) if loader is not None]
        # `is not None`: an empty dict is a setting too (every default), and does nothing without val_loader.
        idle = [f"{n}={getattr(self.config, n)!r}" for n in ("early_stop", "monitor") if getattr(self.config, n) is not None]
        if idle and not loaders and self.dist.is_main:
            warnings.warn(
                f"{' and '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect without a val_loader: "
                "fit never evaluates, so no early stop and no best.ckpt can happen; pass val_loader to fit",
                UserWarning,
                stacklevel=4,  # the user's fit() call
            )
        return loaders

    # -- running evaluations -----------------------------------------------------------------------------

    def evaluate(self, models: list[tuple[str, Any]], loaders: list[tuple[str, Any]]) -> dict[str, float]:
        self.emit("on_eval_start")
        metrics: dict[str, float] = {}
        # Evaluation draws from the global RNG (every DataLoader iterator takes a seed from it). Forking it
        # keeps training independent of when and how often it evaluates, with or without EMA.
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for model_prefix, model in models:
                for stage, loader in loaders:
                    for set_name, set_loader in loader_sets(f"{stage}_loader", loader):
                        prefix = metric_prefix(stage, set_name, model_prefix)
                        found = self._eval_model(model, set_loader, stage, prefix)
                        merge_set_metrics(metrics, found, f"{stage} set {set_name!r}")
        self.emit("on_eval_end", metrics)
        return metrics

    def _eval_model(self, model: Any, loader: Any, stage: str, prefix: str) -> dict[str, float]:
        """One model over one set's loader; ``prefix`` is the metric names' (``val_``, ``ema_val_ood_`` …)."""
        step_fn = model.validation_step if stage == "val" else model.test_step
        progress = self.services.progress if self.services is not None else None
        bar = progress.eval_bar(_len_or_none(loader), prefix[:-1]) if progress is not None else None
        iterable = loader if bar is None else _tick(loader, bar)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            return run_eval_loop(
                step_fn, iterable, prefix=prefix, device=self.device, autocast=self.autocast,
                dist_ctx=self.dist, step_name="validation_step" if stage == "val" else "test_step",
            )  # fmt: skip
        finally:
            for m, was_training in modes.items():
                m.training = was_training
            if bar is not None:
                bar.close()

    # -- deciding ----------------------------------------------------------------------------------------

    def evaluate_and_decide(self, step: int, epoch: int) -> bool:
        """Evaluate, then plateau schedulers, the best check and early stopping; False when there is
        nothing to evaluate. A better model is marked ``best_pending``: the Trainer writes it once the
        step's epoch-end hooks are done, so the file holds what a regular checkpoint of this step would."""
        if not self.loaders:
            return False
        metrics = self.evaluate(self.models, self.loaders)
        self.latest_metrics = metrics
        self.history.append(EvalRecord(step=step, epoch=epoch, metrics=dict(metrics)))
        if self.services is not None:
            self.services.logger.log_eval(step, epoch, metrics)
            self.services.progress.eval_done(metrics)
        for sched in self.plateau_schedulers:
            sched.scheduler.step(find_metric(metrics, sched.monitor, "lr_scheduler monitor"))
        improved = self._update_best(metrics, step, epoch)
        if self.stopper is not None:
            value = find_metric(metrics, self.config.early_stop_rule.target, "early_stop target")  # type: ignore[union-attr]
            if self.stopper.update(value) and self.early_reason is None:
                self.early_reason = self.stopper.reason
                log.info("trainkit: early stop at step %d (%s)", step, self.stopper.reason)
                self.emit("on_early_stop")
        self.best_pending = improved
        return True

    def _update_best(self, metrics: dict[str, float], step: int, epoch: int) -> bool:
        rule = self.config.monitor_rule
        if rule.target not in metrics:
            if self.config.monitor_explicit:
                # The rule comes from monitor, or else from early_stop: name the setting the user wrote.
                what = "monitor target" if self.config.monitor is not None else "early_stop target"
                find_metric(metrics, rule.target, what)
            if not self._warned_monitor:
                self._warned_monitor = True
                warnings.warn(
                    f"no {rule.target!r} metric to pick the best checkpoint (available: {sorted(metrics)}); "
                    "no best checkpoint is written. Set monitor={'target': ...} to choose one.",
                    stacklevel=2,
                )
            return False
        value = metrics[rule.target]
        if not self._best.update(value):
            return False
        self.best_metric, self.best_step, self.best_epoch = value, step, epoch
        return True

    def result(self, step: int, epoch: int, best_checkpoint: str | None, stop_reason: str) -> FitResult:
        return FitResult(
            global_step=step, epoch=epoch, best_metric=self.best_metric, best_step=self.best_step,
            best_epoch=self.best_epoch, best_checkpoint=best_checkpoint,
            stopped_early=stop_reason in ("early_stop", "non_finite"), stop_reason=stop_reason,
            metrics=dict(self.latest_metrics), history=list(self.history),
        )  # fmt: skip

    # -- checkpoint state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "latest_metrics": dict(self.latest_metrics),
            "history": [dict(r) for r in self.history],
            "best": {
                "metric": self.best_metric,
                "step": self.best_step,
                "epoch": self.best_epoch,
                "tracker": self._best.state_dict(),
            },
            "early_stop": self.stopper.state_dict() if self.stopper is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.latest_metrics = dict(state["latest_metrics"])
        self.history = [EvalRecord(r) for r in state["history"]]
        best = state["best"]
        self.best_metric, self.best_step, self.best_epoch = best["metric"], best["step"], best["epoch"]
        self._best.load_state_dict(best["tracker"])
        if self.stopper is not None and state["early_stop"] is not None:
            self.stopper.load_state_dict(state["early_stop"])
            # A run that ended for early stopping (under this run's rule) resumes to no step at all.
            self.early_reason = self.stopper.reason if self.stopper.stopped else None


def _len_or_none(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _tick(loader: Iterable[Any], bar: Any) -> Iterator[Any]:
    for batch in loader:
        yield batch
        bar.update(1)
