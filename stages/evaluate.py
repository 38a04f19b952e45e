"""Stage `evaluate`: the quality metrics evaluate.metrics chooses (accuracy, top-k, SQNR, agreement,
cosine similarity, a user's function; `auto` = sqnr and cosine for unlabeled data), serialized size, and
latency of each deployable form (eager GraphModule, TorchScript traced, traced and frozen); see
pipeline/quality.py and pipeline/measure.py.

The float reference's latency is kept in the latency cache (<cache.dir>/latency/, with cache.enabled), so a
sweep or repeated runs time it once.

Config keys read: evaluate.*, backend.engine, model.python_path, data.python_path (custom_metric), cache.*
(the float-output cache: with cache.enabled, float outputs are computed once per model and data).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import metric_keys
from pipeline.batch import ModelInputs
from pipeline.cache import OutputCache, outputs_key
from pipeline.engine.qconfigs import quantized_engine
from pipeline.measure import LatencyCache, measure_latency, serialized_bytes
from pipeline.progress import progress
from pipeline.quality import QualityAccumulator, metric_plan, resolve_custom_metric
from pipeline.schema import EvaluateSpec, PipelineSpec
from stages.types import EvaluationReport, Loaded, StageContext, write_json

log = logging.getLogger(__name__)

NAME = "evaluate"
CONSUMES = ("loaded",)
USES = ("reference", "lowered")
PRODUCES = ("evaluation",)
READS = ("evaluate", "backend", "model", "data", "cache")
OPTIONAL = False
MEASURES_TIME = True  # times models: the runner keeps tracking work from running beside it ...


def measures_time(spec: PipelineSpec) -> bool:
    """... when evaluate.latency.enabled; without latency the MLflow calls stay on their worker thread
    while the models are scored."""
    return spec.evaluate.latency.enabled


def evaluate(
    loaded: Loaded,
    candidates: dict[str, nn.Module],
    engine: str,
    spec: EvaluateSpec,
    python_path: list[str] | None = None,
    latency_cache: LatencyCache | None = None,
    cache_dir: Path | None = None,
) -> EvaluationReport:
    """`candidates` maps 'reference' and 'lowered' to models when those stages ran; float is loaded's.
    `python_path`: where evaluate.custom_metric may live (model.python_path, data.python_path). With
    `latency_cache`, the float model's latency is read from it when its key is there.

    Streams: one pass over the evaluation batches (evaluate.max_batches / max_samples of them), every
    model run on each batch, metrics accumulated per batch (QualityAccumulator), so memory holds a batch
    and its outputs whatever the set's size. With `cache_dir` (cache.enabled), the float outputs come from
    the float-output cache (pipeline/cache.py OutputCache), computed there once per model and data: every
    job of a sweep after the first runs only its int8 models."""
    plan = metric_plan(spec.metrics, spec.top_k, spec.custom_metric, list(python_path or []), loaded.has_accuracy)
    models = {"float": loaded.model, **candidates}
    models = {name: model for name, model in models.items() if name in spec.models}
    batches = loaded.data.evaluation.head(spec.max_batches, spec.max_samples)
    if len(batches) == 0:
        raise ValueError(
            "evaluate: the evaluation data is empty; check data.* (evaluation size), evaluate.max_batches and "
            "evaluate.max_samples."
        )
    metrics: dict[str, float] = {}
    cache = OutputCache(cache_dir) if cache_dir is not None and "float" in models else None
    key = outputs_key(loaded.model, batches.fingerprint()) if cache is not None else None
    if cache is not None and key is not None:
        metrics[metric_keys.FLOAT_EVALUATIONS] = float(cache.ensure(key, loaded.model, batches))
    elif "float" in models:
        metrics[metric_keys.FLOAT_EVALUATIONS] = 1.0
    labelled = loaded.has_accuracy
    accumulators = {name: QualityAccumulator(name, plan, labelled) for name in models}
    samples = 0
    latency_pool: list[ModelInputs] = []
    pool_size = max(spec.latency.batch_sizes, default=1)
    with quantized_engine(engine), torch.no_grad():
        for position, (inputs, labels) in enumerate(progress(batches, len(batches), "evaluate", log)):
            outputs: dict[str, torch.Tensor] = {}
            for name, model in models.items():
                if name == "float" and cache is not None and key is not None:
                    outputs[name] = cache.read(key, position)
                else:
                    outputs[name] = inputs.call(model)
            for name, accumulator in accumulators.items():
                accumulator.update(outputs[name], outputs.get("float"), labels if labelled else None)
            if sum(x.batch_size for x in latency_pool) < pool_size:
                latency_pool.append(inputs)
            samples += inputs.batch_size
        for accumulator in accumulators.values():
            metrics.update(accumulator.result())
        if metric_keys.LOWERED_ACCURACY in metrics and metric_keys.FLOAT_ACCURACY in metrics:
            metrics[metric_keys.ACCURACY_DELTA] = (
                metrics[metric_keys.LOWERED_ACCURACY] - metrics[metric_keys.FLOAT_ACCURACY]
            )
        metrics[metric_keys.EVAL_SAMPLES] = float(samples)

        if "lowered" in models:
            metrics[metric_keys.FLOAT_BYTES] = float(serialized_bytes(loaded.model))
            metrics[metric_keys.LOWERED_BYTES] = float(serialized_bytes(models["lowered"]))
            metrics[metric_keys.SIZE_RATIO] = metrics[metric_keys.LOWERED_BYTES] / metrics[metric_keys.FLOAT_BYTES]

        fastest: dict[str, str] = {}
        built: dict[str, dict[str, Any]] = {}
        shapes: list[tuple[int, ...]] = []
        if spec.latency.enabled:
            deployable = {name: model for name, model in models.items() if name != "reference"}
            pool = ModelInputs.cat(latency_pool)  # the first batches, enough for the largest latency batch
            latency, fastest = measure_latency(deployable, pool, spec.latency, latency_cache, built_forms=built)
            metrics.update(latency)
            shapes = [(min(spec.latency.batch_sizes), *t.shape[1:]) for _, t in pool.named()]  # the first batch timed
    lowered_forms = {form: run for form, run in built.get("lowered", {}).items() if form in ("traced", "frozen")}
    return EvaluationReport(metrics, fastest, lowered_forms, shapes if lowered_forms else [])


def check(spec: PipelineSpec) -> None:
    """evaluate.custom_metric imports (through model.python_path and data.python_path) and takes three arguments."""
    if spec.evaluate.custom_metric is not None:
        resolve_custom_metric(spec.evaluate.custom_metric, [*spec.model.python_path, *spec.data.python_path])


def compute(ctx: StageContext) -> dict[str, Any]:
    candidates = {name: ctx.artifacts[name].model for name in USES if name in ctx.artifacts}
    spec = ctx.spec
    python_path = [*spec.model.python_path, *spec.data.python_path]
    latency = LatencyCache(latency_cache_dir(spec.cache.dir)) if spec.cache.enabled else None
    outputs_dir = Path(spec.cache.dir) if spec.cache.enabled and spec.cache.float_outputs else None
    loaded = ctx.artifacts["loaded"]
    report = evaluate(loaded, candidates, spec.backend.engine, spec.evaluate, python_path, latency, outputs_dir)
    return {"evaluation": report}


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
