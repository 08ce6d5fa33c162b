"""Shared test set-up: fixed seed, one thread (tiny models gain nothing from more, and OpenMP
spin-waiting on a busy 2-core machine makes small ops 100x slower)."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by subprocess-based CLI tests
if not torch.cuda.is_available():
    # The Triton kernels (tests/test_kernels.py) run in Triton's CPU interpreter. Set before any
    # test module is imported: a kernel defined before the variable is set cannot be interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)
try:
    import faiss

    faiss.omp_set_num_threads(1)
except ImportError:  # faiss is optional for the library
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
