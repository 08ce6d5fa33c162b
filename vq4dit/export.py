"""Old import path of the packed checkpoints, kept so that ``from vq4dit.export import ...`` keeps
working; everything lives in ``vq4dit.io`` (and ``vq4dit.size``). No code here."""

from .io.checkpoint import load_quantized, save_pretrained, save_quantized  # noqa: F401
from .io.packed import FORMAT_VERSION, QUANT_METHOD, QuantizedCheckpointError, tie_tensors_  # noqa: F401
from .atomic import WriteError  # noqa: F401
from .size import LayerSize, SizeReport, size_report  # noqa: F401
