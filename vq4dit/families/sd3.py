"""SD3 / SD3.5 (``SD3Transformer2DModel``: MMDiT, joint image-text attention, rectified flow).

Blocks: ``transformer_blocks`` of ``JointTransformerBlock``; each returns both streams
``(encoder_hidden_states, hidden_states)``, the last (``context_pre_only``) ``(None, hidden_states)``:
the block loss averages over the streams a block returns (:mod:`vq4dit.engine.losses`).
Quantized by default, per block: the joint attention ``attn.to_q/k/v``, ``attn.add_q/k/v_proj``,
``attn.to_out.0``, ``attn.to_add_out`` (absent in the last block), both MLPs ``ff.*`` and
``ff_context.*`` (absent in the last block) and SD3.5's second image attention ``attn2.*`` (the
``dual_attention_layers``) and, as VQ4DiT quantizes DiT's adaLN, the modulation Linears
``norm1.linear`` / ``norm1_context.linear``: a third of the block weights (FP they would cost 16
bits each); the option ``quantize_modulation: false`` keeps them FP. Measured on tiny random
models at k=16, d=2 (2 bits), relative output error with them quantized vs FP: k-means init 0.029
vs 0.025 (SD3), 0.020 vs 0.016 (SD3.5-style); after ``train.py fit`` (SD3.5-style, 3 epochs) 0.021
vs 0.017: a small price for 2 bits instead of 16 on a third of the weights. ``pos_embed``,
``context_embedder``, ``time_text_embed``, ``norm_out`` and ``proj_out`` stay FP. qk-norm (SD3.5)
is RMSNorm, nothing to quantize. Called as ``StableDiffusion3Pipeline`` calls it:
``model(x, encoder_hidden_states=, pooled_projections=, timestep=)`` (no attention mask: the
file's masks are not used); sampled with flow matching with its pipeline's scheduler shift (recorded
when a folder is loaded: ``scheduler/scheduler_config.json``; the shipped ``mmdit_reference``: 1),
else 3 (SD3 and SD3.5 scheduler configs).
"""

from __future__ import annotations

from diffusers import SD3Transformer2DModel
from torch import nn

from ..flow_matching import FlowMatchSampler
from .base import Family, ModelInputs
from .conditioning import Batch, PooledTextPrompts

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
JOINT_LINEARS = (
    *(f"attn.{name}" for name in (*ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")),
    *(f"{mlp}.net.{i}" for mlp in ("ff", "ff_context") for i in ("0.proj", "2")),
    *(f"attn2.{name}" for name in ATTENTION),
)
MODULATION = ("norm1.linear", "norm1_context.linear")
SD3_SHIFT = 3.0  # scheduler_config.json "shift" of SD3-medium, SD3.5-medium and SD3.5-large: the fallback


def sd3_inputs(model: nn.Module, batch: Batch) -> ModelInputs:
    """The call of a pooled text batch ``{x [B, C, H, W], t [B], prompt_embeds [B, T, C'],
    pooled_prompt_embeds [B, P]}``."""
    return (batch["x"],), {"encoder_hidden_states": batch["prompt_embeds"],
                           "pooled_projections": batch["pooled_prompt_embeds"], "timestep": batch["t"]}


SD3 = Family(
    name="SD3",
    model_class=SD3Transformer2DModel,
    pipelines=("StableDiffusion3Pipeline",),
    conditioning=PooledTextPrompts(),
    block_lists=("transformer_blocks",),
    block_linears=JOINT_LINEARS,
    inputs=sd3_inputs,
    block_options={"quantize_modulation": MODULATION},
    default_options={"quantize_modulation": True},
    sampler=FlowMatchSampler(SD3_SHIFT),
    text_channels={"prompt_embeds": "joint_attention_dim", "pooled_prompt_embeds": "pooled_projection_dim"},
)
