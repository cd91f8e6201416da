"""The few torch.distributed calls the Trainer makes, and the launcher checks behind ``distributed=True``.

Every collective here is called by every rank at the same point of the loop; decisions that could differ
between ranks (a user's ``should_stop`` on one rank, a signal that reached one process) are folded into
one small all-reduce per optimizer step, so ranks never disagree about whether to take the next step.
"""

from __future__ import annotations

import os
import warnings
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
