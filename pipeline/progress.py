"""The one progress helper for long loops (calibration, evaluation, latency)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

EVERY_SECONDS = 30.0  # a long loop also logs at least this often


def progress(items: Iterable[T], total: int, label: str, logger: logging.Logger) -> Iterator[T]:
    """Yield items, logging '<label>: i/total (elapsed, rate, ETA)' at each quarter and at least every
    EVERY_SECONDS, so long loops (an evaluation of 50,000 images) show life and time left without
    redrawing lines (a redrawn bar garbles Hydra's log file)."""
    step = max(1, -(-total // 4))
    start = last = time.perf_counter()
    for index, item in enumerate(items, start=1):
        yield item
        now = time.perf_counter()
        if index % step == 0 or index == total or now - last >= EVERY_SECONDS:
            last = now
            elapsed = now - start
            left = elapsed / index * max(0, total - index)
            eta = f", ETA {left:.0f}s" if index < total else ""
            logger.info("%s: %d/%d (%.1fs, %.2f/s%s)", label, index, total, elapsed, index / max(elapsed, 1e-9), eta)
