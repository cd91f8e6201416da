"""Worker for tests/test_dcp.py: real gloo ranks that shard a tiny model with FSDP2 and save/load DCP.

    torchrun --nproc_per_node=2 dcp_worker.py main OUT [S3_URL]   save, then load into the same world size
    torchrun --nproc_per_node=2 dcp_worker.py kill DIR_URL        save step 1, then die inside step 2's save
    dcp_worker.py reshard OUT CKPT  (a world of 1)                load what 2 ranks saved

S3 storage options come from the environment (DCP_TEST_S3_ENDPOINT). Results go to OUT as torch files of
plain tensors (full, unsharded), read back by the test with weights_only=True.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import _init_optim_state
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from trainkit.checkpoint import CheckpointError, CheckpointStorage
from trainkit.dcp import load_dcp, save_dcp


class Net(nn.Module):
    """Dim 0 of b.weight (3) and of c.weight/c.bias (1) does not divide by 2: rank 1 holds 1 row of b and
    an empty shard of c."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.c = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def storage_options() -> dict[str, Any]:
    endpoint = os.environ.get("DCP_TEST_S3_ENDPOINT")
    if not endpoint:
        return {}
    return {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}


def sharded_net(seed: int, world: int) -> nn.Module:
    torch.manual_seed(seed)  # the same full weights on every rank before sharding
    net = Net()
    mesh = init_device_mesh("cpu", (world,))
    for unit in (net.a, net.b, net.c):
        fully_shard(unit, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def trained(seed: int, world: int, rank: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = sharded_net(seed, world)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    for step in range(2):
        g = torch.Generator().manual_seed(100 * rank + step)
        x = torch.randn(5, 4, generator=g)
        net(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def checkpoint(net: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> dict[str, Any]:
    """What trainkit's single-file checkpoint holds, with the sharded parts as DTensors."""
    return {
        "trainkit_format": 1,
        "model": net.state_dict(),
        "ema": {"state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()}, "num_updates": 2},
        "optimizers": [opt.state_dict()],
        "schedulers": [{"last_epoch": step, "base_lrs": [0.1], "_step_count": step + 1}],
        "grad_scaler": None,
        "trainer": {
            "global_step": step,
            "written_by": rank,  # differs per rank: the saved value must be rank 0's
            "history": [{"step": 1, "val_loss": 0.5}, {"step": 2, "val_loss": 0.25}],
            "rng": {"python": (3, tuple(range(7)), None), "torch": torch.get_rng_state()},
            "generators": [torch.Generator().manual_seed(7).get_state()],
            "latest_metrics": {},
        },
        "callbacks": {},
        "task": {"note": "hello", "tags": ("a", "b")},
    }


def full(obj: Any) -> Any:
    """Full tensors of a nested dict (collective for DTensors)."""
    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full(v) for v in obj)
    return obj


def local_shards(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": {k: v.to_local().clone() for k, v in net.state_dict().items()},
        "exp_avg": {i: s["exp_avg"].to_local().clone() for i, s in opt.state_dict()["state"].items()},
    }


def fresh_target(net: nn.Module, opt: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
    """A state dict to load into: the new model's and optimizer's own DTensors (the optimizer's state made
    to exist first), python values that the load must replace."""
    _init_optim_state(opt)
    target = checkpoint(net, opt, rank, step=0)
    target["trainer"]["history"] = []
    target["task"] = {}
    return target


def load_and_report(
    out: str, tag: str, seed: int, world: int, rank: int, where: Any, name: str | None
) -> None:
    net = sharded_net(seed, world)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    target = fresh_target(net, opt, rank)
    model_before = target["model"]["a.weight"]
    returned = load_dcp(target, where, name, storage_options=storage_options())
    net.load_state_dict(target["model"])
    opt.load_state_dict(target["optimizers"][0])
    report = {
        "same_object": returned is target and target["model"]["a.weight"] is model_before,
        "model": full(net.state_dict()),
        "optim": full(opt.state_dict()),
        "ema": full(target["ema"]),
        "rest": {k: full(target[k]) for k in ("trainer", "schedulers", "callbacks", "task", "grad_scaler")},
        "shards": local_shards(net, opt),
    }
    torch.save(report, os.path.join(out, f"{tag}_rank{rank}.pt"))


def main(out: str, s3_url: str | None) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    net, opt = trained(seed=0, world=world, rank=rank)
    ckpt = checkpoint(net, opt, rank, step=2)
    reference = full(ckpt)
    if rank == 0:
        torch.save(reference, os.path.join(out, "reference.pt"))
        torch.save(local_shards(net, opt), os.path.join(out, "saved_shards_rank0.pt"))
    else:
        torch.save(local_shards(net, opt), os.path.join(out, "saved_shards_rank1.pt"))
    local = CheckpointStorage(os.path.join(out, "ckpt"))
    where = save_dcp(ckpt, local, "step_000000002")
    torch.save({"location": where}, os.path.join(out, f"saved_rank{rank}.pt"))
    load_and_report(out, "local", seed=1, world=world, rank=rank, where=local, name="step_000000002")
    if s3_url:
        remote = CheckpointStorage(s3_url, storage_options())
        save_dcp(ckpt, remote, "best_step_000000002")
        load_and_report(
            out, "s3", seed=2, world=world, rank=rank, where=f"{s3_url}/best_step_000000002", name=None
        )


def kill(url: str) -> None:
    """Save step 1, then SIGKILL rank 0 in step 2's save once every rank's data is written, just before
    it writes .metadata: the worst moment."""
    rank, world = dist.get_rank(), dist.get_world_size()
    net, opt = trained(seed=0, world=world, rank=rank)
    storage = CheckpointStorage(url, storage_options())
    save_dcp(checkpoint(net, opt, rank, step=1), storage, "step_000000001")
    if rank == 0:

        def die_before_metadata(frame: Any, event: str, arg: Any) -> None:
            if (
                event == "call"
                and frame.f_code.co_name == "finish"
                and "checkpoint/filesystem" in frame.f_code.co_filename
            ):
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        sys.setprofile(die_before_metadata)
    save_dcp(checkpoint(net, opt, rank, step=2), storage, "step_000000002")
    raise SystemExit("the save of step 2 was expected to be killed")


def reshard(out: str, ckpt: str) -> None:
    load_and_report(out, "reshard", seed=3, world=1, rank=0, where=ckpt, name=None)
    wrong = distribute_tensor(torch.zeros(7, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
    try:
        load_dcp({"model": {"a.weight": wrong}}, ckpt)
    except CheckpointError as exc:
        report = torch.load(os.path.join(out, "reshard_rank0.pt"), weights_only=True)
        report["wrong_shape"] = str(exc)
        torch.save(report, os.path.join(out, "reshard_rank0.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode = sys.argv[1]
    timeout = datetime.timedelta(seconds=float(os.environ.get("DCP_WORKER_TIMEOUT", "120")))
    dist.init_process_group("gloo", timeout=timeout)
    try:
        if mode == "main":
            main(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
        elif mode == "kill":
            kill(sys.argv[2])
        elif mode == "reshard":
            reshard(sys.argv[2], sys.argv[3])
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        dist.destroy_process_group()
