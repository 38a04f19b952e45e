"""Stage `search` (optional: search=greedy sets search.enabled=true): the fastest skip-list that meets a
bar on search.criterion (accuracy, top-k, agreement, SQNR, cosine similarity or evaluate.custom_metric;
higher is better for each), re-converting one calibrated model for every trial.

Trial 0 is the fully quantized model. If it misses the bar, the layers a skip-list can leave float (the
modules with weights the lowered graph calls) are ranked by measured sensitivity (each layer's own output
SQNR, worst first, after the ReLU6/hardtanh clip where there is one), and a bisection over that order finds
the smallest prefix whose layers left float meet the bar: about log2(layers) trials, so the default
search.max_trials (null) is 2*ceil(log2(layers))+4. Then each skipped layer but the last is tried back in
int8 and stays int8 if the bar still holds. The winner is the fastest trial that meets the bar, where
latencies within the measured noise (the p90-median spread, at least search.latency_tie of the faster
one) tie and the trial with fewer float layers wins; if none meets it, the one closest to it, and the
miss is loud: a WARNING, a line in the run's warnings summary, the tag search_met=false and, with
search.fail_on_miss (default), exit code 3 once the run has finished.

Accuracy-like scores (accuracy, agreement) come with a 95% Wilson interval; when one evaluation sample
moves the score by more than a quarter of search.max_drop, a warning says the bar rests on a few samples.

Streams (pipeline/scoring.py): each trial runs over the evaluation batches one at a time, its metrics
accumulated per batch against the float outputs read back per batch from the float-output cache (a
temporary folder without cache.enabled), the layer sensitivity accumulated per batch too, latency timed on
the first batch(es): memory stays a few batches whatever evaluate.max_samples or the data's size.

Config keys read: search.*, evaluate.max_batches, evaluate.latency.*, evaluate.metrics, evaluate.top_k,
evaluate.custom_metric, evaluate.max_samples, backend.*, qconfig_mapping.*, custom_config.convert, model.python_path,
data.python_path, cache.* (float outputs from the float-output cache, shared with evaluate and other jobs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline import metric_keys
from pipeline.batch import ModelInputs
from pipeline.engine import get_engine, steps
from pipeline.engine.numerics import LayerSensitivity
from pipeline.engine.skip_search import (
    PROPORTIONS,
    SearchResult,
    Trial,
    acceptance_bar,
    bisect,
    default_max_trials,
    pick_winner,
    wilson_interval,
)
from pipeline.errors import ConfigError
from pipeline.measure import LatencyCache, measure_latency
from pipeline.quality import metric_plan, resolve_custom_metric
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
)
from pipeline.scoring import ScoringSet
from stages.reports.search import write_outputs
from stages.types import Calibrated, Loaded, SearchedCalibration, StageContext

log = logging.getLogger(__name__)

NAME = "search"
CONSUMES = ("loaded", "calibrated")
USES: tuple[str, ...] = ()
PRODUCES = ("search", "searched_skip", "searched_calibration")
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
MEASURES_TIME = True  # times models: the runner keeps tracking work from running beside it
# Fatal although optional: the winner is the skip-list the run converts, evaluates and exports with; a
# run going on without it would report and export a model other than the one the user asked for.
FAILURE_IS_FATAL = True


def check(spec: PipelineSpec) -> None:
    blocker = get_engine(spec.engine).numerics_blocker(spec.custom_config)
    if blocker is not None:
        raise ConfigError(
            f"search.strategy='{spec.search.strategy}' ranks layers by per-layer numerics, but {blocker}. "
            f"Use search=none and sweep skip-lists instead (python -m pipeline -m skip=...)."
        )
    if spec.search.criterion in ("accuracy", "topk") and not spec.model.trained:
        raise ConfigError(
            f"search.criterion='{spec.search.criterion}' needs a trained model (model.trained=false means random "
            f"weights); use search.criterion=cosine with search.min_cosine, or sqnr with search.min_sqnr_db."
        )
    if spec.search.criterion == "custom" and spec.evaluate.custom_metric is not None:
        resolve_custom_metric(spec.evaluate.custom_metric, [*spec.model.python_path, *spec.data.python_path])


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
    latency_cache: LatencyCache | None = None,
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
    latency_spec = replace(evaluate_spec.latency, batch_sizes=evaluate_spec.latency.batch_sizes[:1])
    size = latency_spec.batch_sizes[0]
    trials: list[Trial] = []
    sensitivity: list[LayerSensitivity] = []
    # Streamed: every trial re-reads the batches and the float outputs (cached on disk, shared with evaluate)
    # one batch at a time, so memory does not grow with evaluate.max_samples or the data (pipeline/scoring.py).
    with ScoringSet(loaded.model, batches, loaded.has_accuracy, cache_dir) as scoring:
        float_score = scoring.float_score(spec.criterion, plan)
        # Latency needs a representative batch, not the set: the first batches, enough for the batch size.
        pool = scoring.latency_pool(size)
        float_latency, _ = measure_latency({"float": loaded.model}, pool, latency_spec, latency_cache)
        float_ms = float_latency[metric_keys.latency_ms("float", size)]
        bar = acceptance_bar(spec, float_score)
        samples = scoring.samples
        proportion = spec.criterion in PROPORTIONS
        if proportion and spec.drop_mode == "absolute" and 1.0 / samples > spec.max_drop / 4:
            log.warning(
                "search: scored on %d evaluation samples, so one sample moves %s by %.2f points against an "
                "accepted drop of %.2f (search.max_drop): the bar rests on a few samples. Use more evaluation "
                "data (data.*, evaluate.max_batches=null); each trial's 95%% Wilson interval is in trials.csv.",
                samples,
                spec.criterion,
                100.0 / samples,
                100.0 * spec.max_drop,
            )
        lowered_models: dict[int, torch.nn.Module] = {}
        current: dict[str, Any] = {"calibrated": calibrated, "recovery": recovery}  # the recovery phase may switch

        def run_trial(skipped: list[str]) -> Trial:
            skip = SkipSpec(name=f"trial_{len(trials)}", module_name=list(skipped))
            base, settings = current["calibrated"], current["recovery"]
            conversion = steps.convert_reference(base.model, backend, mapping, skip, custom)
            if settings is not None and settings.bias_correction and calibration:
                steps.correct_bias(conversion, base.model, calibration, settings)
            try:
                lowered, counts = steps.lower(conversion, backend, loaded.data.example_inputs)
            except steps.NothingQuantizedError:
                lowered = None
            if lowered is None:
                # Everything float: it meets any bar at float speed; score it as float.
                score, latency, metrics, spread = float_score, float_ms, {}, 0.0
            else:
                quality_figures = scoring.score("lowered", lowered, plan, backend.engine)  # batch by batch
                timing, fastest = measure_latency({"lowered": lowered}, pool, latency_spec)
                latency = timing[metric_keys.latency_ms("lowered", size)]
                form = fastest[f"lowered/b{size}"]
                spread = timing[metric_keys.form_latency_ms("lowered", form, size, "p90")] - latency
                metrics = {
                    **quality_figures,
                    metric_keys.latency_ms("lowered", size): latency,
                    metric_keys.speedup(size): float_ms / latency,
                    metric_keys.QUANTIZED_NODES: float(counts["quantized"]),
                }
                score = metrics[score_key]
                lowered_models[len(trials)] = lowered  # what the sensitivity is measured on (trial 0, or recovery's)
            metrics[metric_keys.SEARCH_FLOAT_LAYERS] = float(len(skipped))
            interval = wilson_interval(score, samples) if proportion else None
            trial = Trial(len(trials), list(skipped), score, score >= bar, latency, metrics, max(spread, 0.0), interval)
            trial.recovery_defaults = current["recovery"] is not recovery
            trials.append(trial)
            log.info(
                "search trial %d: %d layers float, %s %.4g%s (bar %.4g: %s), %.3f ms",
                trial.number,
                len(skipped),
                spec.criterion,
                score,
                f" [95% CI {interval[0]:.3f}-{interval[1]:.3f}]" if interval else "",
                bar,
                "meets" if trial.meets else "misses",
                latency,
            )
            report_trial(trial)
            return trial

        first = run_trial([])
        budget = spec.max_trials or 1
        switched: SearchedCalibration | None = None
        defaults = _recovery_defaults(recovery)
        if not first.meets and spec.recovery_phase and defaults is not None and (spec.max_trials or 2) > 1:
            log.info("search: recovery phase: trial %d with the recovery defaults (%s)", len(trials), defaults)
            previous = dict(current)
            current["calibrated"] = _recalibrate(loaded, backend, mapping, custom, defaults, calibration or [])
            current["recovery"] = defaults
            tried = run_trial([])
            if tried.score > first.score:
                first = tried
                switched = SearchedCalibration(current["calibrated"], defaults)
                log.info("search: recovery phase: the defaults score higher (%.4g) and are kept", tried.score)
            else:
                current.update(previous)
                log.info(
                    "search: recovery phase: the defaults score no higher (%.4g); kept the run's settings",
                    tried.score,
                )
        base_trial = first.number
        lowered_models = {k: v for k, v in lowered_models.items() if k == base_trial}
        if not first.meets and base_trial in lowered_models:
            engine = get_engine()
            bounds = engine.bounded_producers(loaded.model, custom)
            ranked = engine.layer_sensitivity(  # accumulated batch by batch, like the trials' scores
                current["calibrated"].model, lowered_models[base_trial], scoring.inputs(), backend.engine, bounds
            )
            # Only layers a skip-list leaves float: modules with weights (a ReLU6 or pooling module left float
            # is re-quantized by lowering); all of them when no layer has weights (custom modules only).
            sensitivity = [layer for layer in ranked if layer.has_weight] or ranked
            budget = spec.max_trials or default_max_trials(len(sensitivity))
            log.info(
                "search: %d layers ranked by sensitivity (own output SQNR, worst first), at most %d trials%s: %s",
                len(sensitivity),
                budget,
                "" if spec.max_trials else " (search.max_trials=null: 2*ceil(log2(layers))+4)",
                ", ".join(f"{layer.module_name} {layer.sqnr_db:.1f} dB" for layer in sensitivity[:10])
                + (" ..." if len(sensitivity) > 10 else ""),
            )
            order = [layer.module_name for layer in sensitivity]
            skipped = bisect(order, run_trial, lambda: len(trials) < budget)
            if skipped is not None and spec.requantize:
                for name in list(skipped[:-1]):
                    if len(trials) >= budget:
                        break
                    candidate = [s for s in skipped if s != name]
                    if run_trial(candidate).meets:
                        skipped = candidate
    passing = [trial for trial in trials if trial.meets]
    winner = pick_winner(trials, spec.latency_tie)
    if passing:
        log.info(
            "search: winner is trial %d of %d, %d layers float: %s",
            winner.number,
            len(trials),
            len(winner.skipped),
            winner.skipped,
        )
    else:
        log.warning(
            "search: NO trial met the bar %.4g in %d trials (search.max_trials=%s); the closest, trial %d (%s %.4g, "
            "%d layers float), goes on. Raise search.max_trials or search.max_drop, or change the recovery options.",
            bar,
            len(trials),
            spec.max_trials if spec.max_trials else f"null -> {budget}",
            winner.number,
            spec.criterion,
            winner.score,
            len(winner.skipped),
        )
    searched = switched if switched is not None and winner.recovery_defaults else None
    return SearchResult(winner, trials, sensitivity, float_score, bar, bool(passing), samples, budget, searched)


def _recovery_defaults(recovery: RecoverySpec | None) -> RecoverySpec | None:
    """Every recovery option at its default (conf/recovery/default.yaml), when the run turned any off."""
    if recovery is None:
        return None
    defaults = replace(
        RecoverySpec(),
        bias_correction_samples=recovery.bias_correction_samples,
        smoothquant_alpha=recovery.smoothquant_alpha or RecoverySpec().smoothquant_alpha,
    )
    return None if defaults == recovery else defaults


def _recalibrate(
    loaded: Loaded,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    custom: CustomConfigSpec,
    recovery: RecoverySpec,
    calibration: list[Any],
) -> Calibrated:
    """A calibration with other recovery settings (those acting before calibration need one)."""
    prepared = steps.recalibrate(
        loaded.model, loaded.data.example_inputs, loaded.model_name, backend, mapping, custom, recovery, calibration
    )
    return Calibrated(prepared, len(calibration), sum(ModelInputs.wrap(x).batch_size for x in calibration))


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
        LatencyCache(Path(spec.cache.dir) / "latency") if spec.cache.enabled else None,
        Path(spec.cache.dir) if spec.cache.enabled and spec.cache.float_outputs else None,
    )
    if not result.met:
        ctx.warn(
            f"no trial met the bar ({spec.search.criterion} {result.bar:.4g}) in {len(result.trials)} "
            f"trials; the run goes on with the closest (trial {result.winner.number}, {result.winner.score:.4g}, "
            f"{len(result.winner.skipped)} layers float)"
            + ("; exit code 3 (search.fail_on_miss=true)" if spec.search.fail_on_miss else "")
        )
    return {"search": result, "searched_skip": result.skip_spec(), "searched_calibration": result.calibration}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """trials.csv, sensitivity.csv, searched_skip.yaml and trials.png."""
    result: SearchResult = produced["search"]
    write_outputs(result, ctx.spec.search.criterion, ctx.out_dir)
    ctx.set_tags(
        {
            "skip": f"searched:{skip_label(result.skip_spec())}",
            "search_winner_trial": str(result.winner.number),
            "search_met": str(result.met).lower(),
            "search_recovery": "defaults" if result.calibration is not None else "run",
        }
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
