"""Stage `search` (runs only with search.strategy=greedy): the fastest skip-list that meets an
accuracy (or SQNR) bar, re-converting one calibrated model for every trial.

Trial 0 is the fully quantized model. If it misses the bar, layers return to float one at a time in
order of measured sensitivity (each layer's own output SQNR, worst first) until the bar is met; then
each skipped layer but the last is tried back in int8 and stays int8 if the bar still holds. The
winner is the fastest trial that meets the bar (or, if none does, the one closest to it).

Config keys read: search.*, evaluate.max_batches, evaluate.latency.*, backend.*, qconfig_mapping.*,
custom_config.convert.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from pipeline.engine import get_engine
from pipeline.engine.numerics import LayerSensitivity
from pipeline.engine.qconfigs import quantized_engine
from pipeline.schema import BackendSpec, CustomConfigSpec, EvaluateSpec, QConfigMappingSpec, SearchSpec, SkipSpec
from stages.evaluate import measure_latency, sqnr_db
from stages.lower import NothingQuantizedError, lower
from stages.reference_convert import reference_convert
from stages.types import Calibrated, Loaded

log = logging.getLogger(__name__)


@dataclass
class Trial:
    number: int
    skipped: list[str]  # module names left float
    score: float  # accuracy or SQNR, as the criterion says
    meets: bool
    latency_ms: float  # the fastest deployable form at the first evaluate.latency batch size
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SearchResult:
    winner: Trial
    trials: list[Trial]
    sensitivity: list[LayerSensitivity]
    float_score: float
    bar: float
    met: bool

    def skip_spec(self, name: str = "searched") -> SkipSpec:
        return SkipSpec(name=name, module_name=list(self.winner.skipped))


def _bar(spec: SearchSpec, float_score: float) -> float:
    if spec.criterion == "sqnr":
        return spec.min_sqnr_db
    if spec.drop_mode == "relative":
        return float_score * (1.0 - spec.max_drop)
    return float_score - spec.max_drop


def search(
    loaded: Loaded,
    calibrated: Calibrated,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    custom: CustomConfigSpec,
    evaluate_spec: EvaluateSpec,
    spec: SearchSpec,
    report_trial: Callable[[Trial], None] = lambda trial: None,
) -> SearchResult:
    if spec.criterion == "accuracy" and not loaded.data.has_labels:
        raise ValueError("search.criterion='accuracy' needs labelled data; use search.criterion=sqnr.")
    batches = loaded.data.evaluation[: evaluate_spec.max_batches]
    inputs = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches]) if loaded.has_accuracy else None  # random weights: no accuracy
    latency_spec = replace(evaluate_spec.latency, batch_sizes=evaluate_spec.latency.batch_sizes[:1])
    size = latency_spec.batch_sizes[0]
    with torch.no_grad():
        float_outputs = loaded.model(inputs)
    float_score = (
        (float_outputs.argmax(1) == labels).float().mean().item() if spec.criterion == "accuracy" else float("inf")
    )
    float_latency, _ = measure_latency({"float": loaded.model}, inputs, latency_spec)
    bar = _bar(spec, float_score)
    trials: list[Trial] = []
    lowered_models: dict[int, torch.nn.Module] = {}

    def run_trial(skipped: list[str]) -> Trial:
        skip = SkipSpec(name=f"trial_{len(trials)}", module_name=list(skipped))
        reference = reference_convert(calibrated, backend, mapping, skip, custom)
        try:
            lowered = lower(reference, backend, loaded.data.example_inputs)
        except NothingQuantizedError:
            lowered = None
        if lowered is None:
            # Everything float: it meets any bar at float speed; score it as float.
            score, latency, metrics = float_score, float_latency[f"latency/float/b{size}_ms"], {}
        else:
            with quantized_engine(backend.engine), torch.no_grad():
                outputs = lowered.model(inputs)
            timing, _ = measure_latency({"lowered": lowered.model}, inputs, latency_spec)
            latency = timing[f"latency/lowered/b{size}_ms"]
            metrics = {
                "eval/lowered/sqnr_db": sqnr_db(float_outputs, outputs),
                "eval/lowered/agreement": (outputs.argmax(1) == float_outputs.argmax(1)).float().mean().item(),
                f"latency/lowered/b{size}_ms": latency,
                f"latency/speedup_b{size}": float_latency[f"latency/float/b{size}_ms"] / latency,
                "nodes/quantized": float(lowered.node_counts["quantized"]),
            }
            if labels is not None:
                metrics["eval/lowered/accuracy"] = (outputs.argmax(1) == labels).float().mean().item()
            score = metrics["eval/lowered/accuracy" if spec.criterion == "accuracy" else "eval/lowered/sqnr_db"]
            lowered_models[len(trials)] = lowered.model
        metrics["search/float_layers"] = float(len(skipped))
        trial = Trial(len(trials), list(skipped), score, score >= bar, latency, metrics)
        trials.append(trial)
        log.info(
            "search trial %d: %d layers float, %s %.4g (bar %.4g: %s), %.3f ms",
            trial.number,
            len(skipped),
            spec.criterion,
            score,
            bar,
            "meets" if trial.meets else "misses",
            latency,
        )
        report_trial(trial)
        return trial

    first = run_trial([])
    sensitivity: list[LayerSensitivity] = []
    skipped: list[str] = []
    if not first.meets and 0 in lowered_models:
        sensitivity = get_engine().layer_sensitivity(calibrated.model, lowered_models[0], inputs, backend.engine)
        log.info(
            "search: sensitivity (own output SQNR, worst first): %s",
            ", ".join(f"{layer.module_name} {layer.sqnr_db:.1f} dB" for layer in sensitivity),
        )
        met = False
        for layer in sensitivity:
            if len(trials) >= spec.max_trials:
                break
            skipped.append(layer.module_name)
            if run_trial(skipped).meets:
                met = True
                break
        if met and spec.requantize:
            for name in list(skipped[:-1]):
                if len(trials) >= spec.max_trials:
                    break
                candidate = [s for s in skipped if s != name]
                if run_trial(candidate).meets:
                    skipped = candidate
    passing = [trial for trial in trials if trial.meets]
    winner = (
        min(passing, key=lambda trial: (trial.latency_ms, len(trial.skipped)))
        if passing
        else max(trials, key=lambda trial: trial.score)
    )
    log.info(
        "search: winner is trial %d (%s), %d layers float: %s",
        winner.number,
        "meets the bar" if winner.meets else "NO trial met the bar; closest",
        len(winner.skipped),
        winner.skipped,
    )
    return SearchResult(winner, trials, sensitivity, float_score, bar, bool(passing))
