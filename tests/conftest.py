"""Shared test setup: helpers importable from this folder, no autograd, and the real default model."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_grad_enabled(False)

from model_files import default_gguf_path  # noqa: E402


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return default_gguf_path()


@pytest.fixture(params=[1, 2], ids=["avx2", "avx512"])
def isa(request):
    """Run a kernel test on each instruction set the CPU has (AVX2, AVX-512 VNNI); restore the best one after."""
    from lanternlm.kernels import kernels, why_unavailable
    module = kernels(quiet=True)
    if module is None:
        pytest.skip(f"kernels unavailable: {why_unavailable()}")
    best = module.set_isa(9)
    if request.param > best:
        pytest.skip("this CPU has no AVX-512 VNNI")
    module.set_isa(request.param)
    yield request.param
    module.set_isa(best)
