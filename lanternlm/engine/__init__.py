"""Serving many requests at once: continuous batching over a paged KV cache (engine.py: the thread and its
steps; scheduler.py: who runs; runner.py: one forward per batch; sequence.py: one request)."""

from .engine import Engine, EngineDeadError, EngineStats
from .scheduler import QueueFullError
from .sequence import Event

__all__ = ["Engine", "EngineDeadError", "EngineStats", "Event", "QueueFullError"]
