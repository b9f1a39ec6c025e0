"""Serving many requests at once: continuous batching over a slotted KV cache."""

from .engine import Engine, EngineDeadError, EngineStats, QueueFullError
from .sequence import Event

__all__ = ["Engine", "EngineDeadError", "EngineStats", "Event", "QueueFullError"]
