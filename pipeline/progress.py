"""The one progress helper for long loops (calibration, evaluation, latency)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, label: str, logger: logging.Logger) -> Iterator[T]:
    """Yield items, logging '<label>: i/total' at most four times, so long loops show life without
    redrawing lines (a redrawn bar garbles Hydra's log file)."""
    step = max(1, -(-total // 4))
    start = time.perf_counter()
    for index, item in enumerate(items, start=1):
        yield item
        if index % step == 0 or index == total:
            logger.info("%s: %d/%d (%.1fs)", label, index, total, time.perf_counter() - start)
