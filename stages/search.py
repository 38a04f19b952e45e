"""Stage `search` (optional: search=greedy sets search.enabled=true): the fastest skip-list that meets a
bar on search.criterion (accuracy, top-k, agreement, SQNR, cosine similarity or evaluate.custom_metric;
higher is better for each), re-converting one calibrated model for every trial.

Trial 0 is the fully quantized model. If it misses the bar, layers return to float one at a time in
order of measured sensitivity (each layer's own output SQNR, worst first) until the bar is met; then
each skipped layer but the last is tried back in int8 and stays int8 if the bar still holds. The
winner is the fastest trial that meets the bar (or, if none does, the one closest to it).

Config keys read: search.*, evaluate.max_batches, evaluate.latency.*, evaluate.metrics, evaluate.top_k,
evaluate.custom_metric, evaluate.max_samples, backend.*, qconfig_mapping.*, custom_config.convert, model.python_path,
data.python_path, cache.* (float outputs from the float-output cache, shared with evaluate and other jobs).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pipeline import measure, metric_keys
from pipeline.batch import ModelInputs
from pipeline.cache import OutputCache, outputs_key
from pipeline.engine import get_engine, steps
from pipeline.engine.numerics import LayerSensitivity
from pipeline.engine.qconfigs import quantized_engine
from pipeline.errors import ConfigError
from pipeline.measure import measure_latency, metric_plan, quality_metrics, resolve_custom_metric
from pipeline.schema import (
    BackendSpec,
    CustomConfigSpec,
    EvaluateSpec,
    PipelineSpec,
    QConfigMappingSpec,
    RecoverySpec,
    SearchSpec,
    SkipSpec,
    skip_label,
    skip_yaml,
)
from stages.types import Calibrated, Loaded, StageContext

log = logging.getLogger(__name__)

NAME = "search"
CONSUMES = ("loaded", "calibrated")
USES: tuple[str, ...] = ()
PRODUCES = ("search", "searched_skip")
READS = (
    "search",
    "evaluate",
    "backend",
    "qconfig_mapping",
    "custom_config",
    "recovery",
    "calibrate",
    "model",
    "data",
    "cache",
)
OPTIONAL = True
# Fatal although optional: the winner is the skip-list the run converts, evaluates and exports with; a
# run going on without it would report and export a model other than the one the user asked for.
FAILURE_IS_FATAL = True


@dataclass
class Trial:
    number: int
    skipped: list[str]  # module names left float
    score: float  # the criterion's value (accuracy, SQNR, mean cosine ...)
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


def check(spec: PipelineSpec) -> None:
    blocker = get_engine(spec.engine).numerics_blocker(spec.custom_config)
    if blocker is not None:
        raise ConfigError(
            f"search.strategy='{spec.search.strategy}' ranks layers with torch's FX numeric suite, but {blocker}. "
            f"Use search=none and sweep skip-lists instead (python -m pipeline -m skip=...)."
        )
    if spec.search.criterion in ("accuracy", "topk") and not spec.model.trained:
        raise ConfigError(
            f"search.criterion='{spec.search.criterion}' needs a trained model (model.trained=false means random "
            f"weights); use search.criterion=cosine with search.min_cosine, or sqnr with search.min_sqnr_db."
        )
    if spec.search.criterion == "custom" and spec.evaluate.custom_metric is not None:
        resolve_custom_metric(spec.evaluate.custom_metric, [*spec.model.python_path, *spec.data.python_path])


def _bar(spec: SearchSpec, float_score: float) -> float:
    """The lowest accepted score: a fixed bar (sqnr, cosine, custom) or a drop below float (accuracy, topk,
    agreement; float agrees with itself, 1.0)."""
    fixed = {"sqnr": spec.min_sqnr_db, "cosine": spec.min_cosine, "custom": spec.min_value}
    if spec.criterion in fixed:
        return fixed[spec.criterion]
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
    python_path: list[str] | None = None,
    recovery: RecoverySpec | None = None,
    calibration: list[Any] | None = None,
    cache_dir: Path | None = None,
) -> SearchResult:
    """`python_path`: where evaluate.custom_metric may live (model.python_path, data.python_path). With
    recovery.bias_correction and the calibration inputs, every trial is bias-corrected like the
    reference_convert stage does, so the winner is scored as it will ship."""
    if spec.criterion in ("accuracy", "topk") and not loaded.data.has_labels:
        raise ValueError(
            f"search.criterion='{spec.criterion}' needs labelled data; use search.criterion=cosine or sqnr."
        )
    plan = metric_plan(
        [*evaluate_spec.metrics, spec.criterion],
        evaluate_spec.top_k,
        evaluate_spec.custom_metric,
        list(python_path or []),
        loaded.has_accuracy,
    )
    score_key = metric_keys.eval_metric("lowered", metric_keys.criterion_metric(spec.criterion, evaluate_spec.top_k))
    batches = loaded.data.evaluation.head(evaluate_spec.max_batches, evaluate_spec.max_samples)
    inputs = ModelInputs.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches]) if loaded.has_accuracy else None  # random weights: no accuracy
    latency_spec = replace(evaluate_spec.latency, batch_sizes=evaluate_spec.latency.batch_sizes[:1])
    size = latency_spec.batch_sizes[0]
    if cache_dir is not None:  # the float outputs evaluate uses too: computed once per model and data
        cache, key = OutputCache(cache_dir), outputs_key(loaded.model, batches.fingerprint())
        cache.ensure(key, loaded.model, batches)
        float_outputs = cache.read_all(key, len(batches))
    else:
        with torch.no_grad():
            float_outputs = inputs.call(loaded.model)
    float_score = measure.float_score(spec.criterion, float_outputs, labels, plan)
    float_latency, _ = measure_latency({"float": loaded.model}, inputs, latency_spec)
    float_ms = float_latency[metric_keys.latency_ms("float", size)]
    bar = _bar(spec, float_score)
    trials: list[Trial] = []
    lowered_models: dict[int, torch.nn.Module] = {}

    def run_trial(skipped: list[str]) -> Trial:
        skip = SkipSpec(name=f"trial_{len(trials)}", module_name=list(skipped))
        conversion = steps.convert_reference(calibrated.model, backend, mapping, skip, custom)
        if recovery is not None and recovery.bias_correction and calibration:
            steps.correct_bias(conversion, calibrated.model, calibration, recovery)
        try:
            lowered, counts = steps.lower(conversion, backend, loaded.data.example_inputs)
        except steps.NothingQuantizedError:
            lowered = None
        if lowered is None:
            # Everything float: it meets any bar at float speed; score it as float.
            score, latency, metrics = float_score, float_ms, {}
        else:
            with quantized_engine(backend.engine), torch.no_grad():
                outputs = inputs.call(lowered)
            timing, _ = measure_latency({"lowered": lowered}, inputs, latency_spec)
            latency = timing[metric_keys.latency_ms("lowered", size)]
            metrics = {
                **quality_metrics("lowered", outputs, float_outputs, labels, plan),
                metric_keys.latency_ms("lowered", size): latency,
                metric_keys.speedup(size): float_ms / latency,
                metric_keys.QUANTIZED_NODES: float(counts["quantized"]),
            }
            score = metrics[score_key]
            lowered_models[len(trials)] = lowered
        metrics[metric_keys.SEARCH_FLOAT_LAYERS] = float(len(skipped))
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


def trial_name(trial: Trial) -> str:
    """A trial's MLflow run name, by what it left float: `trial 2: float hidden.1,hidden.2`."""
    left = f"float {','.join(trial.skipped)}" if trial.skipped else "all int8"
    name = f"trial {trial.number}: {left}"
    return name if len(name) <= 120 else name[:117] + "..."


def compute(ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec

    def report_trial(trial: Trial) -> None:
        ctx.log_child_run(
            trial_name(trial),
            {"trial": str(trial.number), "skip.module_name": str(trial.skipped)},
            {"skip": f"trial_{trial.number}", "search_trial": str(trial.number)},
            {**trial.metrics, metric_keys.SEARCH_SCORE: trial.score, metric_keys.SEARCH_MEETS: float(trial.meets)},
        )

    result = search(
        ctx.artifacts["loaded"],
        ctx.artifacts["calibrated"],
        spec.backend,
        spec.qconfig_mapping,
        spec.custom_config,
        spec.evaluate,
        spec.search,
        report_trial,
        [*spec.model.python_path, *spec.data.python_path],
        spec.recovery,
        [inputs for inputs, _ in ctx.artifacts["loaded"].data.calibration[: spec.calibrate.max_batches]],
        Path(spec.cache.dir) if spec.cache.enabled and spec.cache.float_outputs else None,
    )
    return {"search": result, "searched_skip": result.skip_spec()}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """trials.csv, sensitivity.csv, searched_skip.yaml and trials.png."""
    result: SearchResult = produced["search"]
    write_outputs(result, ctx.spec.search.criterion, ctx.out_dir)
    ctx.set_tags(
        {"skip": f"searched:{skip_label(result.skip_spec())}", "search_winner_trial": str(result.winner.number)}
    )
    return {
        metric_keys.SEARCH_TRIALS: float(len(result.trials)),
        metric_keys.SEARCH_MET: float(result.met),
        metric_keys.SEARCH_BAR: result.bar,
        metric_keys.SEARCH_WINNER_TRIAL: float(result.winner.number),
        metric_keys.SEARCH_WINNER_SCORE: result.winner.score,
        metric_keys.SEARCH_WINNER_FLOAT_LAYERS: float(len(result.winner.skipped)),
        metric_keys.SEARCH_WINNER_LATENCY_MS: result.winner.latency_ms,
    }


def write_outputs(result: SearchResult, criterion: str, out: Path) -> None:
    """Trial table, sensitivity table, the winning skip-list as conf/skip YAML, and a history plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "trials.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["trial", "float_layers", criterion, "meets_bar", "latency_ms", "skipped"])
        for trial in result.trials:
            writer.writerow(
                [
                    trial.number,
                    len(trial.skipped),
                    f"{trial.score:.6g}",
                    trial.meets,
                    f"{trial.latency_ms:.4f}",
                    " ".join(trial.skipped),
                ]
            )
    with (out / "sensitivity.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["module_name", "quantized_type", "own_output_sqnr_db"])
        for layer in result.sensitivity:
            writer.writerow([layer.module_name, layer.quantized_type, f"{layer.sqnr_db:.3f}"])
    header = (
        f"Found by search=greedy: trial {result.winner.number} of {len(result.trials)}, {criterion} "
        f"{result.winner.score:.4g} (bar {result.bar:.4g}){'' if result.met else ' - did NOT meet the bar'}.\n"
        f"Copy to conf/skip/searched.yaml and run with skip=searched.\n"
    )
    (out / "searched_skip.yaml").write_text(skip_yaml(result.skip_spec(), header))

    figure, axis = plt.subplots(figsize=(7, 4))
    numbers = [trial.number for trial in result.trials]
    axis.plot(numbers, [trial.score for trial in result.trials], color="0.6", zorder=1)
    for trial in result.trials:
        axis.scatter(trial.number, trial.score, color="tab:green" if trial.meets else "tab:red", zorder=2)
        axis.annotate(
            f"{len(trial.skipped)} fp32",
            (trial.number, trial.score),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    axis.axhline(result.bar, linestyle="--", color="tab:blue", label=f"bar {result.bar:.4g}")
    axis.scatter(
        [result.winner.number],
        [result.winner.score],
        s=200,
        facecolors="none",
        edgecolors="black",
        label=f"winner (trial {result.winner.number})",
    )
    axis.set_xlabel("trial")
    axis.set_ylabel(criterion)
    axis.set_title("skip search: green meets the bar, red misses; labels = layers left float")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "trials.png", dpi=100)
    plt.close(figure)
