"""PixArt-α / PixArt-Σ (``PixArtTransformer2DModel``, text-conditioned through cross-attention).

Quantized by default: the 10 Linears of every block (self-attention ``attn1``, cross-attention
``attn2``, the MLP ``ff``). The global ``adaln_single`` (its ``linear`` with the option
``quantize_adaln``), the caption projection, the patch embedding and ``proj_out`` stay FP.
Called as the pipelines call it: ``model(x, encoder_hidden_states=, encoder_attention_mask=,
timestep=, added_cond_kwargs=)``; the micro-conditions (image size and aspect ratio) only for a
model with ``use_additional_conditions`` (PixArt-α 1024: ``PixArtAlphaPipeline`` passes them when
``sample_size == 128``, the model's own default for that flag; PixArt-Σ passes None).
"""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel
from torch import nn

from .base import Family, ModelInputs
from .conditioning import TextPrompts

VAE_SCALE = 8  # pixels per latent along a side: the micro-conditions are in pixels (PixArt's VAE)


def micro_conditions(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """``added_cond_kwargs``: ``resolution [B, 2]`` (height, width in pixels) and ``aspect_ratio
    [B, 1]`` of latents ``x [B, C, H, W]`` when the model uses them, else both None."""
    if not getattr(model, "use_additional_conditions", False):
        return {"resolution": None, "aspect_ratio": None}
    height, width = (side * VAE_SCALE for side in x.shape[-2:])
    size = torch.tensor([[height, width]], dtype=dtype, device=x.device).repeat(x.shape[0], 1)
    ratio = torch.tensor([[height / width]], dtype=dtype, device=x.device).repeat(x.shape[0], 1)
    return {"resolution": size, "aspect_ratio": ratio}


def pixart_inputs(model: nn.Module, batch) -> ModelInputs:
    """The call of a text batch ``{x [B, C, H, W], t [B], prompt_embeds [B, T, C'],
    prompt_attention_mask [B, T]}``."""
    embeds = batch["prompt_embeds"]
    return (batch["x"],), {
        "encoder_hidden_states": embeds,
        "encoder_attention_mask": batch["prompt_attention_mask"],
        "timestep": batch["t"],
        "added_cond_kwargs": micro_conditions(model, batch["x"], embeds.dtype),
    }


PIXART = Family(
    name="PixArt",
    model_class=PixArtTransformer2DModel,
    pipelines=("PixArtSigmaPipeline", "PixArtAlphaPipeline"),
    conditioning=TextPrompts(),
    block_lists=("transformer_blocks",),
    block_linears=tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0"))
    + ("ff.net.0.proj", "ff.net.2"),
    inputs=pixart_inputs,
    options={"quantize_adaln": ("adaln_single.linear",)},
    text_channels={"prompt_embeds": "caption_channels"},
)
