"""One thread at a time in `ast.parse`, while the tracking worker thread runs beside the stages.

Why: CPython before 3.13 keeps the AST constructor's recursion counter in interpreter-wide state, so two
threads in `ast.parse` at once (one of them switched out mid-parse by a garbage collection that runs a
finalizer) corrupt it, and the parse fails with `SystemError: AST constructor recursion depth mismatch`
(cpython gh-106905). A run does that: the tracking worker imports mlflow, whose imports call
`inspect.signature` on builtins (numpy.ma), which parses text with `ast.parse`, while the main thread
scripts or traces a model (torch.jit parses the model's source the same way). CI's run failed in
evaluate exactly so. Both callers reach the parser through the module attribute `ast.parse`, so wrapping
that attribute in a lock serializes them; a re-entrant lock, because a finalizer run by the collector
inside a parse may parse again on the same thread.
"""

from __future__ import annotations

import ast
import functools
import sys
import threading
from typing import Any

_LOCK = threading.RLock()


def serialize_ast_parse() -> None:
    """Make `ast.parse` hold one process-wide lock (once; not needed from Python 3.13, where each parse
    counts its own recursion)."""
    if sys.version_info >= (3, 13) or getattr(ast.parse, "serialized", False):
        return
    unlocked = ast.parse

    @functools.wraps(unlocked)
    def parse(*args: Any, **kwargs: Any) -> ast.AST:
        with _LOCK:
            return unlocked(*args, **kwargs)

    parse.serialized = True  # type: ignore[attr-defined]
    ast.parse = parse  # type: ignore[assignment]
