"""``train.py test`` / ``predict``: the sample evaluation the calibration module delegates to.

- ``test``: FP and quantized samples under identical noise -> FID / IS / precision / recall /
  class accuracy / MSE to FP (``vq4dit.metrics``), an FP-vs-quantized grid in TensorBoard and PNG.
- ``predict``: quantized (or FP) samples -> PNGs + one ``.npz`` in the format of the original
  DiT's ``sample_ddp.py`` (``callbacks.SampleWriter``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..evaluation import (
    SHIPPED_REFERENCES, build_metrics, generate_images, load_real_images, load_shipped_classifier, load_vae, to_uint8_hwc,
)
from ..images import make_grid, save_png
from ..sampling import SamplerConfig

EvalModel = Literal["quantized", "fp"]
MetricsFeatures = Literal["auto", "classifier", "inception"]


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    """What ``test`` / ``predict`` / ``validate`` evaluate, and against what.

    Args:
        quantized: a packed model folder that ``test`` / ``predict`` / ``validate`` evaluate instead
            of calibrating (None: the calibrated student).
        model: what ``test`` / ``predict`` sample: ``quantized`` (the student, compared with the FP
            model under identical noise) or ``fp`` (the teacher only: the FP baseline).
        vae: diffusers ``AutoencoderKL`` folder or hub id decoding latents (None: pixel-space models).
        metrics_features: FID / IS features: ``classifier`` (a shipped reference's own), ``inception``
            or ``auto`` (the classifier for ``reference`` and ``rgb_reference``).
        real_images: FID reference: ``digits``, ``rgb_patches``, an ``.npz`` of ``arr_0 [N, H, W, C]``
            uint8, ``auto`` (the shipped reference's own data) or None (FID to the FP samples only).
    """

    quantized: str | None = None
    model: EvalModel = "quantized"
    vae: str | None = None
    metrics_features: MetricsFeatures = "auto"
    real_images: str | None = "auto"


class SampleEvaluation:
    """Samples and metrics of ``test`` / ``predict`` for one model source (``model_source``:
    a shipped reference picks its own classifier and data) with ``settings``."""

    def __init__(self, model_source: str, settings: EvaluationSettings) -> None:
        self.model_source, self.eval_model, self.vae_source = model_source, settings.model, settings.vae
        reference = SHIPPED_REFERENCES.get(model_source)
        features, real_images = settings.metrics_features, settings.real_images
        self.features = features if features != "auto" else ("classifier" if reference else "inception")
        self.real_images = real_images if real_images != "auto" else reference
        self.metrics = None
        self._vae: nn.Module | None = None

    def sampler(self, base: SamplerConfig, teacher: nn.Module) -> SamplerConfig:
        """``base`` with ``clip_denoised`` for pixel-space models (their x_0 lies in [-1, 1])."""
        pixel_space = self.vae_source is None and teacher.config.in_channels in (1, 3)
        return replace(base, clip_denoised=pixel_space)

    def images(self, model: nn.Module, batch: dict, sampler: SamplerConfig, device: torch.device,
               prompts: dict | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] of ``batch`` (``labels [B]``: classes, or for a text
        model the rows of ``prompts``, :func:`vq4dit.prompts.load_prompt_embeds`; ``seeds [B]``)."""
        if self.vae_source is not None and self._vae is None:
            self._vae = load_vae(self.vae_source, device)
        seeds = batch["seeds"].tolist()
        labels = batch["labels"] if prompts is None else batch["labels"].cpu()
        return generate_images(model, labels, seeds, sampler, self._vae, batch_size=len(seeds), prompts=prompts).to(device)

    @staticmethod
    def classes(module, labels: torch.Tensor) -> torch.Tensor:
        """The classes of a batch's ``labels [B]``: themselves, or the classes its prompts name
        (their file's metadata; the prompt indices when it has none)."""
        known = module.data_settings.prompt_classes
        return labels if known is None else known.to(labels.device)[labels]

    def evaluated(self, teacher: nn.Module, student: nn.Module | None) -> nn.Module:
        return teacher if self.eval_model == "fp" else student

    # ------------------------------------------------------------------------------------ test
    def start_test(self, device: torch.device, num_samples: int, prompts: dict | None = None,
                   prompt_classes: torch.Tensor | None = None) -> None:
        """Load the metrics; a text model scored by a classifier needs its prompts' classes."""
        if prompts is not None and self.features == "classifier" and prompt_classes is None:
            raise ValueError("class accuracy of a text model needs the class each prompt names (the embeddings "
                             "file's vq4dit_prompt_classes metadata, as the shipped reference's files carry); "
                             "use --model.evaluation.metrics_features inception")
        classifier = load_shipped_classifier(self.model_source) if self.features == "classifier" else None
        real = load_real_images(self.real_images) if self.real_images else None
        self.metrics = build_metrics(self.features, classifier, real, num_samples).to(device)

    def test_step(self, module, batch: dict, batch_idx: int, sampler: SamplerConfig) -> None:
        """Sample ``batch`` with the evaluated model (and the FP model under the same noise)."""
        prompts = module.data_settings.prompts
        images = self.images(self.evaluated(module.teacher, module.student), batch, sampler, module.device, prompts)
        fp_images = (self.images(module.teacher, batch, sampler, module.device, prompts)
                     if self.eval_model == "quantized" else None)
        self.metrics.update(images, self.classes(module, batch["labels"]), fp_images)
        if batch_idx == 0:
            self._log_grid(module.trainer, module.logger, images, fp_images)

    def compute(self) -> dict[str, torch.Tensor]:
        return {f"test/{name}": value for name, value in self.metrics.compute().items()}

    def _log_grid(self, trainer, logger, images: torch.Tensor, fp_images: torch.Tensor | None) -> None:
        # trainer.log_dir is a collective (broadcast from rank 0): every rank asks for it.
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "test"
        if not trainer.is_global_zero:
            return
        count = min(len(images), 16)
        rows = ([fp_images[:count].cpu()] if fp_images is not None else []) + [images[:count].cpu()]
        grid = make_grid(rows, scale=max(1, 64 // images.shape[-1]))
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("test/fp_vs_quantized" if fp_images is not None else "test/samples", grid, 0)
        save_png(grid, folder / ("fp_vs_quantized.png" if fp_images is not None else "samples.png"))

    # --------------------------------------------------------------------------------- predict
    def predict_step(self, module, batch: dict, sampler: SamplerConfig) -> dict[str, torch.Tensor]:
        """``{"index": [B], "labels": [B], "images": [B, H, W, 3] uint8}`` for the sample writer
        (``labels``: classes, or for a text model the prompt indices)."""
        images = self.images(self.evaluated(module.teacher, module.student), batch, sampler, module.device,
                             module.data_settings.prompts)
        return {"index": batch["index"].cpu(), "labels": batch["labels"].cpu(), "images": torch.from_numpy(to_uint8_hwc(images))}
