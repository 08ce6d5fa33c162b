"""FLUX.1 (``FluxTransformer2DModel``: MMDiT double blocks, then single blocks; rectified flow;
guidance-distilled).

Blocks: the ``transformer_blocks`` (``FluxTransformerBlock``, both streams) then the
``single_transformer_blocks`` (``FluxSingleTransformerBlock``, one joint sequence); every block
returns ``(encoder_hidden_states, hidden_states)``, the block loss averages over both
(:mod:`vq4dit.engine.losses`); the hooks record each block's inputs with its keyword arguments
(``temb``, ``image_rotary_emb``). Quantized by default, per double block: the joint attention
``attn.to_q/k/v``, ``attn.add_q/k/v_proj``, ``attn.to_out.0``, ``attn.to_add_out`` and both MLPs
``ff.*``, ``ff_context.*``; per single block: ``attn.to_q/k/v``, ``proj_mlp``, ``proj_out``; and, as
VQ4DiT quantizes DiT's adaLN, the modulation ``norm1.linear`` / ``norm1_context.linear`` /
``norm.linear`` (``quantize_modulation: false`` keeps them FP). Measured on a tiny random FLUX.1-dev
(``tests/test_flux.py``, k=16, d=2: 2 bits) after ``train.py fit``, relative output error 0.027 with
them quantized vs 0.025 FP: a small price for 2 bits instead of 16 on a third of a double block's
weights and a fifth of a single block's. ``x_embedder``, ``context_embedder``, ``time_text_embed``, ``norm_out`` and
``proj_out`` stay FP; qk-norm is RMSNorm.

Called as ``FluxPipeline`` calls it. Items hold unpacked latents ``x [B, C, H, W]`` (C =
``in_channels / 4``); the call packs them into 2x2 tokens ``[B, H W / 4, 4 C]`` with their RoPE ids
(``img_ids [H W / 4, 3]`` = (0, row, column), ``txt_ids [T, 3]`` zeros), gives ``timestep = t / 1000``
(sigma), ``guidance [B]`` (the guidance scale, FLUX.1-dev's ``guidance_embeds``; None for
FLUX.1-schnell) and unpacks the output. No negative prompt, no two-branch guidance. Sampled as the
pipeline samples: ``linspace(1, 1/S, S)`` sigmas, shifted by the image's token count (``mu``,
dynamic shifting) for a guidance-embedding model, else (schnell's scheduler) shift 1; latents of
``sample_size`` (the transformer config's, when it has one; else ``FluxPipeline``'s 128: 1024 px).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from ..flow_matching import FlowMatchSampler, dynamic_flow_schedule, image_seq_shift
from .base import Family, ModelInputs
from .conditioning import Batch, DistilledTextPrompts

DOUBLE_LINEARS = (
    *(f"attn.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                  "to_add_out")),
    *(f"{mlp}.net.{i}" for mlp in ("ff", "ff_context") for i in ("0.proj", "2")),
)
SINGLE_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear")  # double, double, single
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 128 latents, 1024 px


def pack(x: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, C, H, W]`` -> 2x2 tokens ``[B, H W / 4, 4 C]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """2x2 tokens ``[B, H W / 4, 4 C]`` -> latents ``[B, C, H, W]`` (``FluxPipeline._unpack_latents``)."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """RoPE ids ``[H W / 4, 3]`` of the tokens of ``H x W`` latents: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_inputs(model: nn.Module, batch: Batch) -> ModelInputs:
    """The call of a batch ``{x [B, C, H, W], t [B] (1000 sigma), prompt_embeds [B, T, C'],
    pooled_prompt_embeds [B, P], guidance [B]}`` (``guidance``: guidance-embedding models only)."""
    x, embeds = batch["x"], batch["prompt_embeds"]
    guidance = None
    if model.config.guidance_embeds:
        if "guidance" not in batch:
            raise ValueError(f"a Flux model with guidance_embeds needs the guidance scale: a batch with 'guidance' [B], "
                             f"got keys {sorted(batch)}")
        guidance = batch["guidance"]
    return (), {"hidden_states": pack(x), "timestep": batch["t"] / 1000, "guidance": guidance,
                "pooled_projections": batch["pooled_prompt_embeds"], "encoder_hidden_states": embeds,
                "txt_ids": torch.zeros(embeds.shape[1], 3, device=x.device, dtype=embeds.dtype),
                "img_ids": image_ids(*x.shape[-2:], x.device, x.dtype)}


def flux_output(model: nn.Module, batch: Batch, sample: torch.Tensor) -> torch.Tensor:
    """The velocity tokens ``[B, H W / 4, 4 C]`` as latents ``[B, C, H, W]`` of the batch's ``x``."""
    return unpack(sample, *batch["x"].shape[-2:])


@dataclass(frozen=True)
class FluxSampler(FlowMatchSampler):
    """``FluxPipeline``'s Euler sampling: dynamic shifting for guidance-embedding models (dev), the
    static ``shift`` otherwise (schnell's scheduler: 1)."""

    shift: float = 1.0

    def latent_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """``(in_channels / 4, S, S)``, ``S`` the config's ``sample_size`` if it has one, else 128."""
        side = model.config.get("sample_size") or DEFAULT_SAMPLE_SIZE
        if side % 2:
            raise ValueError(f"a Flux model's latents pack into 2x2 tokens: sample_size must be even, got {side}")
        return model.config.in_channels // 4, side, side

    def schedule(self, model: nn.Module, num_steps: int, train_steps: int,
                 shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`dynamic_flow_schedule`: ``mu`` of ``H W / 4`` tokens for a guidance-embedding model
        (dev), else the static ``shift`` (schnell)."""
        mu = image_seq_shift(shape[1] * shape[2] // 4) if model.config.guidance_embeds else None
        return dynamic_flow_schedule(num_steps, mu, self.shift, train_steps)


FLUX = Family(
    name="Flux",
    model_class=FluxTransformer2DModel,
    pipelines=("FluxPipeline",),
    conditioning=DistilledTextPrompts(),
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    block_linears=(*DOUBLE_LINEARS, *SINGLE_LINEARS),
    inputs=flux_inputs,
    block_options={"quantize_modulation": MODULATION},
    default_options={"quantize_modulation": True},
    sampler=FluxSampler(),
    text_channels={"prompt_embeds": "joint_attention_dim", "pooled_prompt_embeds": "pooled_projection_dim"},
    output=flux_output,
)
