"""Checkpoints written atomically and read without unpickling code."""

from __future__ import annotations

from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ..atomic import atomic_path


def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages in a nested dict / list (a checkpoint's least size)."""
    seen: dict[int, int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sum(seen.values())


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves go through :func:`vq4dit.atomic.atomic_path` (a full disk or
    a kill leaves the previous checkpoint whole, and a fault is one ``WriteError`` line) and whose
    loads always use ``weights_only=True`` (torch 2.4-2.5 default to unpickling arbitrary objects)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        with atomic_path(path, size=tensor_bytes(checkpoint)) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
