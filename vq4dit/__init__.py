"""vq4dit: post-training vector quantization of Diffusion Transformers (VQ4DiT).

The library works without Lightning's CLI: load a DiT, quantize it, calibrate it with
``vq4dit.engine.Calibrator`` (or ``python train.py fit``), save and load packed models, with
``vq4dit.save_quantized`` / ``save_pretrained`` (atomic) / ``load_quantized`` or, after
``import vq4dit``, diffusers' ``from_pretrained`` / ``save_pretrained`` (``vq4dit.io``).
"""

from ._version import __version__
from .io import QuantizedCheckpointError, load_quantized, save_pretrained, save_quantized
from .io.diffusers_backend import register_on_import as _register_on_import
from .size import size_report
from .models import DiTLoadError, block_modules, default_linear_filter, load_dit
from .layers import VQLinear, replace_in_optimizer_
from .quantize import finalize_model_, quantize_, set_inference_mode_, vq_layers
from .kmeans import kmeans
from .vq_config import VQConfig

_register_on_import()  # the "vq4dit" quantization backend of diffusers: from_pretrained / save_pretrained

__all__ = [
    "DiTLoadError",
    "QuantizedCheckpointError",
    "VQConfig",
    "VQLinear",
    "__version__",
    "block_modules",
    "default_linear_filter",
    "finalize_model_",
    "kmeans",
    "load_dit",
    "load_quantized",
    "quantize_",
    "replace_in_optimizer_",
    "set_inference_mode_",
    "save_pretrained",
    "save_quantized",
    "size_report",
    "vq_layers",
]
