"""The typed values that flow between stages, and the one progress helper they share."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.fx import GraphModule

Batch = tuple[torch.Tensor, torch.Tensor | None]
"""Inputs and, when the data set has them, integer class labels."""


@dataclass
class DataBundle:
    """Calibration and evaluation batches; labels may be None (then accuracy is not reported)."""

    name: str
    calibration: list[Batch]
    evaluation: list[Batch]
    example_inputs: tuple[torch.Tensor, ...]
    has_labels: bool

    @property
    def num_calibration_samples(self) -> int:
        return sum(int(x.shape[0]) for x, _ in self.calibration)

    @property
    def num_evaluation_samples(self) -> int:
        return sum(int(x.shape[0]) for x, _ in self.evaluation)


@dataclass
class Loaded:
    """Output of `load`: the float model in eval mode and its data."""

    model: nn.Module
    data: DataBundle
    model_name: str
    trained_weights: bool

    @property
    def has_accuracy(self) -> bool:
        """Accuracy means something: labelled data and trained weights (not model.trained=false)."""
        return self.data.has_labels and self.trained_weights


@dataclass
class Calibrated:
    """Output of `calibrate`: the prepared (observed) model after calibration batches."""

    model: GraphModule
    num_batches: int
    num_samples: int
    cache_hit: bool = False
    cache_key: str | None = None


@dataclass
class ReferenceModel:
    """Output of `reference_convert`: the reference model plus what lowering needs from the convert step
    (`engine_state`: opaque here, created and read only by the engine that converted)."""

    model: GraphModule
    engine_state: object
    left_float: list[str] = field(default_factory=list)


@dataclass
class Lowered:
    """Output of `lower`: the model running the backend's quantized operators."""

    model: GraphModule
    engine: str
    node_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class EvaluationReport:
    """Output of `evaluate`: flat metric names (as logged to MLflow) and a few per-form details."""

    metrics: dict[str, float]
    fastest_form: dict[str, str]


@dataclass
class ExportBundle:
    """Output of `export`: files written, by format, and the formats skipped with the reason."""

    files: dict[str, Path]
    skipped: dict[str, str]
    metrics: dict[str, float]


T = TypeVar("T")


def progress(items: Iterable[T], total: int, label: str, log: logging.Logger) -> Iterator[T]:
    """Yield items, logging '<label>: i/total' at most four times, so long loops show life without
    redrawing lines (a redrawn bar garbles Hydra's log file)."""
    step = max(1, -(-total // 4))
    start = time.perf_counter()
    for index, item in enumerate(items, start=1):
        yield item
        if index % step == 0 or index == total:
            log.info("%s: %d/%d (%.1fs)", label, index, total, time.perf_counter() - start)
