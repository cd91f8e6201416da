"""Everything FSDP-specific behind ``Trainer(distributed=True, strategy="fsdp")``: PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``).

What each piece does and why:

- ``resolve_units`` / ``shard_module``: every instance of each ``fsdp_units`` class is sharded
  bottom-up, then the root: a :class:`StepForwarder` around the module whose ``forward`` runs a step
  method, so that the root's all-gather/free hooks run around ``training_step``, ``validation_step``,
  ``test_step`` and ``predict_step`` (trainkit calls those, not ``forward``).
- ``shard_from_rank0``: shards the whole module, then every rank takes its shard of rank 0's weights (as
  DDP's constructor broadcasts them, so ranks that initialised differently still train one model); only
  shards reach the device. The EMA's shadow is a second copy of the model, made before sharding (a
  sharded module cannot be deep-copied) and sharded exactly like it, so each rank's shadow shard pairs
  with its live shard and ``EMA.update`` is a local ``_foreach_lerp_`` on the local shards: no
  communication.
- ``clip_grad_norm``: ``torch.nn.utils.clip_grad_norm_`` over the DTensor gradients is the 2-norm over all
  shards (one all-reduce of the squared local norms).
- Checkpoints: under FSDP2 the module's and the optimizer's own ``state_dict()`` already hold DTensor
  shards under the usual names and positions, so a sharded checkpoint has the same entries as a
  single-file one; ``ShardedCheckpointer`` writes them with every rank
  (:mod:`trainkit.dcp`) and loads them in place. ``model_state`` / ``optimizer_state`` (keyed by name,
  ``torch.distributed.checkpoint.state_dict``) are for loops of one's own.
- ``FSDPParallel``: the trainer's "how this run is parallel" piece for FSDP, built from the above.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .checkpoint import (
    BEST_NAME,
    FORMAT_KEY,
    FORMAT_VERSION,
    KEY_CALLBACKS,
    KEY_MODEL,
    KEY_OPTIMIZERS,
    KEY_TASK,
    KEY_TRAINER,
    CheckpointError,
    CheckpointStorage,
    regular_name,
)
from .checkpointing import Checkpointer, log
from .config import TrainerConfig
from .dcp import (
    best_dir_name,
    complete_checkpoints,
    delete_checkpoint_dir,
    is_sharded_checkpoint,
    latest_complete,
    load_dcp,
    regular_dir_name,
    save_dcp,
    sharded_step,
)
from .distributed import Flags, GroupVote
from .parallel import DDP
from .rng import get_rng_state

FORWARD_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
_SHARDED = StateDictOptions(full_state_dict=False, cpu_offload=False)


def resolve_units(module: torch.nn.Module, fsdp_units: Any = None) -> tuple[type[torch.nn.Module], ...]:
    """The classes whose instances become shard units: ``fsdp_units``, else ``type(module).fsdp_units``,
    else none (the root alone).

    Raises:
        TypeError: an entry is not a ``torch.nn.Module`` subclass.
        ValueError: a class matches no submodule of ``module`` (the message names ``fsdp_units``).
    """
    source = "fsdp_units" if fsdp_units is not None else f"{type(module).__name__}.fsdp_units"
    units = fsdp_units if fsdp_units is not None else getattr(type(module), "fsdp_units", None)
    if units is None:
        return ()
    units = (units,) if isinstance(units, type) else tuple(units)
    for unit in units:
        if not (isinstance(unit, type) and issubclass(unit, torch.nn.Module)):
            raise TypeError(f"{source}={units!r} is not valid: {unit!r} is not a torch.nn.Module subclass; "
                            "expected a tuple of module classes, e.g. (Block,)")  # fmt: skip
    submodules = [m for m in module.modules() if m is not module]
    for unit in units:
        if not any(isinstance(m, unit) for m in submodules):
            raise ValueError(
                f"{source}={tuple(u.__name__ for u in units)}: {unit.__name__} matches no submodule of "
                f"{type(module).__name__}; expected classes of its submodules (e.g. its transformer blocks)"
            )
    return units


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """``"bf16-mixed"``: parameters gathered and computed in bf16, gradients reduced in fp32, the sharded
    master weights and optimizer state stay fp32. ``"32"``: no casting."""
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "32":
        return MixedPrecisionPolicy()
    raise ValueError(f"precision={precision!r} is not supported with strategy='fsdp'; expected '32' or 'bf16-mixed'")


def shard_module(
    module: torch.nn.Module,
    units: Sequence[type[torch.nn.Module]],
    mp_policy: MixedPrecisionPolicy,
    mesh: DeviceMesh | None = None,
) -> torch.nn.Module:
    """``fully_shard`` every instance of ``units`` (innermost first), then ``module`` under a
    :class:`StepForwarder`, the FSDP root, which it returns; ``module``'s step methods go through it.

    The module's parameters become ``DTensor`` shards on ``mesh``'s device (dim 0 split as ``torch.chunk``
    does, so a first dimension that does not divide by the world size gives uneven shards, possibly
    empty). Optimizers must be built afterwards, from these parameters.
    """
    targets = [m for m in module.modules() if m is not module and isinstance(m, tuple(units))]
    for target in reversed(targets):  # reversed pre-order: a nested unit is sharded before its parent
        fully_shard(target, mesh=mesh, mp_policy=mp_policy)
    root = StepForwarder(module)
    fully_shard(root, mesh=mesh, mp_policy=mp_policy)
    for name in FORWARD_METHODS:
        if callable(getattr(module, name, None)):  # this instance's steps go through the root
            setattr(module, name, functools.partial(root, name) if name == "training_step" else _EvalStep(root, name))
    return root


class _EvalStep:
    """An evaluation step through the root, which then frees its gathered parameters: the root keeps them
    after a forward (its backward would need them at once), but no backward follows an evaluation step."""

    def __init__(self, root: Any, name: str) -> None:
        self.root, self.name = root, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.root(self.name, *args, **kwargs)
        self.root.reshard()
        return out


class StepForwarder(torch.nn.Module):
    """The FSDP root around a TaskModule: its ``forward(name, *args)`` runs the module's step method
    ``name``, so that FSDP gathers the parameters that belong to no unit before the step and reduces their
    gradients after it. The TaskModule itself stays a plain module: a ``self(x)`` inside a step runs no
    FSDP hooks of its own (hooking the TaskModule directly would run the root's hooks twice per step)."""

    def __init__(self, task: torch.nn.Module) -> None:
        super().__init__()
        self.task = task

    def forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(type(self.task), name)(self.task, *args, **kwargs)


def shard_from_rank0(
    module: torch.nn.Module,
    units: Sequence[type[torch.nn.Module]],
    mp_policy: MixedPrecisionPolicy,
    mesh: DeviceMesh,
    *,
    ema: bool = False,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """Shard ``module`` (still whole, on any device) and give every rank its shard of *rank 0's* weights,
    as DDP's constructor broadcasts them. Returns the FSDP root (a :class:`StepForwarder`) and, with
    ``ema``, a frozen shadow sharded the same way and equal to it (a sharded module cannot be deep-copied,
    so the copy is made first).

    Only shards reach ``mesh``'s device: the whole module is never moved there.
    """
    rank0_state = module.state_dict() if dist.get_rank() == 0 else {}  # references: no copy
    shadow = copy.deepcopy(module) if ema else None
    root = shard_module(module, units, mp_policy, mesh)
    set_model_state_dict(module, rank0_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))  # fmt: skip
    del rank0_state
    if shadow is None:
        return root, None
    shadow.eval().requires_grad_(False)
    shard_module(shadow, units, mp_policy, mesh)
    with torch.no_grad():
        for dst, src in zip(shadow.state_dict(keep_vars=True).values(), module.state_dict(keep_vars=True).values()):
            _local(dst).copy_(_local(src))
    return root, shadow


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_numel(tensors: Iterable[torch.Tensor]) -> int:
    """Elements this rank holds of ``tensors`` (a DTensor counts its local shard only)."""
    return sum(_local(t).numel() for t in tensors)


def clip_grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the sharded gradients in place to a total 2-norm of ``max_norm`` over all shards of all ranks;
    returns that norm before clipping (a plain 0-d tensor, equal on every rank)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def model_state(module: torch.nn.Module) -> dict[str, Any]:
    """The module's state dict as sharded DTensors (the live parameters themselves: DCP loads in place)."""
    return get_model_state_dict(module, options=_SHARDED)


def load_model_state(module: torch.nn.Module, state: dict[str, Any]) -> None:
    set_model_state_dict(module, state, options=_SHARDED)


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict keyed by parameter name (not position), each state tensor a DTensor
    shard; an optimizer that has not stepped yet gets its state initialised first, so that the dict is
    a template DCP can load into."""
    return get_optimizer_state_dict(module, optimizer, options=_SHARDED)


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(module, optimizer, state, options=_SHARDED)


class FSDPParallel(DDP):
    """The FSDP2 side of the trainer's parallel seam (``Trainer(distributed=True, strategy="fsdp")``).

    Process group, loaders and teardown are DDP's. ``place`` shards the module (and the EMA's shadow)
    instead of moving it: it runs before the optimizer is built, which must see the sharded parameters.
    The module's step methods run through the FSDP root (:func:`shard_module`); the stop vote goes over a
    gloo side group (there is no DDP bucket to carry it).

    Accumulation: with a loader whose length is known, micro-steps run without gradient reduction
    (``set_requires_gradient_sync(False)``; each rank keeps its unsharded gradient sum) and the boundary
    step reduce-scatters the sum. Without a length the end of a pass is only known after its last batch,
    and FSDP2 has no public call to reduce gradients held back, so there every micro-step reduce-scatters
    (the same mean, a little more communication, less memory).
    """

    checkpoint_format = "dcp"

    def __init__(self, config: TrainerConfig) -> None:
        super().__init__(config)
        self.mp_policy = mixed_precision_policy(config.precision)
        self.pass_length_known = True
        self.root: torch.nn.Module | None = None  # the StepForwarder around the TaskModule
        self.ema_shadow: torch.nn.Module | None = None

    def place(self, module: torch.nn.Module, device: torch.device) -> None:
        if any(isinstance(m, FSDPModule) for m in module.modules()):
            raise ValueError(
                f"module={type(module).__name__} is already sharded (an earlier fit with strategy='fsdp' "
                "sharded it in place); expected a fresh module: build a new one and load weights into it "
                "(tk.load_weights) or resume with ckpt_path"
            )
        units = resolve_units(module, self.config.fsdp_units)
        mesh = init_device_mesh(device.type, (self.dist.world_size,))
        self.root, self.ema_shadow = shard_from_rank0(module, units, self.mp_policy, mesh, ema=self.config.use_ema)

    def prepare_loaders(self, train: Any, val: Any, test: Any) -> tuple[Any, Any, Any]:
        train, val, test = super().prepare_loaders(train, val, test)
        try:
            len(train)
        except TypeError:
            self.pass_length_known = False
        return train, val, test

    def wrap(self, module: Any, flags: Flags, device: torch.device) -> Callable[[Any, int], Any]:
        if self.dist.world_size > 1:
            self.vote = GroupVote(dist.new_group(backend="gloo"), flags)
        return module.training_step  # type: ignore[no-any-return]  # FSDP's hooks run around it

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return self._held_back() if self.pass_length_known else contextlib.nullcontext()

    @contextlib.contextmanager
    def _held_back(self) -> Iterator[None]:
        root = self._root()
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)

    def finish_accumulation(self) -> None:
        """A pass ended inside an accumulation. Its micro-steps were reduced as they ran, unless the loader
        announced a length and then yielded fewer batches: there the held-back sums are reduced now."""
        if self.pass_length_known:
            reduce_held_back_gradients(self._root())

    def close(self, clean: bool, failed: bool) -> None:
        self.root = self.ema_shadow = None
        super().close(clean, failed)

    def _root(self) -> Any:
        if self.root is None:
            raise RuntimeError("FSDPParallel.place has not been called")
        return self.root


class ShardedCheckpointer(Checkpointer):
    """Checkpoints as DCP directories that every rank writes its shards into (:mod:`trainkit.dcp`):
    ``step_%09d/`` (regular, all kept) and ``best_step_%09d/`` (the one best; the previous one is deleted
    once the new one is complete). ``"last"`` is the newest complete directory (rank 0 looks, every rank
    loads it). Besides rank 0's RNG state (``trainer.rng``, as in a single file) every rank's is saved
    (``trainer.rng_per_rank``), and a resume with the same world size gives each rank its own back.
    """

    def _save(self, name: str) -> str | None:
        storage = self.storage
        if storage is None:
            return None
        checkpoint = self.build()
        per_rank: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(per_rank, get_rng_state())
        checkpoint[KEY_TRAINER]["rng_per_rank"] = per_rank
        step = int(checkpoint[KEY_TRAINER]["global_step"])
        if name == BEST_NAME:
            name = best_dir_name(step)
        elif name == regular_name(step):
            name = regular_dir_name(step)
        location = save_dcp(checkpoint, storage, name)
        if name.startswith("best_"):
            if self.dist.is_main:  # the new best is complete: now the old one goes
                for other in storage.names():
                    if other != name and other.startswith("best_") and sharded_step(other) is not None:
                        delete_checkpoint_dir(storage, other)
            self.dist.barrier()
        return location

    def resolve(self, ckpt_path: str | os.PathLike[str]) -> dict[str, Any] | None:
        storage = self.storage
        if ckpt_path == "last":
            assert storage is not None
            chosen = [latest_complete(storage) if self.dist.is_main else None]
            dist.broadcast_object_list(chosen, src=0)  # every rank loads the one rank 0 found
            if chosen[0] is None:
                log.warning("trainkit: ckpt_path='last' found no checkpoint in %s; starting fresh", storage.url)
                return None
            log.info("trainkit: resuming from %s", storage.location(chosen[0]))
            return self._load(storage, chosen[0])
        if not is_sharded_checkpoint(ckpt_path, self.storage_options):
            raise CheckpointError(
                f"ckpt_path={os.fspath(ckpt_path)!r} is not a complete sharded checkpoint directory; under "
                "strategy='fsdp' expected a step_%09d/ or best_step_%09d/ directory (a single-file checkpoint "
                "converts with `python -m trainkit convert SRC DST`)"
            )
        return self._load(os.fspath(ckpt_path), None)

    def _load(self, where: CheckpointStorage | str, name: str | None) -> dict[str, Any]:
        """Every rank reads its shards into its own live tensors (the pieces' state dicts, used as the
        template); the optimizer's state is created first (zeros), so that it has tensors to load into."""
        piece, optimizers = self.pieces[KEY_MODEL], self.pieces[KEY_OPTIMIZERS]
        module = getattr(piece, "module", piece)  # the TaskModule behind its checkpoint piece
        for optimizer in getattr(optimizers, "items", ()):
            get_optimizer_state_dict(cast(torch.nn.Module, module), optimizer, options=_SHARDED)
        template: dict[str, Any] = {FORMAT_KEY: FORMAT_VERSION, KEY_TASK: {}}
        template.update((key, piece.state_dict()) for key, piece in self.pieces.items())
        return load_dcp(template, where, name, storage_options=self.storage_options)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint[KEY_TRAINER]
        per_rank = state.pop("rng_per_rank", None)
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            state["rng"] = per_rank[self.dist.rank]
        for key, piece in self.pieces.items():
            piece.load_state_dict(checkpoint.get(key) if key == KEY_CALLBACKS else checkpoint[key])
        storage = self.storage
        if storage is not None and state["best"]["metric"] is not None:
            bests = [n for n in complete_checkpoints(storage) if n.startswith("best_")]
            self.best_path = storage.location(max(bests)) if bests else None
        self.on_load(checkpoint)
        self.last_saved_step = int(state["global_step"])


def reduce_held_back_gradients(root: torch.nn.Module) -> None:
    """Reduce-scatter the gradient sums that micro-steps under ``set_requires_gradient_sync(False)`` left
    unsharded on each rank, as the next synced backward would have, and leave them as the sharded grads.

    FSDP2 keeps these sums on its own parameter records (no public call reduces them), so this reads them
    there: the mean over ranks of each full gradient, then this rank's dim-0 chunk (``torch.chunk``, the
    split FSDP2 shards by) added to the sharded parameter's gradient. As ``average_gradients`` does for
    DDP, the ranks first agree which parameters any of them has a gradient for (the others keep ``None``),
    so that every rank makes the same collectives.
    """
    records: list[tuple[Any, Any, torch.Tensor | None]] = []
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                held = fsdp_param.unsharded_accumulated_grad
                if held is None and hasattr(fsdp_param, "_unsharded_param"):
                    held = fsdp_param.unsharded_param.grad
                    fsdp_param.unsharded_param.grad = None
                fsdp_param.unsharded_accumulated_grad = None
                records.append((group, fsdp_param, held))
    if not records:
        return
    anyone = torch.tensor([float(held is not None) for _, _, held in records])
    dist.all_reduce(anyone)
    world, rank = dist.get_world_size(), dist.get_rank()
    for (group, fsdp_param, held), used in zip(records, anyone.tolist()):
        if used == 0:
            continue
        sharded: Any = fsdp_param.sharded_param
        dtype = group.mp_policy.reduce_dtype or torch.float32
        full = held.detach().to(dtype) if held is not None else torch.zeros(sharded.shape, dtype=dtype, device=sharded.device)
        dist.all_reduce(full)
        full.div_(world)
        chunks = torch.chunk(full, world, dim=0)
        local = chunks[rank] if rank < len(chunks) else full.new_zeros((0, *full.shape[1:]))
        local = local.to(sharded.dtype).contiguous()
        grad = DTensor.from_local(local, sharded.device_mesh, sharded.placements,
                                  shape=sharded.shape, stride=sharded.stride())  # fmt: skip
        sharded.grad = grad if sharded.grad is None else sharded.grad + grad
