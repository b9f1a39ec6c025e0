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
