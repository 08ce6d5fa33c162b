"""SD3 / SD3.5 prompt embeddings, as ``StableDiffusion3Pipeline.encode_prompt`` builds them.

Three encoders: CLIP-L (``tokenizer`` / ``text_encoder``), CLIP-G (``tokenizer_2`` /
``text_encoder_2``), both ``CLIPTextModelWithProjection`` s padded and truncated to the first CLIP
tokenizer's ``model_max_length`` (77), and T5-XXL (``tokenizer_3`` / ``text_encoder_3``) to
``max_length`` tokens (256, the pipeline's ``max_sequence_length``). A prompt's embedding is the
two CLIPs' penultimate hidden states concatenated along the channels (768 + 1280 = 2048) and zero-
padded to T5's width (4096), then T5's last hidden state appended along the tokens: ``[77 + 256,
4096]``; its pooled embedding is the two CLIPs' ``text_embeds`` concatenated (``[2048]``). A pipeline
saved without T5 (``text_encoder_3`` null) has zeros there, as the pipeline does. No encoder sees
an attention mask and the file's masks are all ones (SD3's transformer takes none). Prompts are
encoded as written (SD3's pipeline neither lower-cases nor cleans them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

SD3_MAX_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length (T5 tokens)
CLIP_PARTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
T5_PART = ("tokenizer_3", "text_encoder_3")


@dataclass
class SD3Encoders:
    """The three tokenizers and encoders of an SD3 pipeline (T5's None when it was saved without)."""

    clip_tokenizers: tuple[Callable, Callable]
    clip_encoders: tuple[torch.nn.Module, torch.nn.Module]
    t5_tokenizer: Callable | None
    t5_encoder: torch.nn.Module | None
    joint_width: int  # T5's width = the transformer's joint_attention_dim (4096)


def model_index(pipeline: str) -> dict[str, Any] | None:
    """A pipeline's ``model_index.json``: a folder's, or a hub id's when it is in the local cache."""
    folder = Path(pipeline).expanduser()
    if folder.is_dir():
        path = folder / "model_index.json"
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(pipeline, "model_index.json", local_files_only=True))
        except Exception:  # not a valid id, not cached: the caller decides by the name
            return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_sd3_encoders(pipeline: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> SD3Encoders:
    """The encoders of an SD3 pipeline folder or hub id, in eval mode on ``device``.

    Raises:
        ValueError: a CLIP missing from the pipeline, or an unloadable part.
        ImportError: no ``transformers``.
    """
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    index = model_index(pipeline) or {}
    absent = [name for name in (*sum(CLIP_PARTS, ()), *T5_PART) if name in index and index[name][0] is None]
    if any(name not in T5_PART for name in absent):
        raise ValueError(f"the SD3 pipeline {pipeline} has no {', '.join(absent)} (model_index.json): the prompts need "
                         "its CLIP encoders; give a full pipeline (--pipeline, or --data.text_encoder) or "
                         "--data.prompt_embeds FILE")

    def load(tokenizer: str, encoder: str, model_class: Any) -> tuple[Callable, torch.nn.Module]:
        try:
            found = AutoTokenizer.from_pretrained(pipeline, subfolder=tokenizer)
            model = model_class.from_pretrained(pipeline, subfolder=encoder, torch_dtype=dtype)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load the {tokenizer} / {encoder} of {pipeline}: {' '.join(str(error).split())}") from None
        return found, model.to(device).eval()

    clips = [load(*part, CLIPTextModelWithProjection) for part in CLIP_PARTS]
    t5 = (None, None) if T5_PART[1] in absent else load(*T5_PART, T5EncoderModel)
    if t5[1] is not None:
        width = t5[1].config.d_model
    else:
        from diffusers import SD3Transformer2DModel

        width = SD3Transformer2DModel.load_config(pipeline, subfolder="transformer")["joint_attention_dim"]
    return SD3Encoders((clips[0][0], clips[1][0]), (clips[0][1], clips[1][1]), t5[0], t5[1], width)


@torch.no_grad()
def encode_sd3(encoders: SD3Encoders, texts: list[str], max_length: int = SD3_MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds [B, L + max_length, C], pooled_prompt_embeds [B, P])`` of ``texts``, float32
    on the CPU (L: the CLIP length, C: T5's width, P: the CLIP projections' sum)."""
    device = next(encoders.clip_encoders[0].parameters()).device
    clip_length = encoders.clip_tokenizers[0].model_max_length  # the pipeline's tokenizer_max_length, both CLIPs
    hidden, pooled = [], []
    for tokenizer, encoder in zip(encoders.clip_tokenizers, encoders.clip_encoders):
        ids = tokenizer(texts, padding="max_length", max_length=clip_length, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2].float())  # [B, L, C_clip]: the penultimate layer
        pooled.append(out[0].float())  # text_embeds [B, P_clip]
    clip = torch.cat(hidden, dim=-1)
    if clip.shape[-1] > encoders.joint_width:
        raise ValueError(f"the CLIP encoders' widths ({clip.shape[-1]}) exceed T5's ({encoders.joint_width})")
    clip = torch.nn.functional.pad(clip, (0, encoders.joint_width - clip.shape[-1]))
    if encoders.t5_encoder is None:
        t5 = clip.new_zeros(len(texts), max_length, encoders.joint_width)
    else:
        ids = encoders.t5_tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                    add_special_tokens=True, return_tensors="pt").input_ids
        t5 = encoders.t5_encoder(ids.to(device))[0].float()  # no attention mask, as the pipeline
    return torch.cat([clip, t5], dim=-2).cpu(), torch.cat(pooled, dim=-1).cpu()

