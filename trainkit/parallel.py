"""How a run is parallel: one seam between the loop and the way the module is spread over processes.

The Trainer asks a ``Parallel`` object for everything that differs between one process and several:

    setup()                    process group (or none) and this rank's device
    place(module, device)      put the module on its device (FSDP: shard it there; ``ema_shadow``)
    prepare_loaders(...)       each rank's share of the train and evaluation loaders
    wrap(module, flags)        the callable the loop runs ``training_step`` through
    no_sync()                  gradients of a micro-step stay local (accumulation)
    finish_accumulation()      reduce gradients of micro-steps whose pass ended unannounced
    vote                       the stop vote (see :mod:`trainkit.distributed`), or None
    checkpoint_format          "file": rank 0 writes one file of full tensors
    close(clean, failed)       release the wrapper, the vote and the process group

``SingleProcess`` is the plain case, ``DDP`` wraps in ``DistributedDataParallel``. A sharded strategy is
one more sibling; the loop does not change. Everything else (EMA, checkpoints, evaluation) uses the
unwrapped module.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import distributed as dist_utils
from .config import TrainerConfig
from .data import shard_eval_loader, shard_train_loader
from .distributed import DistContext, Flags, GradientVote, StopVote
from .evaluation import map_loaders

_NO_SYNC = contextlib.nullcontext()  # reusable: no context object is built on steps that sync gradients


class SingleProcess:
    """One process: the module is trained as it is."""

    enabled = False
    checkpoint_format = "file"

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        self.dist = DistContext()
        self.vote: StopVote | None = None

    def setup(self, device: torch.device) -> tuple[DistContext, torch.device]:
        self.dist = DistContext()
        return self.dist, device

    ema_shadow: torch.nn.Module | None = None  # what the EMA averages into, when not a copy of the module

    def place(self, module: torch.nn.Module, device: torch.device) -> None:
        """Before the optimizers are built from ``module.parameters()``."""
        module.to(device)

    def prepare_loaders(self, train: Any, val: Any, test: Any) -> tuple[Any, Any, Any]:
        return train, val, test

    def wrap(self, module: Any, flags: Flags, device: torch.device) -> Callable[[Any, int], Any]:
        return module.training_step  # type: ignore[no-any-return]

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return _NO_SYNC

    def clip_foreach(self, params: list[torch.nn.Parameter]) -> bool | None:
        """``foreach`` for ``clip_grad_norm_``: True when every parameter is a plain tensor on a device with
        fused for-each kernels (torch would otherwise check that on every call), else torch's own choice."""
        plain = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
        return True if plain else None

    def finish_accumulation(self) -> None:
        pass

    def close(self, clean: bool, failed: bool) -> None:
        self.dist.destroy()


class _TrainingStepForward(torch.nn.Module):
    """Routes DDP's ``forward`` to ``training_step``, so DDP sees the step's outputs and syncs gradients;
    with a ``GradientVote``, the stop flags ride along as one more gradient."""

    def __init__(self, task: Any, vote: GradientVote | None) -> None:
        super().__init__()
        self.task = task
        self.vote = vote
        if vote is not None:
            self.stop_flags = vote.carrier

    def forward(self, batch: Any, batch_idx: int) -> Any:
        out = self.task.training_step(batch, batch_idx)
        return out if self.vote is None else self.vote.attach(out)


class DDP(SingleProcess):
    """``DistributedDataParallel`` over ``torch.distributed`` (see :mod:`trainkit.distributed`)."""

    enabled = True

    def __init__(self, config: TrainerConfig) -> None:
        super().__init__(config)
        self.wrapper: Any = None

    def setup(self, device: torch.device) -> tuple[DistContext, torch.device]:
        cfg = self.config
        self.dist, device = dist_utils.setup(
            device=cfg.torch_device, backend=cfg.backend, rank=cfg.rank, world_size=cfg.world_size,
            init_method=cfg.init_method,
        )  # fmt: skip
        return self.dist, device

    def prepare_loaders(self, train: Any, val: Any, test: Any) -> tuple[Any, Any, Any]:
        """Each rank reads its own shard of every DataLoader."""
        ws, rank = self.dist.world_size, self.dist.rank
        if isinstance(train, torch.utils.data.DataLoader):
            sharded, changed = shard_train_loader(train, ws, rank)
            if not changed and not isinstance(train.sampler, torch.utils.data.DistributedSampler):
                warnings.warn(
                    "train_loader has a custom sampler, batch sampler or iterable dataset: trainkit cannot "
                    "shard it, so each rank reads what it yields", stacklevel=4,
                )  # fmt: skip
            train = sharded
        # A mapping of named evaluation sets: each set's loader is sharded on its own.
        val, test = (map_loaders(ld, lambda x: _shard_eval(x, ws, rank)) for ld in (val, test))
        return train, val, test

    def wrap(self, module: Any, flags: Flags, device: torch.device) -> Callable[[Any, int], Any]:
        """DDP wraps a forwarder built from the *unwrapped* module; DDP broadcasts rank 0's weights."""
        from torch.nn.parallel import DistributedDataParallel

        self.vote = dist_utils.stop_vote(self.dist.world_size, device, module, flags)
        carrier = self.vote if isinstance(self.vote, GradientVote) else None
        self.wrapper = DistributedDataParallel(
            _TrainingStepForward(module, carrier),
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=self.config.find_unused_parameters,
        )
        # Not the wrapper itself: a caller that kept it would keep its reducer, and so the process group,
        # alive past close(): gloo's threads would then run into interpreter exit (see distributed.py).
        return self._forward

    def _forward(self, batch: Any, batch_idx: int) -> Any:
        return self.wrapper(batch, batch_idx)

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return self.wrapper.no_sync()  # type: ignore[no-any-return]

    def finish_accumulation(self) -> None:
        # The micro-steps ran under no_sync: the pass's end came unannounced.
        dist_utils.average_gradients(list(self.wrapper.parameters()))

    def close(self, clean: bool, failed: bool) -> None:
        if clean:
            self.dist.barrier()  # files rank 0 wrote exist when fit returns on every rank
        # The DDP wrapper must go before its group: a reducer freed after destroy_process_group can hang
        # in its destructor (gloo), e.g. when the garbage collector reaches it during a second fit.
        if self.vote is not None and not failed:
            self.vote.close()
        self.wrapper = self.vote = None
        self.dist.destroy()


def make_parallel(config: TrainerConfig) -> SingleProcess:
    if config.distributed and config.strategy == "fsdp":
        from .fsdp import FSDPParallel  # here: torch.distributed.fsdp costs import time

        return FSDPParallel(config)
    return DDP(config) if config.distributed else SingleProcess(config)


def eval_share(loader: Any) -> tuple[DistContext, Any]:
    """``validate``/``test`` with ``distributed=True``: inside an initialised process group each rank reads
    its shard of a DataLoader (of each, for a mapping of named sets) and metrics are reduced over ranks;
    without one, one process reads it all."""
    if not torch.distributed.is_initialized():
        return DistContext(), loader
    ctx = DistContext(True, torch.distributed.get_rank(), torch.distributed.get_world_size())
    return ctx, map_loaders(loader, lambda x: _shard_eval(x, ctx.world_size, ctx.rank))


def _shard_eval(loader: Any, world_size: int, rank: int) -> Any:
    """This rank's shard of an evaluation DataLoader; any other iterable as it is."""
    if isinstance(loader, torch.utils.data.DataLoader):
        return shard_eval_loader(loader, world_size, rank)
    return loader
