"""The scoring set a search scores its trials on, streamed: the evaluation batches (iterated once per
trial) and the float model's output for each, computed once and stored on disk per batch (the float-output
cache of pipeline/cache.py, shared with evaluate and other jobs; without cache.enabled a temporary folder,
removed on close), then read back batch by batch. A trial's quality accumulates per batch
(QualityAccumulator, as evaluate does), so memory holds a batch, its outputs and the model's activations
for it whatever the set's size (evaluate.max_samples, the data); the layer sensitivity reads `inputs()` batch
by batch too, and latency is timed on the first batches only (`latency_pool`).

The custom metric is the exception QualityAccumulator documents: a function of all outputs, so its inputs
are gathered (bound it with evaluate.max_samples)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from pipeline import metric_keys, quality
from pipeline.batch import ModelInputs
from pipeline.cache import OutputCache, outputs_key
from pipeline.engine.qconfigs import quantized_engine
from pipeline.quality import MetricPlan, QualityAccumulator


class ScoringSet:
    """`batches` (a BatchSource) and `model`'s outputs on them, from the float-output cache under
    `cache_dir` (computed there if missing), or from a temporary folder with `cache_dir` None. Use it as a
    context manager, or call close(), to remove the temporary folder. `stage`: who asks (search, diagnose),
    in the log lines and errors."""

    def __init__(
        self, model: nn.Module, batches: Any, labelled: bool, cache_dir: Path | None = None, stage: str = "search"
    ) -> None:
        if len(batches) == 0:
            raise ValueError(
                f"{stage}: the evaluation data is empty; check data.* (evaluation size), evaluate.max_batches and "
                "evaluate.max_samples."
            )
        self.batches = batches
        self.labelled = labelled
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        if cache_dir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="fx-ptq-float-outputs-")
            cache_dir = Path(self._temporary.name)
        self.cache = OutputCache(cache_dir)
        self.key = outputs_key(model, batches.fingerprint())
        self.float_evaluations = self.cache.ensure(self.key, model, batches, stage)  # 1: computed now, 0: cached

    @property
    def samples(self) -> int:
        return int(self.batches.num_samples)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[ModelInputs, torch.Tensor, torch.Tensor | None]]:
        """(inputs, the float model's outputs, labels or None) batch by batch."""
        for position, (inputs, labels) in enumerate(self.batches):
            yield inputs, self.cache.read(self.key, position), labels if self.labelled else None

    def inputs(self) -> Iterator[ModelInputs]:
        """The inputs batch by batch (what the layer sensitivity runs on)."""
        for inputs, _ in self.batches:
            yield inputs

    def score(self, name: str, model: nn.Module, plan: MetricPlan, engine: str) -> dict[str, float]:
        """The plan's metrics of `model` against the float outputs (and labels), accumulated per batch: equal,
        up to float rounding, to quality_metrics on the batches joined."""
        accumulator = QualityAccumulator(name, plan, self.labelled)
        with quantized_engine(engine), torch.no_grad():
            for inputs, float_outputs, labels in self:
                accumulator.update(inputs.call(model), float_outputs, labels)
        return accumulator.result(with_interval=False)

    def float_score(self, criterion: str, plan: MetricPlan) -> float:
        """The float model's own value of a search criterion (quality.float_score on the batches joined): its
        accuracy / top-k counted per batch, the custom metric of float against float on all outputs, inf for
        SQNR, 1.0 for agreement and cosine (float against itself: no pass over the data)."""
        if criterion in ("accuracy", "topk"):
            accumulator = QualityAccumulator("float", MetricPlan((criterion,), plan.top_k), labelled=True)
            for _, float_outputs, labels in self:
                accumulator.update(float_outputs, None, labels)
            key = metric_keys.eval_metric("float", metric_keys.criterion_metric(criterion, plan.top_k))
            return accumulator.result(with_interval=False)[key]
        if criterion == "custom":
            parts = [(float_outputs, labels) for _, float_outputs, labels in self]
            labels = None if parts[0][1] is None else torch.cat([part[1] for part in parts])  # type: ignore[misc]
            return quality.float_score(criterion, torch.cat([part[0] for part in parts]), labels, plan)
        return float("inf") if criterion == "sqnr" else 1.0

    def latency_pool(self, size: int) -> ModelInputs:
        """The first batches, enough for a latency batch of `size` (usually the first batch alone): what
        measure_latency repeats to `size`, the same samples as the whole set would give it."""
        pool: list[ModelInputs] = []
        for inputs, _ in self.batches:
            pool.append(inputs)
            if sum(part.batch_size for part in pool) >= size:
                break
        return pool[0] if len(pool) == 1 else ModelInputs.cat(pool)

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    def __enter__(self) -> ScoringSet:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
