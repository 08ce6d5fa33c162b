"""Evaluation of FP and quantized DiTs: images from fixed labels and seeds, metrics, grids.

Plain functions (``benchmarks/quality.py`` uses them; ``train.py test`` / ``predict`` through
:class:`vq4dit.lightning.evaluation.SampleEvaluation`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .images import to_images
from .metrics import SampleMetrics, feature_networks
from .sampling import SamplerConfig

LATENT_SCALE = 0.18215  # DiT / Stable Diffusion VAE latent scaling (a VAE without config.scaling_factor)


def evaluation_plan(num_samples: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Balanced labels ``[N]`` (``i % num_classes``) and one seed per sample (``seed * 10^7 + i``)."""
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"need num_samples >= 1 and num_classes >= 1, got {num_samples}, {num_classes}")
    labels = torch.arange(num_samples) % num_classes
    return labels, [seed * 10_000_000 + i for i in range(num_samples)]


def load_vae(source: str, device: torch.device | str = "cpu") -> nn.Module:
    """A diffusers ``AutoencoderKL`` from a folder or hub id (e.g. ``stabilityai/sd-vae-ft-ema``), or
    the ``vae/`` of a pipeline folder / hub id (a PixArt pipeline)."""
    from diffusers import AutoencoderKL

    errors = []
    for subfolder in (None, "vae"):
        try:
            return AutoencoderKL.from_pretrained(source, subfolder=subfolder).eval().requires_grad_(False).to(device)
        except (OSError, ValueError, EnvironmentError) as error:
            errors.append(" ".join(str(error).split()))
    raise ValueError(f"cannot load the VAE {source!r} (a diffusers AutoencoderKL folder or hub id, or a pipeline "
                     f"with vae/): {errors[0]}")


@torch.no_grad()
def decode(samples: torch.Tensor, vae: nn.Module | None = None) -> torch.Tensor:
    """Model-space samples ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` in [0, 1].

    Latent models need ``vae`` (decoded as ``vae.decode(z / s + m)`` with the VAE's own
    ``config.scaling_factor`` ``s``: 0.18215 for DiT's, 0.13025 for PixArt-Σ's, and its
    ``config.shift_factor`` ``m``, as StableDiffusion3Pipeline decodes: 0 when the VAE has none);
    pixel-space models (1 or 3 channels) are mapped from [-1, 1].
    """
    if vae is not None:
        param = next(vae.parameters())
        config = getattr(vae, "config", None)
        scale = getattr(config, "scaling_factor", None) or LATENT_SCALE
        shift = getattr(config, "shift_factor", None) or 0.0
        pixels = vae.decode(samples.to(param.device, param.dtype) / scale + shift).sample
        return to_images(pixels.float())
    if samples.shape[1] not in (1, 3):
        raise ValueError(
            f"samples have {samples.shape[1]} channels: a latent model needs a VAE to make images "
            "(model.vae: a diffusers AutoencoderKL folder or hub id, e.g. stabilityai/sd-vae-ft-ema)"
        )
    return to_images(samples)


def generate_images(
    model: nn.Module,
    labels: torch.Tensor,
    seeds: list[int],
    config: SamplerConfig,
    vae: nn.Module | None = None,
    batch_size: int = 64,
    progress: bool = False,
    prompts: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] (CPU) for ``labels [N]`` and one seed each, in batches.

    ``labels`` are class labels, or for a text-conditioned model rows of ``prompts`` (a table of
    :func:`vq4dit.prompts.load_prompt_embeds`). The noise of sample ``i`` depends only on
    ``seeds[i]``: any two models get identical noise.
    """
    from tqdm.auto import tqdm

    from .families import family_of
    from .families.guidance import sample_conditioned
    from .prompts import prompt_condition

    images = []
    for start in tqdm(range(0, len(seeds), batch_size), desc="sampling", disable=not progress, unit="batch"):
        stop = start + batch_size
        condition = labels[start:stop] if prompts is None else prompt_condition(prompts, labels[start:stop])
        images.append(decode(sample_conditioned(family_of(model), model, condition, seeds[start:stop], config), vae).cpu())
    return torch.cat(images)


SHIPPED_REFERENCES = {"reference": "digits", "rgb_reference": "rgb_patches", "pixart_reference": "digits",
                      "mmdit_reference": "digits"}
"""The shipped reference models (``--model.model``) -> the real-image set their classifier scores."""


def load_real_images(source: str) -> torch.Tensor:
    """Real images ``[N, C, H, W]`` uint8 for FID / precision / recall.

    ``digits``: the scikit-learn digits at 16x16 (the reference model's data); ``rgb_patches``:
    2048 evenly strided 16x16 patches of the RGB reference's two photos; otherwise an ``.npz``
    whose ``arr_0`` is ``[N, H, W, C]`` uint8 (the ADM evaluator's reference batches, or one
    written by ``train.py predict``).
    """
    if source == "digits":
        from .reference import digits_dataset

        pixels, _ = digits_dataset()
        return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if source == "rgb_patches":
        from .rgb_reference import rgb_patches_dataset

        pixels = rgb_patches_dataset(16)[0]
        pixels = pixels[torch.linspace(0, len(pixels) - 1, min(2048, len(pixels))).long()]
        return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    path = Path(source)
    if path.suffix != ".npz" or not path.is_file():
        raise ValueError(f"real_images must be 'digits', 'rgb_patches' or an existing .npz file, got {source!r}")
    try:
        with np.load(path) as archive:
            array = archive["arr_0"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"cannot read arr_0 from {path}: {error}") from error
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 1 or 3], got {array.dtype} {array.shape}")
    if array.shape[0] < 2:  # FID needs a covariance
        raise ValueError(f"{path}: arr_0 holds {array.shape[0]} image(s); FID / precision / recall need at least 2")
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def load_shipped_classifier(model_source: str) -> nn.Module:
    """The classifier shipped with the reference model ``model_source`` (``SHIPPED_REFERENCES``)."""
    if model_source == "rgb_reference":
        from .rgb_reference import load_rgb_reference_classifier

        return load_rgb_reference_classifier()
    if SHIPPED_REFERENCES.get(model_source) == "digits":  # the PixArt and MMDiT references draw digits too
        from .reference import load_reference_classifier

        return load_reference_classifier()
    raise ValueError(f"metrics_features=classifier needs a shipped reference model ({', '.join(SHIPPED_REFERENCES)}), "
                     f"got {model_source!r}")


def build_metrics(
    features: str, classifier: nn.Module | None, real_images: torch.Tensor | None, num_samples: int
) -> SampleMetrics:
    """:class:`SampleMetrics` with the chosen feature network (``classifier`` or ``inception``)."""
    feature_net, logits_net = feature_networks(features, classifier)
    return SampleMetrics(
        feature_net, logits_net, real_images, class_accuracy=features == "classifier",
        inception_splits=10 if num_samples >= 1000 else 1,
    )


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> ``[B, H, W, 3]`` uint8 (the ``sample_ddp.py`` layout)."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
