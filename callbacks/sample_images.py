"""SampleImages: FP vs quantized samples (same noise, same labels) to TensorBoard and PNG."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from vq4dit.evaluation import decode, load_vae
from vq4dit.families import family_of
from vq4dit.families.guidance import sample_conditioned
from vq4dit.images import make_grid, save_png, to_images
from vq4dit.prompts import prompt_condition
from vq4dit.sampling import SamplerConfig

from .settings import check_range


class SampleImages(pl.Callback):
    """Every ``every_n_steps`` steps and at the end of fit, sample the teacher and the student.

    Row 1 is the FP teacher, row 2 the quantized student (soft rows use their current ratios; at
    the end of fit all rows are hard), with identical seeds and labels (a text-conditioned model:
    column i shows prompt ``i % N`` of the data module's embeddings). The grid goes to
    TensorBoard (``samples/fp_vs_quantized``) and to ``<log_dir>/samples/step_<N>.png``.

    Args:
        every_n_steps: sampling interval in optimisation steps (0 = only at the end of fit).
        labels: class labels of the columns.
        seed: seed of the first column (column i uses seed + i).
        sampler: ``ddim`` (cheap) or ``ddpm``.
        num_steps: sampling steps.
        guidance_scale: classifier-free guidance.
        vae: diffusers ``AutoencoderKL`` folder or hub id to decode latents (None: pixel-space
            models are shown as they are, latents as their first 3 channels).
        scale: integer upscaling of small images in the grid.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        labels: list[int] | None = None,
        seed: int = 0,
        sampler: str = "ddim",
        num_steps: int = 25,
        guidance_scale: float = 1.5,
        vae: str | None = None,
        scale: int = 1,
    ) -> None:
        check_range("SampleImages", "every_n_steps", every_n_steps, 0)
        check_range("SampleImages", "scale", scale, 1)
        self.every_n_steps = every_n_steps
        self.labels = list(labels) if labels is not None else list(range(8))
        self.seed = seed
        self.config = SamplerConfig(sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale)
        self.vae_source = vae
        self.scale = scale
        self._vae = None
        self.written: list[Path] = []
        self._offload_noted = False

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae_source is not None and self._vae is None:
            self._vae = load_vae(self.vae_source, latents.device)
        if self._vae is None and latents.shape[1] not in (1, 3):
            return to_images(latents)  # a rough picture of the first latent channels
        return decode(latents, self._vae)

    def _log(self, trainer: pl.Trainer, pl_module) -> None:
        # trainer.log_dir is a collective (broadcast from rank 0): every rank must ask for it.
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        pl_module.share_blocks_()  # spread_blocks: rank 0 gets every owner's blocks (a collective)
        if not trainer.is_global_zero or pl_module.student is None:
            return
        labels = torch.tensor(self.labels)
        seeds = [self.seed + i for i in range(len(self.labels))]
        prompts = getattr(getattr(trainer, "datamodule", None), "prompts", None)
        if prompts is not None:
            labels = prompt_condition(prompts, torch.arange(len(seeds)) % prompts["prompt_embeds"].shape[0])
        rows = [self._decode(sample_conditioned(family_of(m), m, labels, seeds, self.config))
                for m in (pl_module.teacher, pl_module.student)]
        grid = make_grid(rows, scale=self.scale)
        step = trainer.global_step
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples/fp_vs_quantized", grid, step)
        self.written.append(save_png(grid, folder / f"step_{step:06d}.png"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            if getattr(pl_module, "student_offloaded", False):  # block windows: blocks on the CPU until the end
                if not self._offload_noted:
                    rank_zero_info("SampleImages: student blocks are offloaded to the CPU (offload_blocks): "
                                   "samples only at the end of fit")
                    self._offload_noted = True
                return
            self._log(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module)
