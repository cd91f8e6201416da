"""Seeding, and random-number-generator state as plain tensors, lists and numbers (loadable with
weights_only=True)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

_MAX_SEED = 2**32 - 1


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when initialised) CUDA generator states."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def get_generator_states(generators: list[torch.Generator]) -> list[torch.Tensor]:
    return [g.get_state() for g in generators]


def set_generator_states(generators: list[torch.Generator], states: list[torch.Tensor]) -> None:
    for g, s in zip(generators, states):
        g.set_state(s)


def seed_everything(seed: int) -> int:
    """Seed Python's ``random``, NumPy's global generator and torch on every device; return ``seed``.

    ``torch.manual_seed`` seeds the CPU generator and every accelerator's (all CUDA devices, queued until
    CUDA initialises). Call it once, before building the model and the loaders.

    Raises ``TypeError`` for a non-integer (``bool`` included) and ``ValueError`` outside
    ``[0, 2**32 - 1]`` (NumPy's range).

    Example::

        tk.seed_everything(0)
        model = MyTask()          # the same initial weights every run
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed_everything: seed must be an int, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed_everything: seed must be in [0, {_MAX_SEED}] (NumPy's range), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and all CUDA devices (lazily, if CUDA is not initialised yet)
    return seed
