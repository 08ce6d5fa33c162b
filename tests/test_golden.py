"""Golden behaviour: the demo's calibration gives the recorded packed tensors across refactors.

``tests/golden/demo_short_layers.safetensors`` holds the quantized layers' tensors (codebooks,
packed codes, biases) of ``train.py fit --config configs/demo.yaml --config tests/golden/demo_short.yaml``
(the demo's settings, 100 steps) recorded before the calibration engine was introduced (commit
c21e556). What must not move is pinned, the floats within what another CPU's kernels move them (torch
promises no bit-identical floats across CPU kernels; bit-identity between two runs on the same
machine is checked by ``tests/test_trust.py``'s resume test). Measured on an AVX2 machine against
the recording (issue 20): 0.39 % of the code bytes of a layer at most (near-tie argmax flips), a
codebook by 3.3e-3 of its largest codeword, a bias by 1.8e-2 of its largest value, a key bias by 9 %:

- the discrete decisions: every layer's packed codes, at most ``CODES_CHANGED`` of them another;
- the codebooks: within ``CODEBOOK_RTOL`` of the layer's largest codeword;
- the biases: within ``BIAS_RTOL`` of the layer's largest bias, except the attention key biases
  (``to_k``), whose gradient is zero in exact arithmetic (softmax ignores a constant added to every
  key's score): they hold only accumulated rounding noise, which RMSprop scales up to lr-sized
  steps, and they do not change the model's output (``benchmarks/bias_drift.py`` measures both).

A deliberate change of calibration behaviour re-records the file and says so in its commit.
"""

import torch
from safetensors.torch import load_file

from train import cli_main

GOLDEN = "tests/golden/demo_short_layers.safetensors"
CODES_CHANGED = 0.01  # fraction of a layer's code bytes (another CPU: 0.0039)
CODEBOOK_RTOL = 1e-2  # another CPU: 3.3e-3
BIAS_RTOL = 5e-2  # another CPU: 1.8e-2


def mismatches(golden: dict[str, torch.Tensor], exported: dict[str, torch.Tensor]) -> list[str]:
    """The golden tensors ``exported`` does not reproduce within the tolerances above."""
    wrong = []
    for key in sorted(golden):
        want, got = golden[key], exported.get(key)
        if got is None or got.shape != want.shape or got.dtype != want.dtype:
            wrong.append(f"{key}: missing or another shape/dtype")
        elif key.endswith("codes_packed"):
            changed = float((got != want).float().mean())
            if changed > CODES_CHANGED:
                wrong.append(f"{key}: {changed:.1%} of the code bytes differ (allowed {CODES_CHANGED:.0%})")
        elif key.endswith(".to_k.bias"):
            continue
        else:
            rtol = CODEBOOK_RTOL if key.endswith("codebook") else BIAS_RTOL
            error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
            if not error <= rtol:
                wrong.append(f"{key}: off by {error:.1e} of its largest value (allowed {rtol:.0e})")
    return wrong


def test_demo_export_matches_the_recorded_one(tmp_path):
    cli_main([
        "fit", "--config", "configs/demo.yaml", "--config", "tests/golden/demo_short.yaml",
        f"--model.export.dir={tmp_path / 'packed'}", f"--trainer.default_root_dir={tmp_path}",
    ])
    golden, exported = load_file(GOLDEN), load_file(str(tmp_path / "packed" / "diffusion_pytorch_model.safetensors"))
    wrong = mismatches(golden, exported)
    assert not wrong, f"{len(wrong)} of {len(golden)} packed tensors differ: {wrong[:5]}"


def test_the_tolerances_catch_a_real_change():
    """What a regression does (codes moved in 2 % of a layer, a codebook off by 2 %, a bias by
    10 %) is caught; what another CPU does (the measured differences above) is not."""
    golden = load_file(GOLDEN)
    assert mismatches(golden, golden) == []
    generator = torch.Generator().manual_seed(0)
    cross_cpu = {k: v.clone() for k, v in golden.items()}
    for key, value in cross_cpu.items():
        if key.endswith("codes_packed"):
            value[: int(0.004 * value.numel())] ^= 1
        elif key.endswith("codebook"):
            value.mul_(1 + 3.3e-3)
        elif key.endswith(".to_k.bias"):
            value.add_(torch.randn(value.shape, generator=generator) * value.abs().max())
        else:
            value.mul_(1 + 1.8e-2)
    assert mismatches(golden, cross_cpu) == []
    for key, change in [("transformer_blocks.0.attn1.to_q.codes_packed", lambda v: v[: int(0.02 * v.numel())].__ixor__(1)),
                        ("transformer_blocks.1.ff.net.2.codebook", lambda v: v.mul_(1.02)),
                        ("transformer_blocks.1.ff.net.2.bias", lambda v: v.mul_(1.1))]:
        broken = {k: v.clone() for k, v in golden.items()}
        change(broken[key])
        assert [m.split(":")[0] for m in mismatches(golden, broken)] == [key]
