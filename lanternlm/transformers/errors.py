"""The one error the facade adds, and the check that turns an argument Lantern does not support into it.

transformers' functions take many keyword arguments; the facade accepts the ones it honours (or that cannot
change the result) and names any other in one clear message, instead of ignoring it silently.
"""

from __future__ import annotations

from ..errors import LanternError


class UnsupportedArgumentError(LanternError, TypeError):
    """A transformers argument (or value) that lanternlm.transformers does not support; the message names it."""

    def __init__(self, where: str, name: str, why: str = ""):
        self.argument = name
        detail = f": {why}" if why else ""
        super().__init__(f"{where}: argument {name!r} is not supported by lanternlm.transformers{detail}")


def refuse_unknown(where: str, kwargs: dict, known: set[str] | frozenset[str]) -> None:
    """Raise for the first keyword in `kwargs` that is not in `known` (names sorted, so the error is stable)."""
    for name in sorted(kwargs):
        if name not in known:
            raise UnsupportedArgumentError(where, name)


def refuse_set(where: str, name: str, value, neutral=(None,), why: str = "") -> None:
    """Raise when an argument Lantern cannot honour is given a value other than its neutral ones."""
    if not any(value is n or value == n for n in neutral):
        raise UnsupportedArgumentError(where, name, why or f"got {value!r}")
