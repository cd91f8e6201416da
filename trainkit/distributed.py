"""The few torch.distributed calls the Trainer makes, and the launcher checks behind ``distributed=True``.

Every collective here is called by every rank at the same point of the loop. Decisions that could differ
between ranks (a user's ``should_stop`` on one rank, a signal that reached one process) are put to a
``StopVote``: each rank's flags, as they stand when ``training_step`` returns, travel with the step's own
gradients (``GradientVote``) or, beside GPU gradients, in an all-reduce that the backward hides
(``GroupVote``), and every rank reads the same answer after the step. Only steps after which user code
ran (hooks, evaluation, a save) add one small blocking vote, so ranks never disagree about whether to
take the next step, and most steps pay nothing for it.
"""

import importlib
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_LAUNCH_HINT = (
    "launch with `torchrun --nproc_per_node=N script.py` (several machines: torchrun --nnodes=M "
    "--node_rank=I --rdzv_endpoint=HOST:PORT ...), or pass rank= and world_size= with MASTER_ADDR/MASTER_PORT "
    "or init_method="
)


_groups_created = 0  # default process groups trainkit created in this process (equal on every rank)


def _import_group_pinning_modules() -> None:
    """Import, before a default group exists, the torch modules that would otherwise keep it alive forever.

    ``torch.distributed.nn.functional`` takes ``group=group.WORLD`` as a default argument, evaluated when it
    is imported, and ``DistributedDataParallel.__init__`` imports it (through ``torch._dynamo``) the first
    time a process wraps a model. Imported after ``init_process_group`` it holds the default group in ten
    function defaults, so ``destroy_process_group`` no longer frees the gloo backend: its worker threads
    keep running until the interpreter exits, and one that drops a finished collective's tensor while
    Python finalizes needs the GIL, is ended by Python, and the unwinding through a ``noexcept`` destructor
    aborts the process ("terminate called without an active exception", SIGABRT, after fit returned).
    Imported first, the defaults hold ``None`` and destroying the group joins those threads at once.
    """
    importlib.import_module("torch._dynamo")  # what DDP imports; it pulls in torch.distributed.nn.functional


def launcher_env_present() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_launch(
    distributed: bool, rank: int | None, world_size: int | None, init_method: str | None
) -> None:
    """Raise or warn, before anything runs, when the launch does not fit ``distributed``."""
    if distributed:
        if dist.is_available() and dist.is_initialized():
            return
        has_rank = rank is not None or "RANK" in os.environ
        has_size = world_size is not None or "WORLD_SIZE" in os.environ
        has_rendezvous = init_method is not None or "MASTER_ADDR" in os.environ
        if not (has_rank and has_size and has_rendezvous):
            raise ValueError(
                f"distributed=True but no launcher was found (rank={rank!r}, RANK/WORLD_SIZE/MASTER_ADDR unset): "
                + _LAUNCH_HINT
            )
    elif launcher_env_present() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        warnings.warn(
            f"a launcher environment is present (WORLD_SIZE={os.environ['WORLD_SIZE']}) but distributed=False: "
            "every process trains alone on the whole data set; pass distributed=True for DDP",
            stacklevel=3,
        )


@dataclass
class DistContext:
    """Rank, world size and device of this process; ``enabled`` is False for single-process runs."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def union_of_names(self, names: list[str]) -> list[str]:
        """The sorted union of every rank's metric names (ranks whose shard was empty have none)."""
        if not self.enabled:
            return sorted(names)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, sorted(names))
        return sorted({n for part in gathered for n in part})

    def destroy(self) -> None:
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()
            self.created_group = False


def setup(
    *,
    device: torch.device | None,
    backend: str | None,
    rank: int | None,
    world_size: int | None,
    init_method: str | None,
) -> tuple[DistContext, torch.device]:
    """Join (or create) the default process group and choose this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        chosen_backend = backend or ("nccl" if use_cuda else "gloo")
        if rank is None and "RANK" in os.environ:
            rank = int(os.environ["RANK"])
        if world_size is None and "WORLD_SIZE" in os.environ:
            world_size = int(os.environ["WORLD_SIZE"])
        if use_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        _import_group_pinning_modules()  # before the group exists, so that destroy() really frees it
        # The group's keys get a prefix of their own: a launcher's store (torchrun's) outlives the group
        # that fit destroys, and a second fit in the same process would otherwise read the first group's
        # stale addresses and fail or hang (pytorch/pytorch#55967). Every rank counts the same fits.
        global _groups_created
        store, rank, world_size = next(
            dist.rendezvous(init_method or "env://", rank=-1 if rank is None else rank,
                            world_size=-1 if world_size is None else world_size)
        )  # fmt: skip
        store = dist.PrefixStore(f"trainkit_pg{_groups_created}", store)
        dist.init_process_group(chosen_backend, store=store, rank=rank, world_size=world_size)
        _groups_created += 1
        created = True
    ctx = DistContext(True, dist.get_rank(), dist.get_world_size(), local_rank, created)
    if device is None:
        device = (
            torch.device("cuda", local_rank % torch.cuda.device_count())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return ctx, device


Flags = Callable[[], "tuple[bool, bool]"]  # this rank's (should_stop, signal received), read when called


def stop_vote(world_size: int, device: torch.device, module: torch.nn.Module, flags: Flags) -> "StopVote | None":
    """The vote for this run: none for a single rank (no one to ask); beside CPU gradients on gloo, the
    flags ride with them; beside GPU gradients, they get a CPU group of their own, so that agreeing on them
    never waits for a GPU stream."""
    if world_size == 1:
        return None
    if dist.get_backend() == "gloo" and device.type == "cpu":
        floating = (p.dtype for p in module.parameters() if p.is_floating_point())
        return GradientVote(next(floating, torch.float32), flags)  # the model's dtype: the same DDP bucket
    return GroupVote(dist.new_group(backend="gloo"), flags)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over ranks by hand, as DDP would have in its backward: for micro-steps that ran
    under ``no_sync`` because the pass's end could not be known ahead (a loader without a length).

    A parameter no rank has a gradient for keeps ``None``, as DDP leaves globally unused ones.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    scale = 1.0 / dist.get_world_size()
    for group in groups.values():
        device, dtype = group[0].device, group[0].dtype
        used = torch.tensor([float(p.grad is not None) for p in group], device=device, dtype=dtype)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
        flat = torch.cat([used, *grads])
        dist.all_reduce(flat)
        offset = len(group)
        for p, anyone in zip(group, flat[: len(group)].tolist()):
            if anyone > 0:
                p.grad = flat[offset : offset + p.numel()].view_as(p).mul_(scale)
            offset += p.numel()


class StopVote:
    """Agrees across ranks on the stop requests that only one rank may see: a user's ``should_stop`` and a
    signal.

    Each step, this rank's flags as they stand when ``training_step`` returns go out with the step at no
    cost of their own, and ``collect`` (after the step) says whether any rank had asked by then (``None``
    when nothing was exchanged since). A request made later in the step (``on_batch_end``, an evaluation
    or save hook) needs ``now``: one blocking all-reduce of the flags as they stand, which the trainer
    makes only after steps where such code ran. Two ways to carry the per-step flags: ``GradientVote``
    beside CPU gradients, ``GroupVote`` beside GPU ones.
    """

    group: Any = None

    def __init__(self, flags: Flags) -> None:
        self.flags = flags

    def send(self) -> None:
        """Called once per optimizer step, after the forward of its last micro-step."""

    def collect(self) -> tuple[bool, bool] | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the vote holds once fit is done."""

    def now(self) -> tuple[bool, bool]:
        requested, signalled = self.flags()
        return self._reduce([requested, signalled])

    def any_rank(self, value: bool) -> bool:
        return self._reduce([value])[0]

    def agree(self, must_vote: bool) -> tuple[bool, bool]:
        """Every rank's (should_stop, signal) after a step, the same on every rank. What was asked by the
        end of ``training_step`` came back with the step; a request made later, and the final reason when
        stopping anyway (``must_vote``, equal on every rank), take one blocking vote. Otherwise a signal
        that came after ``training_step`` is heard with the next step."""
        heard = self.collect() or (False, False)
        if not (must_vote or any(heard)):
            return False, False
        agreed = self.now()
        return heard[0] or agreed[0], heard[1] or agreed[1]

    def _reduce(self, values: list[bool]) -> Any:
        tensor = torch.tensor([int(v) for v in values], dtype=torch.int32)
        dist.all_reduce(tensor, group=self.group)
        return tuple(v > 0 for v in tensor.tolist())


class GradientVote(StopVote):
    """The flags travel as the gradient of a two-element parameter that DDP reduces with the model's own
    gradients (in the same bucket when the dtypes match): no message of their own, no Python comm hook.

    ``attach`` adds ``carrier . flags`` to the loss ``training_step`` returned. The carrier is zero and never
    stepped, so the loss keeps its exact value; the gradient that reaches the carrier is the flags (times
    the positive scale of the loss: accumulation, a GradScaler). DDP averages it over ranks, so any value
    above zero after the step means that some rank asked.
    """

    def __init__(self, dtype: torch.dtype, flags: Flags) -> None:
        super().__init__(flags)
        self.carrier = torch.nn.Parameter(torch.zeros(2, dtype=dtype))
        self._values: dict[tuple[bool, bool], torch.Tensor] = {}

    def attach(self, out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            return self._carry(out)
        if isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
            return {**out, "loss": self._carry(out["loss"])}
        return out  # not a loss: the trainer says so

    def _carry(self, loss: torch.Tensor) -> torch.Tensor:
        key = self.flags()
        if key not in self._values:
            self._values[key] = torch.tensor([float(v) for v in key], dtype=self.carrier.dtype)
        term = self.carrier.dot(self._values[key])
        return loss + (term if term.dtype == loss.dtype else term.to(loss.dtype))

    def collect(self) -> tuple[bool, bool] | None:
        grad, self.carrier.grad = self.carrier.grad, None
        if grad is None:
            return None
        requested, signalled = grad.tolist()
        return requested > 0, signalled > 0


class GroupVote(StopVote):
    """The flags go in an all-reduce of their own on a CPU (gloo) group, started once the step's forward is
    done and arrived by the end of its backward, so agreeing never waits for a GPU stream."""

    def __init__(self, group: Any, flags: Flags) -> None:
        super().__init__(flags)
        self.group = group
        self._pending: Any = None
        self._sent: torch.Tensor | None = None

    def send(self) -> None:
        if self._pending is None:
            self._sent = torch.tensor([int(v) for v in self.flags()], dtype=torch.int32)
            self._pending = dist.all_reduce(self._sent, group=self.group, async_op=True)

    def close(self) -> None:
        """Destroy the side group (a local operation), so that fits in a long-lived group don't pile them up."""
        if self._pending is not None:  # an exchange still in flight holds tensors: let it finish first
            self._pending.wait()
            self._pending = self._sent = None
        if dist.is_initialized() and self.group is not None:
            dist.destroy_process_group(self.group)
        self.group = None  # the last reference: the side group's threads are joined now, not at exit

    def collect(self) -> tuple[bool, bool] | None:
        if self._pending is None or self._sent is None:
            return None
        self._pending.wait()
        requested, signalled = self._sent.tolist()
        self._pending = self._sent = None
        return requested > 0, signalled > 0
