"""Exponential moving average of a module's weights, usable with or without the Trainer.

After every optimizer step, for each floating-point parameter::

    ema = decay * ema + (1 - decay) * param        # one fused torch._foreach_lerp_ over all of them

and every buffer (BatchNorm running stats, counters) is copied as is. Non-floating parameters are copied.

Where it must sit: build the EMA *after* moving the model to its device (the shadow copies live where the
weights live, and the update holds references to the parameter tensors, so a later ``model.to(...)``
that reallocates them would leave the EMA reading stale tensors), and from the *unwrapped* model, never a
``DistributedDataParallel`` wrapper (whose state-dict keys carry a ``module.`` prefix). Every DDP rank then
holds an identical EMA, because the parameters it reads are identical after each synchronised step.

Example::

    ema = EMA(model, decay=0.999)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        ema.update()
    evaluate(ema.module)
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch


def _is_sharded(t: torch.Tensor) -> bool:
    """A ``DTensor`` (FSDP). Looked up lazily: importing torch.distributed.tensor costs ~0.5 s, and no
    DTensor can exist before something else imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.to_local() if _is_sharded(t) else t for t in tensors]  # type: ignore[attr-defined]


class EMA:
    """A shadow copy of ``model`` whose floating-point parameters follow an exponential moving average.

    ``warmup=True`` uses ``decay_t = min(decay, (1 + t) / (10 + t))`` where ``t`` is the number of updates
    made before this one, so early averages are not dominated by the random initialisation.

    ``shadow``: the module to hold the average instead of a deep copy of ``model``: it must have the same
    parameter names, and start equal to ``model``. Under FSDP (``trainkit.fsdp.shard_from_rank0``) it is
    sharded like ``model``: each parameter is a ``DTensor`` and the update runs on the local shards only,
    so no rank communicates.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        decay: float = 0.999,
        warmup: bool = False,
        *,
        shadow: torch.nn.Module | None = None,
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay!r} is not valid; expected a number in [0, 1]")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.model = model
        self.module = (copy.deepcopy(model) if shadow is None else shadow).eval()
        self.module.requires_grad_(False)
        self._bind()

    def _bind(self) -> None:
        """Pair each shadow tensor with its live counterpart once, so ``update`` does no lookups."""
        live = dict(self.model.named_parameters())
        shadow = dict(self.module.named_parameters())
        float_pairs: list[tuple[torch.Tensor, torch.Tensor]] = [
            (shadow[n], p) for n, p in live.items() if p.is_floating_point() or p.is_complex()
        ]
        copy_pairs: list[tuple[torch.Tensor, torch.Tensor]] = [
            (shadow[n], p) for n, p in live.items() if not (p.is_floating_point() or p.is_complex())
        ]
        live_buffers = dict(self.model.named_buffers())
        copy_pairs += [(b, live_buffers[n]) for n, b in self.module.named_buffers()]
        self._ema_params = [s for s, _ in float_pairs]
        self._live_params = [p for _, p in float_pairs]
        self._copy_dst = [s for s, _ in copy_pairs]
        self._copy_src = [p for _, p in copy_pairs]
        self._sharded = any(_is_sharded(t) for t in self._ema_params + self._copy_dst)

    def current_decay(self) -> float:
        if self.warmup:
            t = self.num_updates
            return min(self.decay, (1 + t) / (10 + t))
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average; call after each optimizer step."""
        decay = self.current_decay()
        ema, live, dst, src = self._ema_params, self._live_params, self._copy_dst, self._copy_src
        if self._sharded:  # each rank averages its own shards; looked up each time (FSDP may swap them)
            ema, live, dst, src = _local(ema), _local(live), _local(dst), _local(src)
        if ema:
            torch._foreach_lerp_(ema, live, 1.0 - decay)
        if dst:
            torch._foreach_copy_(dst, src)
        self.num_updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Make the shadow an exact copy of the model's current weights."""
        for dst, src in zip(self._ema_params + self._copy_dst, self._live_params + self._copy_src):
            dst.copy_(src)
        self.num_updates = 0

    def state_dict(self) -> dict[str, Any]:
        """``state_dict`` holds the averaged module's own state dict: it loads into a fresh model."""
        return {"state_dict": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["state_dict"])
        self.num_updates = int(state["num_updates"])
