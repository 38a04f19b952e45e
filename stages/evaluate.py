"""Stage `evaluate`: the quality metrics evaluate.metrics chooses (accuracy, top-k, SQNR, agreement,
cosine similarity, a user's function; `auto` = sqnr and cosine for unlabeled data), serialized size, and
latency of each deployable form (eager GraphModule, TorchScript traced, traced and frozen); see
pipeline/measure.py.

The float reference's latency is kept in the latency cache (<cache.dir>/latency/, with cache.enabled), so a
sweep or repeated runs time it once.

Config keys read: evaluate.*, backend.engine, model.python_path, data.python_path (custom_metric), cache.*.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import metric_keys
from pipeline.batch import ModelInputs
from pipeline.engine.qconfigs import quantized_engine
from pipeline.measure import (
    LatencyCache,
    measure_latency,
    metric_plan,
    quality_metrics,
    resolve_custom_metric,
    serialized_bytes,
)
from pipeline.schema import EvaluateSpec, PipelineSpec
from stages.types import EvaluationReport, Loaded, StageContext, write_json

log = logging.getLogger(__name__)

NAME = "evaluate"
CONSUMES = ("loaded",)
USES = ("reference", "lowered")
PRODUCES = ("evaluation",)
READS = ("evaluate", "backend", "model", "data", "cache")
OPTIONAL = False


def evaluate(
    loaded: Loaded,
    candidates: dict[str, nn.Module],
    engine: str,
    spec: EvaluateSpec,
    python_path: list[str] | None = None,
    latency_cache: LatencyCache | None = None,
) -> EvaluationReport:
    """`candidates` maps 'reference' and 'lowered' to models when those stages ran; float is loaded's.
    `python_path`: where evaluate.custom_metric may live (model.python_path, data.python_path). With
    `latency_cache`, the float model's latency is read from it when its key is there."""
    plan = metric_plan(spec.metrics, spec.top_k, spec.custom_metric, list(python_path or []), loaded.has_accuracy)
    models = {"float": loaded.model, **candidates}
    models = {name: model for name, model in models.items() if name in spec.models}
    batches = loaded.data.evaluation[: spec.max_batches]
    if not batches:
        raise ValueError(
            "evaluate: the evaluation data is empty; check data.* (evaluation size) and evaluate.max_batches."
        )
    metrics: dict[str, float] = {}
    with quantized_engine(engine), torch.no_grad():
        outputs = {name: torch.cat([inputs.call(model) for inputs, _ in batches]) for name, model in models.items()}
        labels = torch.cat([label for _, label in batches]) if loaded.has_accuracy else None
        for name, logits in outputs.items():
            metrics.update(quality_metrics(name, logits, outputs.get("float"), labels, plan))
        if metric_keys.LOWERED_ACCURACY in metrics and metric_keys.FLOAT_ACCURACY in metrics:
            metrics[metric_keys.ACCURACY_DELTA] = (
                metrics[metric_keys.LOWERED_ACCURACY] - metrics[metric_keys.FLOAT_ACCURACY]
            )
        metrics[metric_keys.EVAL_SAMPLES] = float(sum(inputs.batch_size for inputs, _ in batches))

        if "lowered" in models:
            metrics[metric_keys.FLOAT_BYTES] = float(serialized_bytes(loaded.model))
            metrics[metric_keys.LOWERED_BYTES] = float(serialized_bytes(models["lowered"]))
            metrics[metric_keys.SIZE_RATIO] = metrics[metric_keys.LOWERED_BYTES] / metrics[metric_keys.FLOAT_BYTES]

        fastest: dict[str, str] = {}
        if spec.latency.enabled:
            deployable = {name: model for name, model in models.items() if name != "reference"}
            pool = ModelInputs.cat([inputs for inputs, _ in batches])
            latency, fastest = measure_latency(deployable, pool, spec.latency, latency_cache)
            metrics.update(latency)
    return EvaluationReport(metrics=metrics, fastest_form=fastest)


def check(spec: PipelineSpec) -> None:
    """evaluate.custom_metric imports (through model.python_path and data.python_path) and takes three arguments."""
    if spec.evaluate.custom_metric is not None:
        resolve_custom_metric(spec.evaluate.custom_metric, [*spec.model.python_path, *spec.data.python_path])


def compute(ctx: StageContext) -> dict[str, Any]:
    candidates = {name: ctx.artifacts[name].model for name in USES if name in ctx.artifacts}
    spec = ctx.spec
    python_path = [*spec.model.python_path, *spec.data.python_path]
    cache = LatencyCache(latency_cache_dir(spec.cache.dir)) if spec.cache.enabled else None
    loaded = ctx.artifacts["loaded"]
    return {"evaluation": evaluate(loaded, candidates, spec.backend.engine, spec.evaluate, python_path, cache)}


def latency_cache_dir(cache_dir: str) -> Path:
    """The latency cache's folder: next to the calibration cache's entries."""
    return Path(cache_dir) / "latency"


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """metrics.json and fastest_form.json; the headline figures on the console."""
    out = ctx.out_dir
    report: EvaluationReport = produced["evaluation"]
    write_json(out / "metrics.json", report.metrics)
    write_json(out / "fastest_form.json", report.fastest_form)
    for key in metric_keys.quality_metric_names(ctx.spec.evaluate.top_k):
        figures = {name: report.metrics.get(metric_keys.eval_metric(name, key)) for name in metric_keys.MODELS}
        shown = ", ".join(f"{name} {value:.4g}" for name, value in figures.items() if value is not None)
        if shown:
            log.info("evaluate %s: %s", key, shown)
    for size in ctx.spec.evaluate.latency.batch_sizes:
        speedup = report.metrics.get(metric_keys.speedup(size))
        if speedup is not None:
            log.info(
                "latency batch %d: float %s (%s), lowered %s (%s), speedup %.2fx [%.2f, %.2f]",
                size,
                _with_interval(report.metrics, "float", size),
                report.fastest_form[f"float/b{size}"],
                _with_interval(report.metrics, "lowered", size),
                report.fastest_form[f"lowered/b{size}"],
                speedup,
                report.metrics.get(metric_keys.speedup_ci(size, "low"), speedup),
                report.metrics.get(metric_keys.speedup_ci(size, "high"), speedup),
            )
    return report.metrics


def _with_interval(metrics: dict[str, float], model: str, size: int) -> str:
    """e.g. "0.412 ms [0.405, 0.420]": the median and its 95% interval."""
    median = metrics[metric_keys.latency_ms(model, size)]
    low = metrics.get(metric_keys.latency_ci_ms(model, size, "low"), median)
    high = metrics.get(metric_keys.latency_ci_ms(model, size, "high"), median)
    return f"{median:.3f} ms [{low:.3f}, {high:.3f}]"
