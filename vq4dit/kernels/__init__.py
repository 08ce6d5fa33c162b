"""Optional fused Triton kernels of the soft reconstruction and the hard decode.

The PyTorch path (``vq4dit.soft``, ``vq4dit.decoding``) is the default. The Triton path is chosen
with the environment variable ``VQ4DIT_KERNELS=triton`` (read at import; ``torch`` is the default)
or, at run time, :func:`use_triton`. It runs on CUDA tensors, and on CPU tensors only under
Triton's interpreter (``TRITON_INTERPRET=1``, how the tests check it against the PyTorch path);
CPU tensors otherwise keep the PyTorch path. Triton is imported lazily: the package works
without it, and asking for the Triton backend without it raises ``ImportError``.

Kernels (see ``soft_triton.py``, ``decode_triton.py``):

- soft reconstruction forward: per soft row, softmax of its ``n`` logits, gather of its ``n``
  candidate codewords, ratio-weighted sum, written to its row (one kernel; hard rows come from
  the fused decode);
- soft reconstruction backward: per soft row, ``<grad, codeword_m>``, softmax Jacobian to the
  logits and the ratio-weighted gradient added to the codebook (fp32 atomics), one kernel;
- hard decode: ``codes`` (uint8/int16/int32, never widened to int64) -> ``[N, d]`` rows of the
  codebook in the requested dtype (the codebook, ``k x d``, is cast first: bit-identical to the
  gather).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton")
ENV_VAR = "VQ4DIT_KERNELS"

_backend: str | None = None  # set by use_triton / set_backend; None: the environment variable


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {list(BACKENDS)}, got {name!r}")
    if name == "triton":
        triton_available(raise_error=True)
    return name


def triton_available(raise_error: bool = False) -> bool:
    """Whether ``import triton`` works (``raise_error``: an ``ImportError`` saying what to install)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        if raise_error:
            raise ImportError(
                f"the Triton kernels need the 'triton' package ({err}); install it "
                "(pip install 'triton==3.9.*') or use the PyTorch path (VQ4DIT_KERNELS=torch)"
            ) from err
        return False
    return True


def backend() -> str:
    """The selected backend: ``torch`` (default) or ``triton``."""
    global _backend
    if _backend is None:
        _backend = _check_backend(os.environ.get(ENV_VAR, "torch").strip().lower() or "torch")
    return _backend


def set_backend(name: str) -> None:
    """Select ``torch`` or ``triton`` for every later call (overrides ``VQ4DIT_KERNELS``)."""
    global _backend
    _backend = _check_backend(name)


def use_triton(enabled: bool = True) -> None:
    """``set_backend("triton" if enabled else "torch")``."""
    set_backend("triton" if enabled else "torch")


def interpreter_on() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` takes the Triton path: backend ``triton`` and a CUDA tensor, or
    any tensor under the interpreter."""
    if backend() != "triton":
        return False
    return tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreter_on())


__all__ = ["BACKENDS", "ENV_VAR", "backend", "set_backend", "use_triton", "triton_available", "interpreter_on", "runs_triton"]
