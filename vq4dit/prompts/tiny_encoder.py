"""The small text-encoding path of the shipped PixArt and MMDiT references (no ``transformers`` needed).

A word-level tokenizer over a fixed vocabulary and an encoder of one embedding per token plus a
learned position, layer-normalised: what the reference's captions ("a handwritten seven", "the
number 7") need, trained jointly with its transformer (``tools/train_pixart_reference.py``). Both
follow the call conventions of a pipeline's T5 tokenizer and encoder, so
:func:`vq4dit.prompts.encode.encode_prompts` runs them unchanged.

A folder holds ``config.json`` (``{"kind": "vq4dit-tiny-text-encoder", "vocabulary": [...],
"max_length": T, "channels": C}``, and ``"pooled": "mean"`` for an MMDiT's encoder: its pooled
embedding is :func:`mean_pool`) and ``model.safetensors``; a pipeline folder has it as
``text_encoder/``. Every prompt ends with the ``<end>`` token (T5's EOS): the empty prompt is
``<end>`` alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

KIND = "vq4dit-tiny-text-encoder"
PAD, END = "<pad>", "<end>"


class WordTokenizer:
    """Lower-cased words (punctuation dropped) -> ids of ``vocabulary``; called like a Hugging Face
    tokenizer: ``tokenizer(texts, padding="max_length", max_length=T, truncation=True,
    return_tensors="pt") -> {"input_ids": [B, T], "attention_mask": [B, T]}`` (int64)."""

    def __init__(self, vocabulary: list[str], max_length: int) -> None:
        if vocabulary[:2] != [PAD, END]:
            raise ValueError(f"the vocabulary must start with {PAD!r}, {END!r}")
        self.vocabulary, self.max_length = list(vocabulary), max_length
        self.ids = {word: index for index, word in enumerate(vocabulary)}

    def words(self, text: str) -> list[str]:
        """The words of ``text``; raises a ValueError naming a word outside the vocabulary."""
        words = re.sub(r"[^\w\s]", " ", text.lower()).split()
        unknown = [w for w in words if w not in self.ids or w in (PAD, END)]
        if unknown:
            known = " ".join(w for w in self.vocabulary[2:])
            raise ValueError(f"the prompt {text!r} has words outside this text encoder's vocabulary "
                             f"({', '.join(map(repr, unknown))}); it knows: {known}")
        return words

    def __call__(self, texts: list[str] | str, padding: str = "max_length", max_length: int | None = None,
                 truncation: bool = True, add_special_tokens: bool = True, return_tensors: str = "pt") -> dict:
        texts = [texts] if isinstance(texts, str) else texts
        length = max_length or self.max_length
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        mask = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.ids[w] for w in self.words(text)][: length - 1] + [self.ids[END]]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class TinyTextEncoder(nn.Module):
    """Token embedding + learned position, layer-normalised: ``[B, T]`` ids -> ``[B, T, C]``.

    Called like ``T5EncoderModel``: ``encoder(input_ids, attention_mask=mask)[0]`` is the last
    hidden state; padded positions are zeroed (the mask also travels to the transformer).
    ``pooled``: ``"mean"`` when the model also takes a pooled embedding (:func:`mean_pool`), else None.
    """

    def __init__(self, vocabulary_size: int, max_length: int, channels: int, pooled: str | None = None) -> None:
        super().__init__()
        if pooled not in (None, "mean"):
            raise ValueError(f"pooled must be None or 'mean', got {pooled!r}")
        self.max_length, self.pooled = max_length, pooled
        self.token = nn.Embedding(vocabulary_size, channels)
        self.position = nn.Parameter(torch.zeros(max_length, channels))
        self.norm = nn.LayerNorm(channels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        """``(embeddings [B, T, C],)`` of ``input_ids [B, T]`` (T at most ``max_length``)."""
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"this text encoder takes at most {self.max_length} tokens, got {length} "
                             f"(encode with --max-length {self.max_length})")
        hidden = self.norm(self.token(input_ids) + self.position[:length])
        if attention_mask is not None:
            hidden = hidden * attention_mask[..., None].to(hidden.dtype)
        return (hidden,)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The pooled embedding ``[B, C]`` of a tiny encoder's output ``hidden [B, T, C]``: the mean over
    the prompt's tokens (``attention_mask [B, T]``; the empty prompt: its ``<end>`` token)."""
    mask = attention_mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def is_tiny_encoder_folder(folder: str | Path) -> bool:
    """True when ``folder`` (a text encoder folder) holds a :class:`TinyTextEncoder`."""
    config = Path(folder) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("kind") == KIND
    except (OSError, ValueError):
        return False


def save_tiny_encoder(encoder: TinyTextEncoder, tokenizer: WordTokenizer, folder: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` of ``encoder`` to ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"kind": KIND, "vocabulary": tokenizer.vocabulary, "max_length": encoder.max_length,
              "channels": encoder.token.embedding_dim, **({"pooled": encoder.pooled} if encoder.pooled else {})}
    save_file({k: v.detach().float().contiguous() for k, v in encoder.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def load_tiny_encoder(folder: str | Path) -> tuple[WordTokenizer, TinyTextEncoder]:
    """``(tokenizer, encoder)`` of a folder written by :func:`save_tiny_encoder`, encoder in eval mode.

    Raises:
        ValueError: the folder is not such a text encoder or its weights do not load.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_tiny_encoder_folder(folder):
        raise ValueError(f"{folder} is not a vq4dit tiny text encoder (config.json with kind {KIND!r})")
    config = json.loads((folder / "config.json").read_text())
    tokenizer = WordTokenizer(config["vocabulary"], config["max_length"])
    try:
        encoder = TinyTextEncoder(len(config["vocabulary"]), config["max_length"], config["channels"], config.get("pooled"))
    except (KeyError, ValueError) as error:
        raise ValueError(f"{folder}/config.json is not a tiny text encoder's config: {error}") from None
    try:
        encoder.load_state_dict(load_file(str(folder / "model.safetensors")))
    except (OSError, SafetensorError, RuntimeError) as error:
        raise ValueError(f"cannot load the text encoder weights in {folder}: {error}") from None
    return tokenizer, encoder.eval().requires_grad_(False)
