"""Every number and string the Trainer takes, validated once, at construction, in one place.

Each bad value raises ``ValueError`` (wrong value) or ``TypeError`` (wrong kind) whose message names the
parameter, repeats the value given and says what is allowed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

RUN_MODES = ("epoch", "step")
STRATEGIES = ("ddp", "fsdp")
PRECISIONS = {
    "32": "32",
    "32-true": "32",
    "bf16-mixed": "bf16-mixed",
    "bf16": "bf16-mixed",
    "16-mixed": "16-mixed",
    "16": "16-mixed",
}
EARLY_STOP_KEYS = ("target", "patience", "mode", "min_delta", "check_finite")
MONITOR_KEYS = ("target", "mode", "min_delta")


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not valid; expected {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value):
        raise TypeError(
            f"{name}={value!r} is not valid; expected a positive integer" + (" or None" if optional else "")
        )
    if value < 1:
        raise _bad(name, value, "a positive integer (>= 1)" + (" or None" if optional else ""))


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is not valid; expected True or False")


@dataclass(frozen=True)
class MetricRule:
    """Which metric to watch and what counts as better: the shared rule of best tracking and early stop."""

    target: str = "val_loss"
    mode: str = "min"
    min_delta: float = 0.0


@dataclass(frozen=True)
class EarlyStopConfig(MetricRule):
    patience: int = 10
    check_finite: bool = True


def _metric_rule_fields(name: str, value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}={value!r} is not valid; expected a dict with keys {list(keys)}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise _bad(name, dict(value), f"a dict with keys among {list(keys)} (unknown: {unknown})")
    out = dict(value)
    target = out.get("target", "val_loss")
    if not isinstance(target, str) or not target:
        raise _bad(f"{name}['target']", target, "a metric name such as 'val_loss'")
    mode = out.get("mode", "min")
    if mode not in ("min", "max"):
        raise _bad(f"{name}['mode']", mode, "'min' or 'max'")
    min_delta = out.get("min_delta", 0.0)
    if not _is_number(min_delta) or not min_delta >= 0:
        raise _bad(f"{name}['min_delta']", min_delta, "a number >= 0")
    return {"target": target, "mode": mode, "min_delta": float(min_delta)}


def parse_early_stop(value: Any) -> EarlyStopConfig | None:
    if value is None:
        return None
    fields = _metric_rule_fields("early_stop", value, EARLY_STOP_KEYS)
    patience = value.get("patience", 10)
    if not _is_int(patience) or patience < 1:
        raise _bad("early_stop['patience']", patience, "an integer >= 1")
    check_finite = value.get("check_finite", True)
    if not isinstance(check_finite, bool):
        raise _bad("early_stop['check_finite']", check_finite, "True or False")
    return EarlyStopConfig(**fields, patience=patience, check_finite=check_finite)


def parse_monitor(value: Any, early_stop: EarlyStopConfig | None) -> tuple[MetricRule, bool]:
    """The rule that picks the best checkpoint, and whether it was asked for (explicit) or defaulted."""
    if value is not None:
        return MetricRule(**_metric_rule_fields("monitor", value, MONITOR_KEYS)), True
    if early_stop is not None:
        return MetricRule(early_stop.target, early_stop.mode, early_stop.min_delta), True
    return MetricRule(), False


def parse_device(value: Any) -> torch.device | None:
    if value is None or value == "auto":
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise _bad("device", value, "'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device") from exc


@dataclass(frozen=True)
class TrainerConfig:
    run_mode: str = "epoch"
    eval_interval: int = 1
    max_epochs: int | None = None
    max_steps: int | None = None
    save_interval: int | None = None
    early_stop: Any = None
    clip_grad: float | None = None
    use_ema: bool = False
    ema_decay: float = 0.999
    ema_warmup: bool = False
    distributed: bool = False
    rank: int | None = None
    world_size: int | None = None
    backend: str | None = None
    init_method: str | None = None
    find_unused_parameters: bool = False
    strategy: str = "ddp"
    fsdp_units: Any = None
    use_profiler: bool = False
    profiler_kwargs: Any = None
    checkpoint_dir: Any = "checkpoints"
    storage_options: Any = None
    async_checkpoint: bool = False
    log_dir: Any = "runs"
    log_every_n_steps: int = 50
    progress_bar: bool = True
    monitor: Any = None
    device: Any = None
    precision: Any = "32"
    accumulate_grad_batches: int = 1
    handle_signals: bool = True
    save_last: bool = False
    # Derived, normalised values.
    early_stop_rule: EarlyStopConfig | None = field(init=False, default=None)
    monitor_rule: MetricRule = field(init=False, default=MetricRule())
    monitor_explicit: bool = field(init=False, default=False)
    torch_device: torch.device | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.run_mode not in RUN_MODES:
            raise _bad("run_mode", self.run_mode, "'epoch' or 'step'")
        _positive_int("eval_interval", self.eval_interval)
        _positive_int("max_epochs", self.max_epochs, optional=True)
        _positive_int("max_steps", self.max_steps, optional=True)
        _positive_int("save_interval", self.save_interval, optional=True)
        if self.clip_grad is not None and (not _is_number(self.clip_grad) or not self.clip_grad > 0):
            raise _bad("clip_grad", self.clip_grad, "a number > 0 (the max total gradient 2-norm) or None")
        for name in (
            "use_ema",
            "ema_warmup",
            "distributed",
            "find_unused_parameters",
            "use_profiler",
            "async_checkpoint",
            "progress_bar",
            "handle_signals",
            "save_last",
        ):
            _bool(name, getattr(self, name))
        if not _is_number(self.ema_decay) or not 0.0 <= self.ema_decay <= 1.0:
            raise _bad("ema_decay", self.ema_decay, "a number in [0, 1]")
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 0):
            raise _bad("rank", self.rank, "an integer >= 0 or None")
        _positive_int("world_size", self.world_size, optional=True)
        if self.rank is not None and self.world_size is not None and self.rank >= self.world_size:
            raise _bad("rank", self.rank, f"an integer below world_size={self.world_size}")
        if self.backend is not None and self.backend not in ("gloo", "nccl", "mpi", "ucc", "xccl"):
            raise _bad("backend", self.backend, "None (auto), 'nccl', 'gloo', 'mpi', 'ucc' or 'xccl'")
        if self.init_method is not None and not isinstance(self.init_method, str):
            raise _bad("init_method", self.init_method, "a URL string such as 'tcp://host:port' or None")
        if self.profiler_kwargs is not None:
            if not isinstance(self.profiler_kwargs, Mapping):
                raise TypeError(
                    f"profiler_kwargs={self.profiler_kwargs!r} is not valid; expected a dict or None"
                )
            from .profiling import check_profiler_kwargs

            check_profiler_kwargs(dict(self.profiler_kwargs))
        for name in ("checkpoint_dir", "log_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(
                    f"{name}={value!r} is not valid; expected a path or URL string, or None to disable"
                )
            if isinstance(value, str) and not value:
                raise _bad(name, value, "a non-empty path or URL, or None to disable")
        if self.use_profiler and self.log_dir is None:
            raise _bad("log_dir", None, "a directory when use_profiler=True (traces go to log_dir/profiler)")
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise TypeError(f"storage_options={self.storage_options!r} is not valid; expected a dict or None")
        _positive_int("log_every_n_steps", self.log_every_n_steps)
        _positive_int("accumulate_grad_batches", self.accumulate_grad_batches)
        if str(self.precision) not in PRECISIONS:
            raise _bad("precision", self.precision, f"one of {sorted(PRECISIONS)}")
        object.__setattr__(self, "precision", PRECISIONS[str(self.precision)])
        self._check_strategy()
        early = parse_early_stop(self.early_stop)
        object.__setattr__(self, "early_stop_rule", early)
        rule, explicit = parse_monitor(self.monitor, early)
        object.__setattr__(self, "monitor_rule", rule)
        object.__setattr__(self, "monitor_explicit", explicit)
        object.__setattr__(self, "torch_device", parse_device(self.device))
        idle = [f"{n}={getattr(self, n)!r}" for n in ("save_interval", "save_last") if getattr(self, n)]
        if idle and self.checkpoint_dir is None:
            warnings.warn(
                f"{' and '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect with checkpoint_dir=None "
                "(no checkpoints are written)",
                UserWarning,
                stacklevel=4,  # the user's Trainer(...) call
            )

    def _check_strategy(self) -> None:
        if self.strategy not in STRATEGIES:
            raise _bad("strategy", self.strategy, "'ddp' or 'fsdp'")
        if self.strategy == "fsdp" and not self.distributed:
            raise ValueError(
                "strategy='fsdp' with distributed=False is not valid: strategy is read only with "
                "distributed=True; pass distributed=True (and launch with torchrun) to shard the model"
            )
        if self.strategy == "fsdp" and self.precision == "16-mixed":
            raise ValueError(
                "precision='16-mixed' with strategy='fsdp' is not supported; expected precision '32' or "
                "'bf16-mixed' (fp16 needs a sharded gradient scaler)"
            )
        if self.strategy == "fsdp" and self.async_checkpoint:
            raise ValueError(
                "async_checkpoint=True with strategy='fsdp' is not supported; every rank writes its shards "
                "of a sharded checkpoint during the save (expected async_checkpoint=False)"
            )
        units = self.fsdp_units
        if units is None:
            return
        units = (units,) if isinstance(units, type) else units
        if isinstance(units, (str, bytes)) or not isinstance(units, Iterable):
            raise TypeError(f"fsdp_units={self.fsdp_units!r} is not valid; expected a tuple of module classes "
                            "such as (Block,), or None")  # fmt: skip
        units = tuple(units)
        for unit in units:
            if not (isinstance(unit, type) and issubclass(unit, torch.nn.Module)):
                raise TypeError(f"fsdp_units={self.fsdp_units!r} is not valid: {unit!r} is not a torch.nn.Module "
                                "subclass; expected a tuple of module classes such as (Block,), or None")  # fmt: skip
        object.__setattr__(self, "fsdp_units", units)

    def hparams(self) -> dict[str, Any]:
        """The scalar settings, for TensorBoard's hparams view."""
        skip = {"early_stop_rule", "monitor_rule", "monitor_explicit", "torch_device", "storage_options"}
        out = {k: v for k, v in self.__dict__.items() if k not in skip}
        if out.get("fsdp_units") is not None:
            out["fsdp_units"] = ",".join(u.__name__ for u in out["fsdp_units"])
        return out


def check_fit_args(
    cfg: TrainerConfig, module: Any, train: Any, val: Any, test: Any, ckpt_path: Any, unknown: Mapping[str, Any]
) -> None:
    """The live arguments of ``Trainer.fit``, checked before anything runs or is written; and the one
    setting only fit needs, a stop condition (``validate``/``test``/``predict`` run without one)."""
    from collections.abc import Iterable

    from .data import exact_length
    from .evaluation import is_list_of_loaders, loader_sets
    from .module import TaskModule  # here: the module imports the callbacks, which need no config

    if unknown:
        known = ["module", "train_loader", "val_loader", "test_loader", "ckpt_path"]
        raise unknown_arguments("fit()", unknown, LIGHTNING_FIT_NAMES, known)
    if cfg.max_epochs is None and cfg.max_steps is None:
        raise ValueError(
            "max_epochs=None and max_steps=None: fit needs at least one stop condition; "
            "set max_epochs or max_steps to a positive integer when building the Trainer"
        )
    if not isinstance(module, TaskModule):
        raise TypeError(f"module={type(module).__name__} is not valid; expected a trainkit.TaskModule")
    if not isinstance(train, Iterable):
        raise TypeError(f"train_loader={train!r} is not valid; expected an iterable of batches (a DataLoader)")
    if isinstance(train, Mapping) or is_list_of_loaders(train):
        raise TypeError(
            f"train_loader is a {type(train).__name__} of loaders, which is not valid; expected one loader (an "
            "iterable of batches): trainkit trains on one loader (only val_loader/test_loader take a mapping)"
        )
    loader_sets("val_loader", val)  # a loader, or a mapping of named sets: checked here, before any step
    loader_sets("test_loader", test)
    if exact_length(train) == 0:  # len() is only a hint: believed here only where torch guarantees it
        raise ValueError("train_loader=<empty> is not valid; expected a loader that yields at least one batch")
    if ckpt_path is not None:
        if not isinstance(ckpt_path, (str, os.PathLike)) or not os.fspath(ckpt_path):
            raise TypeError(f"ckpt_path={ckpt_path!r} is not valid; expected a path, URL or 'last'")
        if ckpt_path == "last" and cfg.checkpoint_dir is None:
            raise ValueError("ckpt_path='last' needs checkpoint_dir; checkpoint_dir=None was given")
    check_log_dir(cfg.log_dir)


def check_log_dir(log_dir: Any) -> None:
    """``log_dir`` at the start of fit, before any step: the event file is made only at the first write (a
    log step or an evaluation), so a directory that cannot be made would otherwise fail only then, with all
    the steps before it lost. ValueError naming ``log_dir`` when it is an existing file, lies under one, or
    its nearest existing directory cannot be written. Creates nothing."""
    if log_dir is None:
        return
    given = os.fspath(log_dir)
    existing = os.path.abspath(given)
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        problem = f"{existing!r} is an existing file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"no permission to write in {existing!r}"
    else:
        return
    raise ValueError(
        f"log_dir={given!r} is not valid: {problem}; expected a directory that can be made or written "
        "(TensorBoard event files and metrics.jsonl), or None to log nothing"
    )


def check_eval_args(module: Any, loader: Any, sets: bool = True) -> None:
    """The live arguments of ``Trainer.validate``/``test`` (``loader``: a loader or a mapping of named
    sets) and ``predict`` (``sets=False``: one loader)."""
    from .evaluation import is_list_of_loaders, loader_sets
    from .module import TaskModule

    if not isinstance(module, TaskModule):
        raise TypeError(f"module={type(module).__name__} is not valid; expected a trainkit.TaskModule")
    if loader is None:
        raise TypeError(
            "loader=None is not valid; expected an iterable of batches or a mapping of set names to them"
        )
    if not sets and (isinstance(loader, Mapping) or is_list_of_loaders(loader)):
        raise TypeError(
            f"loader={loader!r} is not valid; predict takes one loader (an iterable of batches), not a "
            f"{type(loader).__name__} of loaders"
        )
    loader_sets("loader", loader)


# -- Lightning's names ------------------------------------------------------------------------------------

# What a Lightning user passes first, and what trainkit calls it. Trainer and fit take the unknown names
# in a ``**`` parameter typed ``NoReturn`` (so type checkers still flag them) only to raise this pointed
# TypeError instead of Python's bare "unexpected keyword argument".
LIGHTNING_TRAINER_NAMES = {
    "accelerator": "device= ('auto', 'cpu', 'cuda', 'cuda:1' or a torch.device)",
    "devices": "device= for one device; for several, distributed=True and one process per device under "
    "torchrun --nproc_per_node=N",
    "num_nodes": "torchrun --nnodes=N with distributed=True",
    "gradient_clip_val": "clip_grad=",
    "check_val_every_n_epoch": "eval_interval= with run_mode='epoch'",
    "val_check_interval": "eval_interval= with run_mode='step' (optimizer steps)",
    "enable_progress_bar": "progress_bar=",
    "enable_checkpointing": "checkpoint_dir=None to write no checkpoints",
    "default_root_dir": "checkpoint_dir= and log_dir=",
    "logger": "log_dir= (TensorBoard)",
}
LIGHTNING_FIT_NAMES = {
    "train_dataloaders": "train_loader=",
    "val_dataloaders": "val_loader=",
    "dataloaders": "the loader as the second argument",
    "datamodule": "train_loader= and val_loader= (call your datamodule's train_dataloader()/val_dataloader())",
    "model": "the module as the first argument",
}


def unknown_arguments(
    call: str, unknown: Mapping[str, Any], hints: Mapping[str, str], known: list[str]
) -> TypeError:
    """A TypeError for keyword arguments ``call`` does not take, saying trainkit's name for each."""
    import difflib

    parts = []
    for name in unknown:
        if name in hints:
            parts.append(f"{name}= is Lightning's name; trainkit uses {hints[name]}")
        else:
            close = difflib.get_close_matches(name, known, n=1)
            parts.append(f"{name}= is not a parameter" + (f" (did you mean {close[0]}=?)" if close else ""))
    return TypeError(f"{call} got unexpected keyword arguments: " + "; ".join(parts))


def reject_unknown(call: str, unknown: Mapping[str, Any], signature_of: Any) -> None:
    """Raise :func:`unknown_arguments`' TypeError when ``unknown`` is not empty (the Trainer's constructor;
    ``signature_of`` is the function whose parameter names are suggested for a misspelt one)."""
    if unknown:
        import inspect

        params = inspect.signature(signature_of).parameters.values()
        known = [p.name for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD]
        raise unknown_arguments(call, unknown, LIGHTNING_TRAINER_NAMES, known)
