"""Every metric key the pipeline logs, in one place: stages produce them, the sweep report, the search
and the CLI read them. A key is `<group>/<...>` so MLflow's UI groups them; change one here only.

Models are named by role: `float` (the loaded model), `reference` (reference-converted) and `lowered`
(the backend's int8 operators).
"""

from __future__ import annotations

MODELS: tuple[str, ...] = ("float", "reference", "lowered")


def eval_metric(model: str, name: str) -> str:
    """`eval/<model>/<name>`: name is one of quality_metric_names (accuracy, sqnr_db, cosine_mean ...)."""
    return f"eval/{model}/{name}"


ACCURACY = "accuracy"
SQNR_DB = "sqnr_db"
AGREEMENT = "agreement"
COSINE_MEAN = "cosine_mean"  # per-sample cosine similarity of the outputs against float, mean over samples
COSINE_MIN = "cosine_min"  # ... and the worst sample
CUSTOM = "custom"  # evaluate.custom_metric's value
QUALITY_METRICS: tuple[str, ...] = (ACCURACY, SQNR_DB, AGREEMENT)  # the figures every labelled run logs


def top_k_accuracy(k: int) -> str:
    """The `topk` metric's name: top5_accuracy for evaluate.top_k=5."""
    return f"top{k}_accuracy"


def quality_metric_names(top_k: int) -> tuple[str, ...]:
    """Every per-model quality figure evaluate can log, in display order."""
    return (ACCURACY, top_k_accuracy(top_k), SQNR_DB, AGREEMENT, COSINE_MEAN, COSINE_MIN, CUSTOM)


# evaluate.metrics choices (auto: accuracy, sqnr, agreement and cosine with labels; sqnr and cosine without)
EVALUATE_METRICS: tuple[str, ...] = ("auto", "accuracy", "topk", "sqnr", "agreement", "cosine", "custom")
# search.criterion choices; higher is better for each
SEARCH_CRITERIA: tuple[str, ...] = ("accuracy", "topk", "sqnr", "agreement", "cosine", "custom")


def criterion_metric(criterion: str, top_k: int) -> str:
    """The per-model figure a search criterion (or evaluate.metrics entry) is judged by."""
    return {
        "accuracy": ACCURACY,
        "topk": top_k_accuracy(top_k),
        "sqnr": SQNR_DB,
        "agreement": AGREEMENT,
        "cosine": COSINE_MEAN,
        "custom": CUSTOM,
    }[criterion]


FLOAT_ACCURACY = eval_metric("float", ACCURACY)
LOWERED_ACCURACY = eval_metric("lowered", ACCURACY)
LOWERED_SQNR_DB = eval_metric("lowered", SQNR_DB)
LOWERED_AGREEMENT = eval_metric("lowered", AGREEMENT)
ACCURACY_DELTA = "eval/accuracy_delta"  # lowered minus float accuracy, a fraction (0.01 = one point)
EVAL_SAMPLES = "eval/samples"
# accuracy's 95% Wilson interval (eval/<model>/accuracy_ci_low, _high): how far a subset's figure
# (evaluate.max_samples) may be from the full set's
ACCURACY_CI_LOW = "accuracy_ci_low"
ACCURACY_CI_HIGH = "accuracy_ci_high"
# float evaluations this run made: 0 when the float outputs came from the cache (a sweep or search sums them)
FLOAT_EVALUATIONS = "eval/float_evaluations"


def latency_ms(model: str, batch_size: int) -> str:
    """The fastest form's median latency of `model` at `batch_size`."""
    return f"latency/{model}/b{batch_size}_ms"


def latency_ci_ms(model: str, batch_size: int, end: str) -> str:
    """An end ("low" or "high") of the 95% interval of the fastest form's median latency."""
    return f"latency/{model}/b{batch_size}_ci_{end}_ms"


def form_latency_ms(model: str, form: str, batch_size: int, statistic: str) -> str:
    """One form's latency statistic: median, p90, ci_low or ci_high (the median's 95% interval)."""
    return f"latency/{model}/{form}/b{batch_size}_{statistic}_ms"


def form_latency_runs(model: str, form: str, batch_size: int) -> str:
    """How many timed runs the adaptive measurement of one form took."""
    return f"latency/{model}/{form}/b{batch_size}_runs"


def speedup(batch_size: int) -> str:
    """float latency / lowered latency at `batch_size`."""
    return f"latency/speedup_b{batch_size}"


def speedup_ci(batch_size: int, end: str) -> str:
    """An end ("low" or "high") of the speedup's interval: from the two medians' 95% intervals."""
    return f"latency/speedup_b{batch_size}_ci_{end}"


EXPORT_LATENCY_MS = "export/torchscript/latency_ms"  # the exported form's median as evaluate measured it
EXPORT_FROZEN = "export/torchscript/frozen"  # 1 when the TorchScript file is frozen


FLOAT_BYTES = "size/float_bytes"
LOWERED_BYTES = "size/lowered_bytes"
SIZE_RATIO = "size/ratio"

DATA_CALIBRATION_SAMPLES = "data/calibration_samples"
DATA_EVALUATION_SAMPLES = "data/evaluation_samples"
MODEL_PARAMETERS = "model/parameters"

CALIBRATIONS = "calibrate/calibrations"  # calibration passes this run made: 0 on a cache hit
CALIBRATE_BATCHES = "calibrate/batches"
CALIBRATE_SAMPLES = "calibrate/samples"
CACHE_HIT = "cache/hit"

LEFT_FLOAT_NODES = "skip/left_float_nodes"


def node_count(kind: str) -> str:
    """`nodes/<kind>`: quantized, float or quantize_dequantize ops in the lowered graph."""
    return f"nodes/{kind}"


QUANTIZED_NODES = node_count("quantized")
# Mapping entries whose nodes the backend left float although they name a qconfig (lower/ignored_mapping_entries.json).
IGNORED_MAPPING_ENTRIES = "lower/ignored_mapping_entries"

SEARCH_TRIALS = "search/trials"
SEARCH_MET = "search/met"
SEARCH_BAR = "search/bar"
SEARCH_WINNER_TRIAL = "search/winner_trial"
SEARCH_WINNER_SCORE = "search/winner_score"
SEARCH_WINNER_FLOAT_LAYERS = "search/winner_float_layers"
SEARCH_WINNER_LATENCY_MS = "search/winner_latency_ms"
SEARCH_SCORE = "search/score"  # per trial run
SEARCH_MEETS = "search/meets"  # per trial run
SEARCH_FLOAT_LAYERS = "search/float_layers"  # per trial run

DIAGNOSE_SKIPPED = "diagnose/skipped"
DIAGNOSE_LAYERS = "diagnose/layers"
DIAGNOSE_WORST_LAYER_SQNR_DB = "diagnose/worst_layer_sqnr_db"
DIAGNOSE_FIRST_LAYER_SQNR_DB = "diagnose/first_layer_sqnr_db"
DIAGNOSE_ENGINE_PROBLEM = "diagnose/engine_problem"
DIAGNOSE_SUGGESTED_SKIP = "diagnose/suggested_skip"
DIAGNOSE_WIDE_RANGES = "diagnose/wide_ranges"  # outputs feeding ReLU6/hardtanh observed far wider than the clip
DIAGNOSE_VERIFIED = "diagnose/verified_suggestions"  # suggestions re-converted and measured
DIAGNOSE_BEST_GAIN_DB = "diagnose/best_gain_db"  # output SQNR gain of the best verified fix (0: none helped)
DIAGNOSE_UNDONE_SKIPS = "diagnose/undone_skips"  # the run's skip entries that lowering left int8


def stage_failed(stage: str) -> str:
    """`<stage>/failed`: 1 when a stage whose failure is not fatal (FAILURE_IS_FATAL = False) raised, else 0."""
    return f"{stage}/failed"


def stage_seconds(stage: str) -> str:
    """Wall time of one stage, written by the runner."""
    return f"stage/{stage}/seconds"


def export_metric(name: str) -> str:
    """`export/<name>`: e.g. a file's size or its agreement with the lowered model."""
    return f"export/{name}"


# --------------------------------------------------------------------------------------------------
# Headline keys: the few short params and metrics the MLflow run list and compare view make useful for
# comparing conversions. They start with a capital letter because MLflow's UI orders param and metric
# columns by code point (JavaScript's sort()), so capitals come before every grouped `eval/...` key and
# every lowercase config param; its compare view pre-selects the first 3 params that differ (sorted),
# and the first metric the runs share in the order the run logged them (see pipeline/tracking/headline.py).

HEADLINE_MODEL = "Model"  # param: model.name
HEADLINE_ENGINE = "Engine"  # param: engine.name (fx or pt2e)
HEADLINE_BACKEND = "Backend"  # param: backend.engine
HEADLINE_MAPPING = "Mapping"  # param: qconfig_mapping.name
HEADLINE_SKIP = "Skip"  # param: the skip-list label (schema.skip_label) or search=<strategy>
HEADLINE_PARAMS: tuple[str, ...] = (HEADLINE_MODEL, HEADLINE_ENGINE, HEADLINE_BACKEND, HEADLINE_MAPPING, HEADLINE_SKIP)

HEADLINE_SQNR_DB = "SQNR dB"  # the int8 (lowered) model's output SQNR against float
HEADLINE_INT8_ACCURACY = "Int8 accuracy"  # the task metric of the int8 (lowered) model, a fraction
HEADLINE_FLOAT_ACCURACY = "Float accuracy"  # the task metric of the float model, a fraction
HEADLINE_DELTA_POINTS = "Delta points"  # int8 minus float accuracy in percentage points (-0.22 = 0.22 points lost)
HEADLINE_SPEEDUP = "Speedup"  # float / int8 latency at batch 1, fastest form each
HEADLINE_SIZE_RATIO = "Size ratio"  # int8 / float serialized size

# Headline metric -> the pipeline metric it shows (None: derived, see HEADLINE_DELTA_POINTS). The first is
# logged first, so the compare view's parallel-coordinates plot opens on it.
HEADLINE_METRICS: dict[str, str | None] = {
    HEADLINE_SQNR_DB: LOWERED_SQNR_DB,
    HEADLINE_INT8_ACCURACY: LOWERED_ACCURACY,
    HEADLINE_FLOAT_ACCURACY: FLOAT_ACCURACY,
    HEADLINE_DELTA_POINTS: None,
    HEADLINE_SPEEDUP: speedup(1),
    HEADLINE_SIZE_RATIO: SIZE_RATIO,
}
