"""A prompt text file -> a ``--data.prompt_embeds`` safetensors file, with a pipeline's tokenizers and
text encoders (the optional extra ``pip install 'vq4dit[text]'``: ``transformers``)::

    python -m vq4dit.prompts encode --pipeline FOLDER_OR_HUB_ID --prompts prompts.txt --out embeds.safetensors

The pipeline's class says how: a folder's ``model_index.json`` ``_class_name``, a hub id's (when
cached) or its name (``stable-diffusion-3`` in it: SD3). ``StableDiffusion3Pipeline``: as its
``encode_prompt`` (two CLIPs and T5, pooled embeddings, all-ones masks; ``--max-length`` is T5's,
default 256: :mod:`.sd3_encoder`). ``FluxPipeline``: as its ``encode_prompt`` (CLIP-L's pooled output
and T5's last hidden state, ``--max-length`` T5's, default 512: :mod:`.flux_encoder`), three keys
and no negative prompt (a ``--negative-prompt`` is one error: FLUX.1 has no unconditional branch).
Any other (PixArt's pipelines, the shipped tiny encoder): as
PixArt's pipelines encode a prompt: the tokenizer pads and truncates to ``--max-length`` tokens
(PixArt-Σ: 300, PixArt-α: 120), the encoder's last hidden state is the embedding, the attention
mask comes along. The negative prompt (default empty) is encoded the same way;
a mean-pooled tiny encoder (``mmdit_reference``) adds the pooled keys (the mean over tokens). PixArt's captions
are lower-cased and stripped as its pipelines do even with ``clean_caption=False`` (T5's tokenizer
is case-sensitive: "A red circle" and "a red circle" are other embeddings); ``--keep-case``
encodes them as written (SD3's and Flux's always are). The optional caption cleaning (``clean_caption=True``,
which needs ``bs4`` and ``ftfy``) is not applied. A pipeline of a pooled family with no encoder
here yet is one error. The output file
carries a key (sha256 of the prompts, the negative prompt, the settings and the encoder: its
files' names, sizes and modification times for a folder, the id for a hub id): a second run
with the same key finds the file and does nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..families import FAMILIES, PooledTextPrompts
from . import CLASSES_FIELD, DISTILLED_KEYS, KEYS, POOLED_KEYS, POOLED_PIPELINES
from .flux_encoder import FLUX_MAX_LENGTH, encode_flux, load_flux_encoders
from .sd3_encoder import SD3_MAX_LENGTH, encode_sd3, load_sd3_encoders, model_index
from .tiny_encoder import TinyTextEncoder, is_tiny_encoder_folder, load_tiny_encoder, mean_pool

KEY_FIELD = "vq4dit_prompts_key"
SHIPPED_PIPELINES = {name: Path(__file__).resolve().parents[1] / "assets" / name
                     for name in ("pixart_reference", "mmdit_reference")}
"""Names of shipped pipeline folders with their own text encoder (no ``transformers`` needed)."""
DEFAULT_MAX_LENGTH = 300  # PixArt-Σ; a tiny encoder's own length otherwise
MISSING_TRANSFORMERS = ("python -m vq4dit.prompts encode needs the transformers package (the text encoder): "
                        "pip install 'vq4dit[text]'")


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file: one a line, blank lines skipped.

    Raises:
        ValueError: the file is missing, unreadable or holds no prompt.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the prompts {path}: {error}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"the prompts file {path} holds no prompt (one prompt a line)")
    return prompts


def pipeline_folder(pipeline: str) -> Path:
    """The folder of ``pipeline``: a shipped name (``pixart_reference``) or the path as given."""
    return SHIPPED_PIPELINES.get(pipeline, Path(pipeline).expanduser())


def encoder_identity(pipeline: str) -> str:
    """What the cache key knows of an encoder: a local pipeline's ``tokenizer/`` and ``text_encoder/``
    files (relative name, size, mtime), or the hub id itself."""
    folder = pipeline_folder(pipeline)
    if not folder.is_dir():
        return f"hub:{pipeline}"
    subfolders = [f"{part}{suffix}" for part in ("tokenizer", "text_encoder") for suffix in ("", "_2", "_3")]  # SD3: 3 of each
    files = sorted(p for sub in subfolders for p in (folder / sub).rglob("*") if p.is_file())
    return json.dumps([(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def prompts_key(prompts: list[str], negative: str, max_length: int, dtype: str, pipeline: str) -> str:
    """The sha256 (hex) that names one encoding: prompts, negative prompt, settings, encoder."""
    record = {"prompts": prompts, "negative": negative, "max_length": max_length, "dtype": dtype,
              "encoder": encoder_identity(pipeline)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def stored_key(path: str | Path) -> str | None:
    """The key an earlier run wrote into ``path`` (None: no file, not ours, unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(KEY_FIELD)
    except (OSError, SafetensorError, ValueError):
        return None


def load_text_encoder(pipeline: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(tokenizer, text_encoder)`` of a (PixArt) pipeline folder or hub id (subfolders ``tokenizer/`` and
    ``text_encoder/``), the encoder in eval mode on ``device``. A ``text_encoder/`` holding a vq4dit
    tiny encoder (the shipped ``pixart_reference``) needs no ``transformers``.

    Raises:
        ValueError: ``transformers`` is not installed, or the pipeline has no loadable tokenizer/encoder.
    """
    folder = pipeline_folder(pipeline)
    if is_tiny_encoder_folder(folder / "text_encoder"):
        tokenizer, encoder = load_tiny_encoder(folder / "text_encoder")
        return tokenizer, encoder.to(device, dtype)
    try:
        from transformers import AutoTokenizer, T5EncoderModel
    except ImportError:
        raise ValueError(MISSING_TRANSFORMERS) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
        encoder = T5EncoderModel.from_pretrained(pipeline, subfolder="text_encoder", torch_dtype=dtype)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the tokenizer / text encoder of {pipeline}: {' '.join(str(error).split())}") from None
    return tokenizer, encoder.to(device).eval()


def in_batches(encode: Callable[[list[str]], Any], prompts: list[str], batch_size: int, progress: bool) -> list[Any]:
    """``encode`` of ``prompts`` in chunks of ``batch_size``, under a progress bar: the chunks' results."""
    from tqdm.auto import tqdm

    with tqdm(range(0, len(prompts), batch_size), desc="encoding prompts", disable=not progress, unit="batch") as bar:
        return [encode(prompts[i:i + batch_size]) for i in bar]  # the bar ends its line on an error too


@torch.no_grad()
def encode_prompts(tokenizer: Callable, encoder: torch.nn.Module, prompts: list[str], negative: str = "",
                   max_length: int = 300, batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """The four tensors of a prompt-embeddings file: ``prompt_embeds [N, T, C]`` float32 and
    ``prompt_attention_mask [N, T]`` int64 of ``prompts`` (T = ``max_length``), and the negative
    prompt's ``[1, T, C]`` / ``[1, T]``."""
    device = next(encoder.parameters()).device

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        mask = tokens["attention_mask"].to(device)
        embeds = encoder(tokens["input_ids"].to(device), attention_mask=mask)[0]
        return embeds.float().cpu(), mask.long().cpu()

    chunks = in_batches(encode, prompts, batch_size, progress)
    negative_embeds, negative_mask = encode([negative])
    tensors = (torch.cat([e for e, _ in chunks]), torch.cat([m for _, m in chunks]), negative_embeds, negative_mask)
    return dict(zip(KEYS, tensors))


def encode_sd3_prompts(encoders: Any, prompts: list[str], negative: str = "", max_length: int = SD3_MAX_LENGTH,
                       batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """The six tensors of an SD3 prompt-embeddings file (:mod:`.sd3_encoder`): ``prompt_embeds [N,
    T, C]`` with all-ones ``prompt_attention_mask [N, T]`` (int64), the negative prompt's ``[1, T,
    C]`` / ``[1, T]``, ``pooled_prompt_embeds [N, P]`` and ``negative_pooled_prompt_embeds [1, P]``."""
    chunks = in_batches(lambda texts: encode_sd3(encoders, texts, max_length), prompts, batch_size, progress)
    embeds, pooled = torch.cat([e for e, _ in chunks]), torch.cat([p for _, p in chunks])
    negative_embeds, negative_pooled = encode_sd3(encoders, [negative], max_length)
    ones = [torch.ones(e.shape[:2], dtype=torch.long) for e in (embeds, negative_embeds)]
    return {**dict(zip(KEYS, (embeds, ones[0], negative_embeds, ones[1]))), **dict(zip(POOLED_KEYS, (pooled, negative_pooled)))}


def encode_flux_prompts(encoders: Any, prompts: list[str], max_length: int = FLUX_MAX_LENGTH, batch_size: int = 8,
                        progress: bool = True) -> dict[str, torch.Tensor]:
    """The three tensors of a Flux prompt-embeddings file (:mod:`.flux_encoder`): ``prompt_embeds
    [N, T, C]``, all-ones ``prompt_attention_mask [N, T]`` (int64), ``pooled_prompt_embeds [N, P]``."""
    chunks = in_batches(lambda texts: encode_flux(encoders, texts, max_length), prompts, batch_size, progress)
    embeds, pooled = torch.cat([e for e, _ in chunks]), torch.cat([p for _, p in chunks])
    return dict(zip(DISTILLED_KEYS, (embeds, torch.ones(embeds.shape[:2], dtype=torch.long), pooled)))


def with_mean_pooled(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` of :func:`encode_prompts` and their pooled embeddings ``pooled_prompt_embeds [N, C]``
    and ``negative_pooled_prompt_embeds [1, C]``: the mean over each prompt's tokens
    (:func:`.tiny_encoder.mean_pool`, a tiny encoder with ``pooled == "mean"``)."""
    pooled = (mean_pool(tensors[e], tensors[m]) for e, m in (KEYS[:2], KEYS[2:]))
    return {**tensors, **dict(zip(POOLED_KEYS, pooled))}


def pipeline_class(pipeline: str) -> str | None:
    """The pipeline class name of a folder or hub id (``model_index.json``'s ``_class_name``; an
    uncached hub id: ``StableDiffusion3Pipeline`` when its name says ``stable-diffusion-3``,
    ``FluxPipeline`` when it says ``flux``), or None."""
    index = model_index(str(pipeline_folder(pipeline)))
    if index is not None:
        return index.get("_class_name")
    if not pipeline_folder(pipeline).exists() and "stable-diffusion-3" in pipeline.lower():
        return "StableDiffusion3Pipeline"
    if not pipeline_folder(pipeline).exists() and "flux" in pipeline.lower():
        return "FluxPipeline"
    return None


def encode_file(pipeline: str, prompts_path: str | Path, out: str | Path, negative: str = "",
                max_length: int | None = None,
                batch_size: int = 8, device: str = "cpu", dtype: str = "float32", loader: Callable | None = None,
                progress: bool = True, classes: list[int] | None = None, keep_case: bool = False) -> bool:
    """Write the embeddings of ``prompts_path`` to ``out`` (safetensors with the key in its metadata);
    False when ``out`` already holds this key (nothing done). ``loader``: ``(pipeline, device, dtype)
    -> encoders``, by default :func:`load_text_encoder` (``(tokenizer, encoder)``) or, for an SD3
    pipeline, :func:`.sd3_encoder.load_sd3_encoders` (Flux: :func:`.flux_encoder.load_flux_encoders`).
    ``max_length`` None: SD3's 256 T5 tokens, Flux's 512, a
    tiny encoder's own length, else 300 (PixArt-Σ). ``classes``: the class each prompt names, written
    as metadata (``train.py test`` then scores class accuracy with a reference's classifier).
    ``keep_case``: encode the prompts as written, not lower-cased and stripped as PixArt's pipelines
    do (SD3's and Flux's are always as written). Flux: three keys, no negative prompt.

    Raises:
        ValueError: bad prompts file, ``max_length``/``batch_size`` < 1, an unknown dtype, a pipeline
            of a pooled family with no encoder here, a negative prompt for Flux, no ``transformers``, an unloadable pipeline, or
            an unwritable ``out`` (a ``WriteError``).
    """
    kind = pipeline_class(pipeline)
    flux = kind == "FluxPipeline"
    sd3 = kind in POOLED_PIPELINES and not flux
    if flux and negative:
        raise ValueError(f"a Flux pipeline ({pipeline}) is guidance-distilled, with no unconditional branch: it encodes "
                         f"no negative prompt; drop --negative-prompt / --data.negative_prompt ({negative!r})")
    if not (sd3 or flux) and any(kind in f.pipelines for f in FAMILIES if isinstance(f.conditioning, PooledTextPrompts)):
        raise ValueError(f"python -m vq4dit.prompts encode cannot encode the pooled embeddings of a {kind} yet "
                         f"(it encodes {', '.join(POOLED_PIPELINES)} and T5 pipelines): write them from the "
                         "pipeline's encode_prompt and give --data.prompt_embeds FILE")
    if max_length is None:
        text_encoder = pipeline_folder(pipeline) / "text_encoder"
        max_length = (SD3_MAX_LENGTH if sd3 else FLUX_MAX_LENGTH if flux else json.loads((text_encoder / "config.json").read_text())["max_length"]
                      if is_tiny_encoder_folder(text_encoder) else DEFAULT_MAX_LENGTH)
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"--max-length and --batch-size must be >= 1, got {max_length} and {batch_size}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    prompts = read_prompts(prompts_path)
    if not (keep_case or sd3 or flux):  # what PixArt's pipelines feed their tokenizer (_text_preprocessing, clean_caption=False)
        prompts, negative = [p.lower().strip() for p in prompts], negative.lower().strip()
    if classes is not None and len(classes) != len(prompts):
        raise ValueError(f"{len(classes)} classes for {len(prompts)} prompts")
    key = prompts_key(prompts, negative, max_length, dtype, pipeline) + (f":{classes}" if classes is not None else "")
    if stored_key(out) == key:
        return False
    try:
        default = load_sd3_encoders if sd3 else load_flux_encoders if flux else load_text_encoder
        encoders = (loader or default)(pipeline, device, getattr(torch, dtype))
    except ImportError:
        raise ValueError(MISSING_TRANSFORMERS) from None
    tensors = (encode_sd3_prompts(encoders, prompts, negative, max_length, batch_size, progress) if sd3
               else encode_flux_prompts(encoders, prompts, max_length, batch_size, progress) if flux
               else encode_prompts(*encoders, prompts, negative, max_length, batch_size, progress))
    if not (sd3 or flux) and isinstance(encoders[1], TinyTextEncoder) and encoders[1].pooled:  # the shipped MMDiT's: six keys
        tensors = with_mean_pooled(tensors)
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + 4096
    with atomic_path(out, size=size) as tmp:
        metadata = {KEY_FIELD: key, **({CLASSES_FIELD: json.dumps(classes)} if classes is not None else {})}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return True
