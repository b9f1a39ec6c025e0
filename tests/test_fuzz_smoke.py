"""A short, deterministic run of each fuzz target in fuzz/ (the long runs are `python -m fuzz TARGET --minutes N`).

Property: any generated GGUF file, safetensors file or chat template gives a result or Lantern's own error
(ModelFileError / TemplateError), never another exception. derandomize=True makes the examples the same on
every run, so CI either always passes or always fails on the same input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where fuzz/ lives

from fuzz.targets import TARGETS  # noqa: E402

# Examples per target: together well under 30 s on a 2-core machine (templates are the slowest per example).
EXAMPLES = {"gguf": 300, "safetensors": 300, "template": 60}


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_target_smoke(target):
    strategy, check, *_ = TARGETS[target]

    @settings(max_examples=EXAMPLES[target], derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy())
    def property_holds(data):
        check(data)

    property_holds()
