"""DiT (``DiTTransformer2DModel``, class-conditional): VQ4DiT's own model family.

Quantized by default: the 7 core Linears of every block, the adaLN modulation ``norm1.linear``
included (the paper's set); never the per-block embedder copies ``norm1.emb.*``, the patch
embedding or the output head ``proj_out_*``. Called as ``model(x, timestep=t, class_labels=y)``.
"""

from __future__ import annotations

from diffusers import DiTTransformer2DModel
from torch import nn

from .base import Family, ModelInputs
from .conditioning import Batch, ClassLabels

DEFAULT_QUANTIZED_SUFFIXES = (
    "norm1.linear",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)
CLASS_LABELS = ClassLabels()


def dit_inputs(model: nn.Module, batch: Batch) -> ModelInputs:
    """``(x [B, C, H, W],), {timestep: t [B], class_labels: y [B]}`` of a ``(x, t, y)`` batch."""
    x, t, y = CLASS_LABELS.unpack(batch)
    return (x,), {"timestep": t, "class_labels": y}


DIT = Family(
    name="DiT",
    model_class=DiTTransformer2DModel,
    pipelines=("DiTPipeline",),
    conditioning=CLASS_LABELS,
    block_lists=("transformer_blocks",),
    block_linears=DEFAULT_QUANTIZED_SUFFIXES,
    inputs=dit_inputs,
)
_DEFAULT_FILTER = DIT.linear_filter()


def default_linear_filter(module: nn.Module, name: str) -> bool:
    """True for the 7 core ``nn.Linear`` layers of each block (VQ4DiT's quantized set).

    Selects ``transformer_blocks.<i>.<suffix>`` for the suffixes in
    :data:`DEFAULT_QUANTIZED_SUFFIXES`; never the per-block embedder copies ``norm1.emb.*``,
    the patch embedding or the output head ``proj_out_*``.

    Args:
        module: the candidate module.
        name: its fully qualified name in the ``DiTTransformer2DModel``.
    """
    return _DEFAULT_FILTER(module, name)
