"""vq4dit's serialization layer: the packed format (``packed``), the diffusers quantizer backend
(``diffusers_backend``), the model card (``model_card``) and the atomic writers / strict reader
(``checkpoint``). It sits above the layers (``vq4dit.layers``, ``vq4dit.quantize``) and the DiT
models (``vq4dit.models``, ``vq4dit.convert``), below the engine and the Lightning adapter; within
it: packed -> model_card, diffusers_backend -> checkpoint.
"""

from .checkpoint import WriteError, load_quantized, save_pretrained, save_quantized
from .diffusers_backend import UnsupportedDiffusersError, VQ4DiTConfig, VQ4DiTQuantizer, attach, register
from .packed import FORMAT_VERSION, QUANT_METHOD, QuantizedCheckpointError, tie_tensors_

__all__ = [
    "FORMAT_VERSION", "QUANT_METHOD", "QuantizedCheckpointError", "UnsupportedDiffusersError", "VQ4DiTConfig",
    "VQ4DiTQuantizer", "WriteError", "attach", "load_quantized", "register", "save_pretrained", "save_quantized",
    "tie_tensors_",
]
