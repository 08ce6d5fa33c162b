"""Independent reference of the original DiT forward, from the DiT paper's equations.

Pure torch functions on an original-layout state dict (``x_embedder.*``, ``t_embedder.*``,
``y_embedder.*``, ``pos_embed``, ``blocks.N.*``, ``final_layer.*``). Deliberately does not import
diffusers: it is the yardstick the converted diffusers model is compared against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

FREQ_DIM = 256  # sinusoidal timestep features
LN_EPS = 1e-6


def timestep_features(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """[N] timesteps -> [N, dim]: ``[cos(t w_j), sin(t w_j)]``, ``w_j = max_period^(-j / half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # [N, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[M] positions -> [M, dim]: ``[sin(x w_j), cos(x w_j)]``, ``w_j = 10000^(-j / (dim/2))``."""
    half = dim // 2
    omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.double()[:, None] * omega[None]  # [M, half]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def sincos_2d_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed ViT/MAE-style 2D table [1, grid*grid, dim] for row-major tokens.

    Token ``k = row * grid + col``; the first half of the features encodes the column (x), the
    second half the row (y).
    """
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], 1)
    return table.float()[None]


def _linear(sd: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters over the last dimension."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _self_attention(sd: dict[str, Tensor], prefix: str, x: Tensor, num_heads: int) -> Tensor:
    n, t, d = x.shape
    head_dim = d // num_heads
    qkv = _linear(sd, f"{prefix}.qkv", x)  # [N, T, 3D], features ordered q; k; v
    q, k, v = qkv.reshape(n, t, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # [N, H, T, hd]
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)  # [N, H, T, T]
    out = (weights @ v).transpose(1, 2).reshape(n, t, d)
    return _linear(sd, f"{prefix}.proj", out)


def dit_forward(
    sd: dict[str, Tensor], x: Tensor, t: Tensor, y: Tensor, num_heads: int
) -> Tensor:
    """Original DiT forward.

    Args:
        sd: original-layout state dict.
        x: [N, C, H, W] latents.
        t: [N] timesteps.
        y: [N] class labels (the last table row is the null class).
        num_heads: attention heads.

    Returns:
        [N, C_out, H, W] (noise and, with learned sigma, variance channels).
    """
    patch_weight = sd["x_embedder.proj.weight"]  # [D, C, p, p]
    p = patch_weight.shape[-1]
    h = F.conv2d(x, patch_weight, sd["x_embedder.proj.bias"], stride=p)  # [N, D, H/p, W/p]
    grid_h, grid_w = h.shape[-2:]
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # [N, T, D]

    t_emb = _linear(sd, "t_embedder.mlp.2", F.silu(_linear(sd, "t_embedder.mlp.0",
                                                           timestep_features(t))))  # fmt: skip
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]  # [N, D]

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        mod = _linear(sd, f"blocks.{i}.adaLN_modulation.1", F.silu(c))  # [N, 6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        attn_in = _modulate(_layer_norm(h), shift_msa, scale_msa)
        h = h + gate_msa[:, None] * _self_attention(sd, f"blocks.{i}.attn", attn_in, num_heads)
        mlp_in = _modulate(_layer_norm(h), shift_mlp, scale_mlp)
        mlp_out = _linear(sd, f"blocks.{i}.mlp.fc2",
                          _gelu_tanh(_linear(sd, f"blocks.{i}.mlp.fc1", mlp_in)))  # fmt: skip
        h = h + gate_mlp[:, None] * mlp_out

    shift, scale = _linear(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=-1)
    h = _linear(sd, "final_layer.linear", _modulate(_layer_norm(h), shift, scale))  # [N, T, p*p*C]

    n = h.shape[0]
    c_out = h.shape[-1] // (p * p)
    h = h.reshape(n, grid_h, grid_w, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # [N, C, gh, p, gw, p]
    return h.reshape(n, c_out, grid_h * p, grid_w * p)


def random_original_state_dict(
    *,
    hidden: int = 64,
    depth: int = 2,
    patch: int = 2,
    latent: int = 8,
    in_channels: int = 4,
    out_channels: int = 8,
    num_classes: int = 1000,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Synthetic original-layout DiT weights: random (non-zero) Linears, true sin-cos pos_embed."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    sd: dict[str, Tensor] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        sd[f"{name}.weight"] = rand(out_f, in_f, scale=in_f**-0.5)
        sd[f"{name}.bias"] = rand(out_f, scale=0.1)

    d = hidden
    fan_in = in_channels * patch * patch
    sd["x_embedder.proj.weight"] = rand(d, in_channels, patch, patch, scale=fan_in**-0.5)
    sd["x_embedder.proj.bias"] = rand(d, scale=0.1)
    sd["pos_embed"] = sincos_2d_pos_embed(d, latent // patch)
    linear("t_embedder.mlp.0", d, FREQ_DIM)
    linear("t_embedder.mlp.2", d, d)
    sd["y_embedder.embedding_table.weight"] = rand(num_classes + 1, d)
    for i in range(depth):
        linear(f"blocks.{i}.attn.qkv", 3 * d, d)
        linear(f"blocks.{i}.attn.proj", d, d)
        linear(f"blocks.{i}.mlp.fc1", 4 * d, d)
        linear(f"blocks.{i}.mlp.fc2", d, 4 * d)
        linear(f"blocks.{i}.adaLN_modulation.1", 6 * d, d)
    linear("final_layer.adaLN_modulation.1", 2 * d, d)
    linear("final_layer.linear", patch * patch * out_channels, d)
    return sd
