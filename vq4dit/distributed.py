"""Distributed calibration: averaging the VQ gradients DDP cannot sync, and spreading DiT blocks
over DDP ranks (``CalibrationModule(spread_blocks=True)``). No Lightning here.

Plain DDP splits the data: codebooks and ratio logits change shape and trainability during
calibration, which DDP's fixed gradient buckets cannot follow, so DDP ignores them and
:meth:`vq4dit.engine.Calibrator.average_gradients_` all-reduces their gradients after each backward.

With ``block_inputs="teacher"`` every block's loss depends only on that block's VQ layers, so rank
``r`` of ``W`` can calibrate just the blocks it owns, on *all* calibration items, and still do
exactly what one process does. Block ``b`` belongs to rank ``b % W`` (round robin: DiT blocks are
identical in size, so every rank gets ``L / W`` blocks, +-1, for any ``L`` and ``W``). VQ layers
outside the blocks (only with a custom ``include``) belong to rank 0.

Between the few points where every rank needs the whole student (checkpoints, samples, the final
export), a rank's copy of the blocks it does not own is stale; :meth:`BlockSpread.share_` then
broadcasts every layer's VQ state and optimizer state from its owner. Sizes change during
calibration (soft rows harden, candidates are pruned), so the owners first publish the sizes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .layers import VQLinear

from .quantize import vq_layers
from .models import block_modules

# The Parameters of a VQLinear that the optimizer holds (and keeps state for).
_OPTIMIZED = ("codebook", "bias", "candidate_logits", "row_scales")


def layer_blocks(student: nn.Module) -> dict[str, int | None]:
    """Block index of every VQ layer of ``student`` (None for layers outside the blocks)."""
    owner_block = {}
    for index, block in enumerate(block_modules(student)):
        owner_block.update({id(layer): index for layer in vq_layers(block).values()})
    return {name: owner_block.get(id(layer)) for name, layer in vq_layers(student).items()}


def _tensor_bytes(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The raw bytes of ``tensor`` as a flat uint8 tensor on ``device`` (any dtype, any shape)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).to(device)


class BlockSpread:
    """Which rank calibrates which block, plus the collectives that keep ranks in agreement.

    Args:
        layer_blocks: VQ layer name -> block index (None: outside the blocks), as :func:`layer_blocks`.
        num_blocks: L, the number of DiT blocks.
        rank: this process's global rank.
        world_size: W, the number of processes.
    """

    def __init__(self, layer_blocks: dict[str, int | None], num_blocks: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.layer_blocks = dict(layer_blocks)
        self.num_blocks, self.rank, self.world_size = num_blocks, rank, world_size
        self.owned_blocks = [b for b in range(num_blocks) if self.block_owner(b) == rank]

    @classmethod
    def for_student(cls, student: nn.Module, rank: int, world_size: int) -> "BlockSpread":
        """The round-robin spread of ``student``'s blocks over ``world_size`` ranks."""
        return cls(layer_blocks(student), len(block_modules(student)), rank, world_size)

    def block_owner(self, block: int) -> int:
        return block % self.world_size

    def layer_owner(self, name: str) -> int:
        block = self.layer_blocks[name]
        return 0 if block is None else self.block_owner(block)

    def owns_layer(self, name: str) -> bool:
        return self.layer_owner(name) == self.rank

    # --------------------------------------------------------------------------- collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (a new tensor). Ranks put zeros where they own nothing, so
        every entry is one owner's value plus exact zeros: bit-identical to that value."""
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def gather_cat(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks (rank order) of 1-D tensors of any lengths, on the CPU."""
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, local.detach().cpu())
        return torch.cat(parts)

    @torch.no_grad()
    def share_(self, layers: dict[str, VQLinear], optimizer: torch.optim.Optimizer | None, device: torch.device) -> None:
        """Give every rank every layer's current VQ state and optimizer state, from its owner.

        Collective: all ranks call it at the same point. Afterwards all ranks hold the same
        student and the same optimizer state (as one process would), so rank 0 can write a
        complete checkpoint or the packed model, and a resumed run (any number of processes)
        starts from a complete state. ``device``: where the bytes travel (the module's device,
        CUDA under NCCL); optimizer state kept on the CPU (e.g. step counters) returns there.
        """
        mine = {name: _payload(layer, optimizer) for name, layer in layers.items() if self.owns_layer(name)}
        published: list[Any] = [None] * self.world_size
        dist.all_gather_object(published, {name: _describe(payload) for name, payload in mine.items()})
        described = {name: meta for part in published for name, meta in part.items()}
        for name, layer in layers.items():  # the same order on every rank
            owner, meta = self.layer_owner(name), described[name]
            size = sum(entry[3] for entry in meta.values() if entry[0] == "tensor")
            if owner == self.rank:
                if size:
                    flat = [_tensor_bytes(v, device) for v in mine[name].values() if torch.is_tensor(v)]
                    dist.broadcast(torch.cat(flat), src=owner)
                continue
            received = torch.empty(size, dtype=torch.uint8, device=device)
            if size:
                dist.broadcast(received, src=owner)
            _install_(layer, optimizer, _unpack(meta, received, device))


# ------------------------------------------------------------------------------------ payloads
def _payload(layer: VQLinear, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``layer.<key>``: the layer's state dict; ``optim.<param>.<key>``: optimizer state per Parameter."""
    payload: dict[str, Any] = {f"layer.{k}": v for k, v in layer.state_dict().items()}
    if optimizer is not None:
        for param_name in _OPTIMIZED:
            param = getattr(layer, param_name)
            for key, value in (optimizer.state.get(param, {}) if param is not None else {}).items():
                payload[f"optim.{param_name}.{key}"] = value
    return payload


def _describe(payload: dict[str, Any]) -> dict[str, tuple]:
    """``("tensor", shape, dtype, nbytes, on_cpu)`` per tensor, ``("value", value)`` otherwise."""
    return {
        key: ("tensor", tuple(v.shape), v.dtype, v.numel() * v.element_size(), v.device.type == "cpu")
        if torch.is_tensor(v) else ("value", v)
        for key, v in payload.items()
    }


def _unpack(meta: dict[str, tuple], flat: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Rebuild a payload from its description and its broadcast bytes (in description order)."""
    payload, offset = {}, 0
    for key, entry in meta.items():
        if entry[0] == "value":
            payload[key] = entry[1]
            continue
        _, shape, dtype, nbytes, on_cpu = entry
        chunk = flat[offset : offset + nbytes].clone()  # own storage: aligned for any dtype view
        offset += nbytes
        payload[key] = chunk.view(dtype).reshape(shape).to("cpu" if on_cpu else device)
    return payload


def _install_(layer: VQLinear, optimizer: torch.optim.Optimizer | None, payload: dict[str, Any]) -> None:
    """Load a received payload into ``layer`` and into ``optimizer`` (new Parameters replace the old
    ones in its groups: soft sizes may have changed, and ``_load_from_state_dict`` resizes)."""
    before = {name: getattr(layer, name) for name in _OPTIMIZED}
    layer.load_state_dict({k[len("layer."):]: v for k, v in payload.items() if k.startswith("layer.")})
    if optimizer is None:
        return
    for param_name in _OPTIMIZED:
        old, new = before[param_name], getattr(layer, param_name)
        if new is None:
            continue
        tracked = False
        for group in optimizer.param_groups:
            for index, param in enumerate(group["params"]):
                if param is old:
                    group["params"][index], tracked = new, True
        if not tracked:  # not optimised by this optimizer: keep no state for it
            continue
        optimizer.state.pop(old, None)
        prefix = f"optim.{param_name}."
        state = {k[len(prefix):]: v for k, v in payload.items() if k.startswith(prefix)}
        if state:
            optimizer.state[new] = state


def ddp_ignored(layers: dict[str, VQLinear], prefix: str, spread: bool) -> list[str]:
    """Names DDP must not sync: codebooks and ratio logits change shape and trainability during
    calibration, which DDP's fixed buckets cannot follow (their gradients are averaged by
    :meth:`vq4dit.engine.Calibrator.average_gradients_`); with a spread, owners train their blocks
    alone, so no tensor of a VQ layer is synced (biases neither)."""
    tensors = ("codebook", "row_scales", "candidate_logits", "codes", "soft_rows", "candidates") + (("bias",) if spread else ())
    return [f"{prefix}{name}.{t}" for name, layer in layers.items() for t in tensors if getattr(layer, t, None) is not None]
