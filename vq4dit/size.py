"""Size accounting of vector-quantized models (the paper's MiB accounting, vq4dit-paper.md
section 5) and the packed file size (shapes only: works on the meta device)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .layers import VQLinear

from .quantize import vq_layers
from .packing import identical_tensors

_MIB = 8 * 1024**2  # bits per MiB

@dataclass
class LayerSize:
    """Sizes of one ``VQLinear`` (from shapes only: works on the meta device)."""

    name: str
    out_features: int
    in_features: int
    codebook_size: int  # k
    subvector_dim: int  # d
    nominal_bits_per_weight: float  # log2(k) / d
    bits_per_weight: float  # plus an FP32 codebook amortised over the layer
    code_bits: int  # nominal: N * log2(k), N = out * in / d
    packed_code_bytes: int  # ceil(code_bits / 8): what the file stores
    codebook_bytes: int  # in the codebook's dtype
    num_biases: int  # 0 without bias
    bias_bytes: int  # in the bias' dtype
    scale_bytes: int = 0  # FP16 row scales (``VQConfig.row_scale``), 2 bytes per output row

    @classmethod
    def of(cls, name: str, layer: VQLinear) -> LayerSize:
        c, num_weights = layer.config, layer.out_features * layer.in_features
        code_bits = num_weights // c.subvector_dim * c.code_bits
        bias = layer.bias if layer.bias is not None else torch.empty(0, device="meta")
        return cls(
            name, layer.out_features, layer.in_features, c.codebook_size, c.subvector_dim,
            c.nominal_bits_per_weight, layer.bits_per_weight(include_codebook=True), code_bits, (code_bits + 7) // 8,
            layer.codebook.numel() * layer.codebook.element_size(), bias.numel(), bias.numel() * bias.element_size(),
            2 * layer.out_features if layer.row_scales is not None else 0,
        )


@dataclass
class SizeReport:
    """Per-layer rows; the paper's MiB accounting over the quantized layers (FP32 weights + biases
    vs log2(k)-bit codes + FP32 codebooks + FP32 biases); the estimated file size."""

    layers: list[LayerSize]
    num_weights: int
    num_biases: int
    fp32_mib: float
    codes_mib: float
    codebooks_mib: float
    biases_mib: float
    quantized_mib: float
    compression: float  # fp32_mib / quantized_mib
    other_bytes: int  # every non-quantized state_dict tensor, in its dtype
    file_bytes: int  # estimated model.safetensors size, header excluded

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A text table, one row per layer, then the totals."""
        head = (f"{'layer':<40} {'shape':>11} {'k':>6} {'d':>2} {'b/w':>6} {'b/w+cb':>7} {'codes B':>11} "
                f"{'codebook B':>10} {'bias B':>7}")
        lines = [head, "-" * len(head)] + [
            f"{r.name:<40} {f'{r.out_features}x{r.in_features}':>11} {r.codebook_size:>6} {r.subvector_dim:>2} "
            f"{r.nominal_bits_per_weight:>6.3f} {r.bits_per_weight:>7.3f} {r.packed_code_bytes:>11,} "
            f"{r.codebook_bytes:>10,} {r.bias_bytes:>7,}"
            for r in self.layers
        ]
        mib = 1024**2
        return "\n".join(lines + [
            "-" * len(head),
            f"{len(self.layers)} quantized layers: {self.num_weights:,} weights + {self.num_biases:,} biases",
            f"FP32 {self.fp32_mib:.2f} MiB -> {self.quantized_mib:.2f} MiB ({self.compression:.2f}x): codes "
            f"{self.codes_mib:.2f} + codebooks{' + row scales' if any(r.scale_bytes for r in self.layers) else ''} "
            f"{self.codebooks_mib:.3f} + biases {self.biases_mib:.2f} MiB",
            f"estimated file size {self.file_bytes / mib:.2f} MiB (other tensors {self.other_bytes / mib:.2f} MiB)",
        ])


def size_report(model: nn.Module) -> SizeReport:
    """Size accounting of ``model``'s ``VQLinear`` layers (vq4dit-paper.md section 5)."""
    layers = vq_layers(model)
    rows = [LayerSize.of(name, layer) for name, layer in layers.items()]
    vq_keys = {f"{name}.{key}" for name, layer in layers.items() for key in layer.state_dict(keep_vars=True)}
    others = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in vq_keys}
    aliases = identical_tensors(others)  # stored once in the file
    other = sum(v.numel() * v.element_size() for k, v in others.items() if k not in aliases)
    num_weights = sum(r.out_features * r.in_features for r in rows)
    num_biases = sum(r.num_biases for r in rows)
    codes = sum(r.code_bits for r in rows) / _MIB
    codebooks = sum(r.codebook_size * r.subvector_dim * 32 + r.scale_bytes * 8 for r in rows) / _MIB  # + row scales
    biases = num_biases * 32 / _MIB
    fp32, quantized = (num_weights + num_biases) * 32 / _MIB, codes + codebooks + biases
    stored = sum(r.packed_code_bytes + r.codebook_bytes + r.bias_bytes + r.scale_bytes for r in rows)
    return SizeReport(
        rows, num_weights, num_biases, fp32, codes, codebooks, biases, quantized,
        fp32 / quantized if quantized else float("nan"), other, other + stored,
    )
