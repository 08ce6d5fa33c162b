"""Flux (FLUX.1-dev / -schnell) prompt embeddings, as ``FluxPipeline.encode_prompt`` builds them.

Two encoders: CLIP-L (``tokenizer`` / ``text_encoder``, a ``CLIPTextModel``), padded and truncated
to its tokenizer's ``model_max_length`` (77), whose ``pooler_output`` is the pooled embedding
(``[768]``), and T5-XXL (``tokenizer_2`` / ``text_encoder_2``) to ``max_length`` tokens (512, the
pipeline's ``max_sequence_length``; FLUX.1-schnell is run with 256), whose last hidden state is the
prompt embedding (``[512, 4096]``). No encoder sees an attention mask; the file's mask is all ones.
Prompts are encoded as written. There is no negative prompt: FLUX.1 is guidance-distilled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .sd3_encoder import model_index

FLUX_MAX_LENGTH = 512  # FluxPipeline's max_sequence_length (T5 tokens)
FLUX_PARTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))  # CLIP-L, T5


@dataclass
class FluxEncoders:
    """The CLIP-L and T5 tokenizers and encoders of a Flux pipeline."""

    clip_tokenizer: Callable
    clip_encoder: torch.nn.Module
    t5_tokenizer: Callable
    t5_encoder: torch.nn.Module


def load_flux_encoders(pipeline: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> FluxEncoders:
    """The encoders of a Flux pipeline folder or hub id, in eval mode on ``device``.

    Raises:
        ValueError: an encoder missing from the pipeline, or an unloadable part.
        ImportError: no ``transformers``.
    """
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    index = model_index(pipeline) or {}
    absent = [name for name in sum(FLUX_PARTS, ()) if name in index and index[name][0] is None]
    if absent:
        raise ValueError(f"the Flux pipeline {pipeline} has no {', '.join(absent)} (model_index.json): the prompts need "
                         "its CLIP and T5 encoders; give a full pipeline (--pipeline, or --data.text_encoder) or "
                         "--data.prompt_embeds FILE")
    loaded: list[Any] = []
    for (tokenizer, encoder), model_class in zip(FLUX_PARTS, (CLIPTextModel, T5EncoderModel)):
        try:
            loaded.append(AutoTokenizer.from_pretrained(pipeline, subfolder=tokenizer))
            loaded.append(model_class.from_pretrained(pipeline, subfolder=encoder, torch_dtype=dtype).to(device).eval())
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load the {tokenizer} / {encoder} of {pipeline}: {' '.join(str(error).split())}") from None
    return FluxEncoders(*loaded)


@torch.no_grad()
def encode_flux(encoders: FluxEncoders, texts: list[str], max_length: int = FLUX_MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds [B, max_length, C], pooled_prompt_embeds [B, P])`` of ``texts``, float32 on
    the CPU (C: T5's width = ``joint_attention_dim``, P: CLIP's width = ``pooled_projection_dim``)."""
    device = next(encoders.clip_encoder.parameters()).device
    clip_length = encoders.clip_tokenizer.model_max_length  # the pipeline's tokenizer_max_length (77)
    ids = encoders.clip_tokenizer(texts, padding="max_length", max_length=clip_length, truncation=True,
                                  return_tensors="pt").input_ids
    pooled = encoders.clip_encoder(ids.to(device), output_hidden_states=False).pooler_output.float()
    ids = encoders.t5_tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt").input_ids
    t5 = encoders.t5_encoder(ids.to(device), output_hidden_states=False)[0].float()  # no attention mask, as the pipeline
    return t5.cpu(), pooled.cpu()
