"""Background checkpoint writes: ``AsyncWriter`` and ``snapshot``.

``snapshot`` copies a checkpoint dict with its tensors on the host, so that later training steps cannot
leak into a write; ``AsyncWriter`` runs one write at a time in a thread and reuses the host buffers of its
previous snapshot. Apart because it knows nothing of files or their contents: it copies tensors and runs
the callable it is given (the Checkpointer hands it a ``CheckpointStorage.write``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


def snapshot(obj: Any, copy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """A copy of a checkpoint dict whose tensors are fresh CPU copies (or ``copy(tensor)``): later training
    steps can't leak in."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True) if copy is None else copy(obj.detach())
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v, copy)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, copy) for v in obj)
    return obj


class AsyncWriter:
    """Runs one write at a time in a background thread; a failure re-raises at the next submit or wait.

    ``snapshot`` copies a checkpoint into host buffers kept from the previous snapshot (same shape and
    dtype, in the same order): a plain memcpy on the training thread, without the allocation and page
    faults that make fresh copies of a large state several times slower."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainkit-ckpt")
        self._pending: Future[Any] | None = None
        self._buffers: list[torch.Tensor] = []

    def snapshot(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Host copies of ``checkpoint``'s tensors. Waits for the previous write, whose buffers it reuses."""
        self.wait()
        previous, self._buffers = iter(self._buffers), []

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.layout != torch.strided:  # sparse and other layouts: a fresh copy, not cached
                return tensor.to("cpu", copy=True)
            buffer = next(previous, None)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty_like(tensor, device="cpu")
            buffer.copy_(tensor)
            self._buffers.append(buffer)
            return buffer

        return snapshot(checkpoint, copy)

    def submit(self, fn: Callable[[], Any]) -> None:
        self.wait()
        self._pending = self._executor.submit(fn)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._buffers = []
            self._executor.shutdown(wait=True)
