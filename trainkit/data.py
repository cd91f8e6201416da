"""Batches and loaders: device transfer, batch size, and loader rebuilds for sharding and resume."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nest of tuples, lists, dicts, namedtuples and dataclasses to ``device``.

    Copies are asynchronous (``non_blocking``) where the source is pinned memory, as the DataLoader's
    ``pin_memory=True`` gives.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device) for k, v in batch.items()}
        if type(batch) is dict:
            return moved
        try:
            return type(batch)(moved)  # type: ignore[call-arg]  # OrderedDict, UserDict, ...
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        clone = copy.copy(batch)  # type: ignore[arg-type]  # every field, init=False ones too; frozen ones too
        for f in dataclasses.fields(batch):
            object.__setattr__(clone, f.name, move_to_device(getattr(batch, f.name), device))
        return clone
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        values: Any = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        values = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    else:
        return None
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def batch_size_of(batch: Any) -> int:
    """The leading dimension of the first tensor in the batch (1 when there is none, or it is a scalar)."""
    tensor = _first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        return 1
    return int(tensor.shape[0])


# -- loader rebuilds -------------------------------------------------------------------------------------


def rebuild_loader(
    loader: DataLoader, *, sampler: Sampler | None = None, batch_sampler: Any = None
) -> DataLoader:
    """A DataLoader like ``loader`` in every setting, with a different sampler or batch sampler."""
    kwargs: dict[str, Any] = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if hasattr(loader, "in_order"):
        kwargs["in_order"] = loader.in_order
    if batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        drop_last=loader.drop_last,
        sampler=sampler,
        **kwargs,
    )


def is_map_style(loader: DataLoader) -> bool:
    return not isinstance(loader.dataset, IterableDataset)


def shard_train_loader(
    loader: DataLoader, num_replicas: int, rank: int, seed: int = 0
) -> tuple[DataLoader, bool]:
    """Give ``loader`` a DistributedSampler when it uses a default one; returns (loader, changed).

    Shuffling is kept as it was (``RandomSampler`` -> ``shuffle=True``). The sampler's seed is ``seed``
    (0 unless the Trainer's ``seed`` says otherwise) and ``sampler.set_epoch`` is called every pass, so
    every rank draws the same permutation and takes its own slice.
    """
    if not is_map_style(loader) or isinstance(loader.sampler, DistributedSampler):
        return loader, False
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        return loader, False
    if type(loader.sampler) not in (RandomSampler, SequentialSampler):
        return loader, False
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset,
        num_replicas=num_replicas,
        rank=rank,
        shuffle=type(loader.sampler) is RandomSampler,
        seed=seed,
        drop_last=False,
    )
    return rebuild_loader(loader, sampler=sampler), True


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank`` on, without padding, for evaluation: every sample is
    seen exactly once across ranks, so the reduced weighted mean equals the single-process one."""

    def __init__(self, inner: Sampler, num_replicas: int, rank: int) -> None:
        self.inner, self.num_replicas, self.rank = inner, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        for i, index in enumerate(self.inner):
            if i % self.num_replicas == self.rank:
                yield index

    def __len__(self) -> int:
        n = len(self.inner)  # type: ignore[arg-type]
        return max(0, (n - self.rank + self.num_replicas - 1) // self.num_replicas)


def shard_eval_loader(loader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    if not is_map_style(loader) or isinstance(loader.sampler, (DistributedSampler, ShardSampler)):
        return loader
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        return loader
    return rebuild_loader(loader, sampler=ShardSampler(loader.sampler, num_replicas, rank))  # type: ignore[arg-type]


# -- resuming inside a pass ------------------------------------------------------------------------------


class _SkippingIterator:
    def __init__(self, inner: Iterator[Any], skip: int) -> None:
        self.inner, self.skip = inner, skip

    def prime(self) -> None:
        """Draw the skipped entries now (indices only: no sample is loaded)."""
        while self.skip:
            self.skip -= 1
            next(self.inner, None)

    def __iter__(self) -> _SkippingIterator:
        return self

    def __next__(self) -> Any:
        if self.skip:
            self.prime()
        return next(self.inner)


class SkipSampler(Sampler[Any]):
    """Wraps a (batch) sampler and drops its first ``skip`` entries lazily, at the first draw, so that the
    wrapped sampler's random draws happen at the same moment as in an uninterrupted pass."""

    def __init__(self, inner: Any, skip: int) -> None:
        self.inner, self.skip = inner, skip
        self.active: _SkippingIterator | None = None

    def __iter__(self) -> Iterator[Any]:
        self.active = _SkippingIterator(iter(self.inner), self.skip)
        return self.active

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)

    def prime(self) -> None:
        if self.active is not None:
            self.active.prime()


def skip_batches(loader: DataLoader, skip: int) -> tuple[DataLoader, SkipSampler | None]:
    """A loader whose pass starts at batch ``skip`` without loading the batches before it.

    Map-style datasets skip at the (batch) sampler level; an iterable dataset cannot, and is returned
    unchanged (the caller then reads and discards ``skip`` batches).
    """
    if skip <= 0 or not is_map_style(loader):
        return loader, None
    if loader.batch_sampler is not None:
        batch_skip = SkipSampler(loader.batch_sampler, skip)
        return rebuild_loader(loader, batch_sampler=batch_skip), batch_skip
    sample_skip = SkipSampler(loader.sampler, skip)
    return rebuild_loader(loader, sampler=sample_skip), sample_skip


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader's sampler and batch sampler where they have it."""
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    if inner is not None and inner is not getattr(loader, "sampler", None) and hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


def sampler_generators(loader: Any) -> list[torch.Generator]:
    """The torch Generators a pass of ``loader`` draws from (besides the global one), each once."""
    found: list[torch.Generator] = []
    candidates: Sequence[Any] = (
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
    )
    for gen in candidates:
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found
