"""The model card (README.md) of a packed model, and uploading a packed folder to the Hugging Face hub.

The card states what a hub user needs before downloading: base model, method, ``k``/``d``/``n``,
bits per weight all-in (codes + codebooks + biases of the quantized layers), file size, the
calibration settings and time when known, and the vq4dit version. Facts come from the ``card``
dict given to ``save_quantized`` (recorded in config.json, so re-saves keep them), else from what
the model itself tells (its ``VQLinear`` settings, its ``_name_or_path``).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..quantize import vq_layers

CARD_NAME = "README.md"
# card keys shown in the facts table, in this order; any other key is listed under "Calibration"
_FACTS = ("base_model", "num_candidates", "calibration_seconds")


def _base_model(model: nn.Module, card: dict) -> str | None:
    base = card.get("base_model") or (getattr(model, "config", {}) or {}).get("_name_or_path")
    return str(base) if base and not os.path.isabs(str(base)) else None  # a local path says nothing on the hub


def model_card(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """README.md text for ``model`` saved with ``config`` (its ``quantization_config`` holds the
    layers and the optional ``card`` facts) and file ``tensors``."""
    qc = config["quantization_config"]
    model_class = config.get("_class_name", "DiTTransformer2DModel")  # the usage names the saved class
    card = dict(qc.get("card") or {})
    layers = qc["layers"]
    weights = sum(s["in_features"] * s["out_features"] for s in layers.values())
    stored = sum(
        tensors[f"{name}.{key}"].numel() * tensors[f"{name}.{key}"].element_size() * 8
        for name, s in layers.items() for key in ("codebook", "codes_packed", *(("bias",) if s["bias"] else ()))
    )
    file_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    candidates = card.get("num_candidates")
    if candidates is None:  # a calibrated model still knows its n; a loaded one does not (1 = hard)
        counts = Counter(layer.config.num_candidates for layer in vq_layers(model).values())
        candidates = counts.most_common(1)[0][0] if counts and 1 not in counts else None
    base = _base_model(model, card)
    k, d = qc["codebook_size"], qc["subvector_dim"]
    rows = [
        ("base model", base or "not recorded"),
        ("method", "VQ4DiT (vector quantization, zero-data block-wise calibration), arXiv 2408.17131"),
        ("codebook size k / sub-vector dim d / candidates n",
         f"{k} / {d} / {candidates if candidates is not None else 'not recorded'}"),
        ("bits per weight, nominal (log2(k)/d)", f"{(k.bit_length() - 1) / d:.3f}"),
        ("bits per weight, all-in (codes + codebooks + biases)", f"{stored / max(weights, 1):.3f}"),
        ("quantized layers / weights", f"{len(layers)} / {weights:,}"),
        ("file size", f"{file_bytes / 1024**2:.2f} MiB"),
        ("calibration time", f"{card['calibration_seconds']:.0f} s" if "calibration_seconds" in card else "not recorded"),
        ("vq4dit version", __version__),
    ]
    settings = {key: value for key, value in card.items() if key not in _FACTS}
    lines = [
        "---",
        "library_name: diffusers",
        "tags:\n- vq4dit\n- quantized\n- diffusion-transformer",
        *([f"base_model: {base}"] if base else []),
        "---",
        "",
        f"# {config.get('_class_name', 'model')} quantized with vq4dit",
        "",
        "| | |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        "## Calibration settings",
        "",
        *([f"- {key}: {value}" for key, value in sorted(settings.items())] or ["not recorded"]),
        "",
        "## Usage",
        "",
        "```python",
        "import vq4dit  # registers the vq4dit quantization backend with diffusers",
        f"from diffusers import {model_class}",
        "",
        f'model = {model_class}.from_pretrained("<this repo or folder>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    path_in_repo: str | None = None,
) -> str:
    """Create the model repo ``repo_id`` if needed and upload ``folder`` to it
    (``huggingface_hub.HfApi.upload_folder``). Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model").repo_id
    info = api.upload_folder(
        folder_path=str(Path(folder)), repo_id=repo_id, repo_type="model", create_pr=create_pr,
        **({"path_in_repo": path_in_repo} if path_in_repo else {}),
        commit_message=commit_message or "Upload vq4dit-quantized model",
    )
    return str(info)
