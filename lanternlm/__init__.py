"""Lantern: an LLM engine you can run, serve and see through."""

from .api import LLM, Completion
from .errors import LanternError, ModelFileError
from .generation.generate import Step
from .generation.sampling import SamplingParams

__all__ = ["LLM", "Completion", "LanternError", "ModelFileError", "SamplingParams", "Step"]
__version__ = "0.1.0"
