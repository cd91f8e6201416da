"""Batches and loaders: device transfer, batch size, loader rebuilds for sharding and resume, and one pass.

A pass is exactly what ``for batch in loader`` yields: its iterator runs to ``StopIteration``. ``len(loader)``
is only a hint (an iterable dataset split over workers, a sampler whose ``__len__`` is wrong, or no length
at all): :class:`PassIterator` uses it only to know when to ask the iterator for one more batch early.
"""

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
    SubsetRandomSampler,
    WeightedRandomSampler,
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


# -- one pass --------------------------------------------------------------------------------------------

END_OF_PASS: Any = object()
"""What :meth:`PassIterator.next_batch` returns once the pass is over."""

_NOTHING: Any = object()

# Samplers whose ``__len__`` is exactly what they yield (torch's own, and the eval ShardSampler).
_EXACT_SAMPLERS = (
    SequentialSampler,
    RandomSampler,
    DistributedSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    ShardSampler,
)


def len_hint(loader: Any) -> int | None:
    """``len(loader)`` if it has one (a non-negative int), else None. Only a hint: see the module docstring."""
    try:
        length = len(loader)
    except (TypeError, NotImplementedError):
        return None
    return length if isinstance(length, int) and length >= 0 else None


def exact_length(loader: Any) -> int | None:
    """The number of batches a pass yields when ``len()`` is certainly right, else None: a list or tuple,
    or a map-style DataLoader whose sampler (and batch sampler) are torch's own. Used where a wrong length
    would do harm (calling a loader empty, a progress total), never to cut a pass."""
    if isinstance(loader, (list, tuple)):
        return len(loader)
    if not isinstance(loader, DataLoader) or not is_map_style(loader):
        return None
    if type(loader.sampler) not in _EXACT_SAMPLERS:
        return None
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        return None
    return len(loader)


def open_pass(loader: Any, skip: int = 0) -> Iterator[Any]:
    """``iter(loader)`` positioned after the pass's first ``skip`` batches, as a resumed pass needs.

    Map-style DataLoaders skip at the (batch) sampler level, drawing the skipped indices but loading no
    sample; anything else is read and dropped. Nothing here trusts ``len()``: a pass that ends while
    skipping leaves the iterator exhausted, and the caller sees the end at its next ``next()``.
    """
    if skip <= 0:
        return iter(loader)
    skipper: SkipSampler | None = None
    if isinstance(loader, DataLoader):
        loader, skipper = skip_batches(loader, skip)
    iterator = iter(loader)
    if skipper is not None:
        skipper.prime()
    else:
        for _ in range(skip):
            if next(iterator, END_OF_PASS) is END_OF_PASS:
                break
    return iterator


class PassIterator:
    """The batches of one pass, exactly as ``for batch in loader`` yields them.

    ``taken`` counts the batches handed out (the position inside the pass). ``len(loader)`` (``hint``) is
    used only to know *ahead* which batch may end the pass: :meth:`expects_end` is True for the batch the
    hint calls last and for any batch beyond it. :meth:`ended` then asks the iterator for the next batch
    at once, as a ``for`` loop does after its body: True when it raised ``StopIteration``; otherwise the
    batch is kept (``pending``) and :meth:`next_batch` returns it next. With a hint that is too large, or
    none, the end shows as :data:`END_OF_PASS` from :meth:`next_batch`.

    Example::

        passes = PassIterator(iter(loader), len_hint(loader))
        while (batch := passes.next_batch()) is not END_OF_PASS:
            train(batch)
            if passes.expects_end() and passes.ended():
                break                                   # the pass is over; known before the next fetch
    """

    def __init__(self, iterator: Iterator[Any], hint: int | None, taken: int = 0) -> None:
        self.iterator = iterator
        self.hint = hint
        self.taken = taken
        self._pending: Any = _NOTHING

    @property
    def pending(self) -> bool:
        """Whether a batch was read ahead by :meth:`ended` and not handed out yet."""
        return self._pending is not _NOTHING

    def next_batch(self) -> Any:
        """The next batch of the pass, or :data:`END_OF_PASS`."""
        if self._pending is not _NOTHING:
            batch, self._pending = self._pending, _NOTHING
        else:
            batch = next(self.iterator, END_OF_PASS)
        if batch is not END_OF_PASS:
            self.taken += 1
        return batch

    def expects_end(self) -> bool:
        """Whether ``len()`` says the batch last handed out may be the pass's last (free: no fetch)."""
        return self.hint is not None and self.taken >= self.hint

    def ended(self) -> bool:
        """Ask the iterator whether the pass is over (reads one batch ahead unless one is pending)."""
        if self._pending is not _NOTHING:
            return False
        batch = next(self.iterator, END_OF_PASS)
        if batch is END_OF_PASS:
            return True
        self._pending = batch
        return False
