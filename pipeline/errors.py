"""The bottom layer's error helpers: the one config error type and the texts error messages share.

Imports nothing of the project, so every layer (schema, engine, stages, runner) can raise and format
errors the same way.
"""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is valid."""


def error_summary(error: BaseException, limit: int | None = 300) -> str:
    """`Type: first line of the message` for one-paragraph errors (an exception's message may be empty)."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:limit]}"


def closest(value: str, choices: list[str] | tuple[str, ...], n: int = 3) -> str:
    """'did you mean' text for error messages."""
    matches = difflib.get_close_matches(value, list(choices), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""
