"""Original facebookresearch/DiT checkpoints -> diffusers ``DiTTransformer2DModel``.

Written from the DiT paper (Peebles & Xie, 2023) and the checkpoint key names; no code of the
original repository is used. The original model shares one timestep embedder and one label table;
diffusers keeps a copy of both in every block (``transformer_blocks.i.norm1.emb``), so the
conversion copies them. The fused ``qkv`` projection is split into ``to_q``/``to_k``/``to_v``.

Two numerical differences between the layouts are handled here:

* Timestep frequencies. The original uses ``exp(-ln(10000) * j / half)``; diffusers'
  ``CombinedTimestepLabelEmbeddings`` hard-codes ``downscale_freq_shift=1``, i.e.
  ``exp(-ln(10000) * j / (half - 1))``. Converted models get shift 0 on every block, recorded in
  the config under :data:`TIMESTEP_FREQ_SHIFT_KEY` so that it survives ``save_pretrained``.
  Stock diffusers cannot express shift 0 (``CombinedTimestepLabelEmbeddings`` hard-codes 1, no
  config option; a different frequency set cannot be folded exactly into ``linear_1``) and
  ignores the key: ``DiTTransformer2DModel.from_pretrained`` of an unquantized save loads with
  shift 1 (outputs ~25 % off). No diffusers hook exists for unquantized models, so converting a
  checkpoint says it once per process (:func:`warn_shift_once`); load such folders with
  ``vq4dit.load_dit``. Packed models re-apply it on load (``vq4dit.io``).
* Block LayerNorm epsilon. The original uses 1e-6 everywhere; diffusers' ``norm3`` reads the
  config's ``norm_eps`` (default 1e-5), so converted configs set ``norm_eps=1e-6``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import warnings
from collections.abc import Mapping

import torch
from diffusers import DiTTransformer2DModel
from torch import Tensor

# Heads per hidden size of the DiT paper's models (Table 1): S, B, L, XL.
PAPER_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}

# Config entry recording the timestep frequency shift (diffusers keeps unknown "_" keys silently;
# a plain key would trigger a misleading "will be ignored" warning on every from_pretrained).
TIMESTEP_FREQ_SHIFT_KEY = "_timestep_freq_shift"

# diffusers' CombinedTimestepLabelEmbeddings: Timesteps(256, flip_sin_to_cos=True, shift=1).
_DIFFUSERS_FREQ_SHIFT = 1
_TIMESTEP_FREQ_DIM = 256  # sinusoidal features fed to the timestep MLP (fixed in both codes)
_MLP_RATIO = 4
_POS_EMBED_ATOL = 1e-5
_MAX_LISTED = 5  # offending keys listed in an error message

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


class DiTLoadError(ValueError):
    """A DiT source (preset, folder, hub id, checkpoint) is missing or not what was expected."""


# ---------------------------------------------------------------------------------------------
# Timestep frequency shift
# ---------------------------------------------------------------------------------------------


def apply_timestep_freq_shift(
    model: DiTTransformer2DModel, shift: float | None = None
) -> DiTTransformer2DModel:
    """Set ``downscale_freq_shift`` of every block's timestep projection.

    With ``shift`` given, it is also recorded in the model config (and so in ``config.json``);
    without it, the value recorded in the config is (re)applied, diffusers' 1 if none is.

    Args:
        model: a diffusers DiT; modified in place.
        shift: 0 reproduces the original DiT frequencies ``exp(-ln(10000) j / half)``.

    Returns:
        The same model.
    """
    if shift is None:
        shift = model.config.get(TIMESTEP_FREQ_SHIFT_KEY, _DIFFUSERS_FREQ_SHIFT)
    else:
        model.register_to_config(**{TIMESTEP_FREQ_SHIFT_KEY: shift})
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift
    return model


def warn_shift_once() -> None:
    """Say (once per process: Python's default warning filter, the text never changes) that a
    model with shift 0 saved by stock ``save_pretrained`` loads with shift 1 in stock diffusers: no
    diffusers hook can carry it for unquantized models, so it is said when a checkpoint is converted."""
    warnings.warn(
        "an original DiT checkpoint is converted with timestep frequency shift 0, recorded as "
        f"{TIMESTEP_FREQ_SHIFT_KEY!r} in config.json by save_pretrained, which stock diffusers ignores: "
        "DiTTransformer2DModel/DiTPipeline.from_pretrained of an unquantized save would use shift 1 (different "
        "outputs). Load such folders with vq4dit.load_dit(folder); packed (quantized) saves re-apply it.",
        UserWarning,
        stacklevel=2,
    )


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint file
# ---------------------------------------------------------------------------------------------


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return f"[{shown}{', ...' if len(items) > _MAX_LISTED else ''}] ({len(items)} in all)"


def read_original_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read an original DiT ``.pt``: a plain state dict or a training checkpoint.

    Training checkpoints (``{"model", "ema", "opt", "args"}``) give ``ema`` if present, else
    ``model``. ``weights_only=True`` is kept; only ``argparse.Namespace`` (the ``args`` entry of
    the original training script) is additionally allowed.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors for bad files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DiTLoadError(
            f"cannot read {os.fspath(path)!r} as a torch checkpoint ({type(err).__name__}: "
            f"{first_line}); expected an original DiT .pt/.pth saved with torch.save"
        ) from err
    if isinstance(obj, Mapping):
        for entry in ("ema", "model"):
            if entry in obj:
                obj = obj[entry]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise DiTLoadError(
            f"{os.fspath(path)!r} holds a {type(obj).__name__} that is not a state dict of "
            "tensors; expected an original DiT state dict, or a training checkpoint with an "
            "'ema' or 'model' entry"
        )
    state_dict = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


# ---------------------------------------------------------------------------------------------
# Architecture inference and key mapping
# ---------------------------------------------------------------------------------------------


def infer_original_config(state_dict: Mapping[str, Tensor], num_heads: int | None = None) -> dict:
    """Infer diffusers config kwargs from an original DiT state dict's shapes.

    Args:
        state_dict: original layout (``x_embedder.*``, ``blocks.N.*``, ``final_layer.*``, ...).
        num_heads: attention heads; checkpoints do not store it. Default: the paper's value for
            the hidden size (384 -> 6, 768 -> 12, 1024 -> 16, 1152 -> 16).

    Returns:
        ``DiTTransformer2DModel`` keyword arguments.
    """
    anchors = ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight",
               "y_embedder.embedding_table.weight")  # fmt: skip
    missing = [k for k in anchors if k not in state_dict]
    if missing:
        raise DiTLoadError(
            f"not an original DiT state dict: missing keys {_listed(missing)}; found keys "
            f"{_listed(sorted(state_dict))}"
        )
    patch_weight = state_dict["x_embedder.proj.weight"]  # [hidden, in, p, p]
    if patch_weight.ndim != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
        raise DiTLoadError(
            f"x_embedder.proj.weight has shape {tuple(patch_weight.shape)}; expected "
            "[hidden, in_channels, patch, patch]"
        )
    hidden, in_channels, patch = patch_weight.shape[:3]
    pos_embed = state_dict["pos_embed"]  # [1, tokens, hidden]
    grid = math.isqrt(pos_embed.shape[1]) if pos_embed.ndim == 3 else 0
    if pos_embed.ndim != 3 or grid * grid != pos_embed.shape[1] or grid == 0:
        raise DiTLoadError(
            f"pos_embed has shape {tuple(pos_embed.shape)}; expected [1, tokens, hidden] with a "
            "square number of tokens"
        )
    final_rows = state_dict["final_layer.linear.weight"].shape[0]  # patch^2 * out_channels
    if final_rows % (patch * patch):
        raise DiTLoadError(
            f"final_layer.linear.weight has {final_rows} rows, not a multiple of patch^2 = "
            f"{patch * patch}"
        )
    block_ids = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    if not block_ids:
        raise DiTLoadError("not an original DiT state dict: no 'blocks.N.' keys")
    if num_heads is None:
        if hidden not in PAPER_HEADS:
            raise DiTLoadError(
                f"hidden size {hidden} is not one of the DiT paper's {sorted(PAPER_HEADS)}; "
                "checkpoints do not store the number of heads: pass num_heads="
            )
        num_heads = PAPER_HEADS[hidden]
    if num_heads <= 0 or hidden % num_heads:
        raise DiTLoadError(f"num_heads={num_heads} does not divide the hidden size {hidden}")
    num_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]  # classes + null row
    return {
        "num_attention_heads": num_heads,
        "attention_head_dim": hidden // num_heads,
        "in_channels": in_channels,
        "out_channels": final_rows // (patch * patch),
        "num_layers": max(block_ids) + 1,
        "sample_size": grid * patch,
        "patch_size": patch,
        "num_embeds_ada_norm": num_rows - 1,
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
    }


def original_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Expected original-layout key -> shape for a diffusers-style config."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    p, c_in, c_out = config["patch_size"], config["in_channels"], config["out_channels"]
    tokens = (config["sample_size"] // p) ** 2

    def linear(name: str, out_f: int, in_f: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (out_f, in_f), f"{name}.bias": (out_f,)}

    shapes = {
        "x_embedder.proj.weight": (d, c_in, p, p),
        "x_embedder.proj.bias": (d,),
        "pos_embed": (1, tokens, d),
        "y_embedder.embedding_table.weight": (config["num_embeds_ada_norm"] + 1, d),
        **linear("t_embedder.mlp.0", d, _TIMESTEP_FREQ_DIM),
        **linear("t_embedder.mlp.2", d, d),
        **linear("final_layer.adaLN_modulation.1", 2 * d, d),
        **linear("final_layer.linear", p * p * c_out, d),
    }
    for i in range(config["num_layers"]):
        shapes.update(linear(f"blocks.{i}.attn.qkv", 3 * d, d))
        shapes.update(linear(f"blocks.{i}.attn.proj", d, d))
        shapes.update(linear(f"blocks.{i}.mlp.fc1", _MLP_RATIO * d, d))
        shapes.update(linear(f"blocks.{i}.mlp.fc2", d, _MLP_RATIO * d))
        shapes.update(linear(f"blocks.{i}.adaLN_modulation.1", 6 * d, d))
    return shapes


def check_original_keys(state_dict: Mapping[str, Tensor], config: Mapping) -> None:
    """Raise :class:`DiTLoadError` listing unknown, missing and wrongly shaped keys."""
    expected = original_shapes(config)
    unknown = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} != expected {shape}"
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != shape
    ]
    problems = [
        f"{what} {_listed(keys)}"
        for what, keys in (("unknown keys", unknown), ("missing keys", missing),
                           ("wrong shapes", wrong))  # fmt: skip
        if keys
    ]
    if problems:
        d = config["num_attention_heads"] * config["attention_head_dim"]
        raise DiTLoadError(
            f"checkpoint does not match the original DiT layout inferred from its shapes (hidden "
            f"{d}, depth {config['num_layers']}, patch {config['patch_size']}): "
            + "; ".join(problems)
        )


def convert_original_state_dict(
    state_dict: Mapping[str, Tensor], num_layers: int
) -> dict[str, Tensor]:
    """Map original DiT keys to ``DiTTransformer2DModel`` keys (embedders copied per block)."""
    sd = state_dict

    def linear(src: str, dst: str) -> dict[str, Tensor]:
        return {f"{dst}.weight": sd[f"{src}.weight"], f"{dst}.bias": sd[f"{src}.bias"]}

    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        **linear("final_layer.adaLN_modulation.1", "proj_out_1"),
        **linear("final_layer.linear", "proj_out_2"),
    }
    for i in range(num_layers):
        src, dst = f"blocks.{i}", f"transformer_blocks.{i}"
        out.update(linear("t_embedder.mlp.0", f"{dst}.norm1.emb.timestep_embedder.linear_1"))
        out.update(linear("t_embedder.mlp.2", f"{dst}.norm1.emb.timestep_embedder.linear_2"))
        out[f"{dst}.norm1.emb.class_embedder.embedding_table.weight"] = sd[
            "y_embedder.embedding_table.weight"
        ]
        out.update(linear(f"{src}.adaLN_modulation.1", f"{dst}.norm1.linear"))
        # Fused rows are [q; k; v], each [hidden, hidden].
        for part, weight, bias in zip(
            ("to_q", "to_k", "to_v"),
            sd[f"{src}.attn.qkv.weight"].chunk(3, dim=0),
            sd[f"{src}.attn.qkv.bias"].chunk(3, dim=0),
        ):
            out[f"{dst}.attn1.{part}.weight"] = weight
            out[f"{dst}.attn1.{part}.bias"] = bias
        out.update(linear(f"{src}.attn.proj", f"{dst}.attn1.to_out.0"))
        out.update(linear(f"{src}.mlp.fc1", f"{dst}.ff.net.0.proj"))
        out.update(linear(f"{src}.mlp.fc2", f"{dst}.ff.net.2"))
    return out


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def load_original_checkpoint(
    path: str | os.PathLike, *, num_heads: int | None = None
) -> DiTTransformer2DModel:
    """Build a diffusers DiT (eval mode, float32) from an original facebookresearch/DiT ``.pt``.

    Args:
        path: plain state dict or training checkpoint (``ema`` preferred over ``model``).
        num_heads: attention heads, needed only for hidden sizes outside the paper's models.

    Returns:
        A ``DiTTransformer2DModel`` whose forward matches the original model's.
    """
    state_dict = read_original_state_dict(path)
    try:
        config = infer_original_config(state_dict, num_heads)
        check_original_keys(state_dict, config)
    except DiTLoadError as err:
        raise DiTLoadError(f"{os.fspath(path)!r}: {err}") from None

    model = DiTTransformer2DModel(**config)
    # Non-persistent sin-cos table computed by diffusers: must equal the checkpoint's.
    table = model.pos_embed.pos_embed  # [1, tokens, hidden]
    diff = (table - state_dict["pos_embed"].float()).abs().max().item()
    if not diff <= _POS_EMBED_ATOL:
        raise DiTLoadError(
            f"{os.fspath(path)!r}: pos_embed differs from the fixed 2D sin-cos table diffusers "
            f"computes (max |diff| {diff:.3g} > {_POS_EMBED_ATOL}); the checkpoint's positional "
            "embedding cannot be represented by DiTTransformer2DModel"
        )
    model.load_state_dict(convert_original_state_dict(state_dict, config["num_layers"]))
    apply_timestep_freq_shift(model, 0)
    warn_shift_once()
    return model.eval()
