"""The search streams its scoring set (issue 19): trials, the layer sensitivity and the float score are
accumulated batch by batch and equal the figures of the old computation on the batches joined."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import metric_keys, quality
from pipeline.batch import ModelInputs
from pipeline.engine import get_engine, numerics, steps
from pipeline.engine.qconfigs import quantized_engine
from pipeline.quality import metric_plan
from pipeline.schema import SkipSpec
from pipeline.scoring import ScoringSet
from tests.helpers import LazyGenerated, record_batches_refuse_joins, run_generated_sets_in_one_child

# The digits default (digits CNN, 450 evaluation images in 15 batches of 32, recovery defaults, cache on),
# searched on SQNR with a bar no trial meets, so it ranks the layers and runs several trials.
SQNR_SEARCH = [
    "search=greedy",
    "search.criterion=sqnr",
    "search.min_sqnr_db=60",
    "search.max_trials=4",
    "stages=[load,calibrate]",
    "tracking=off",
    "evaluate.latency.batch_sizes=[1]",
]


def _close(streamed: float, joined: float) -> bool:
    """Equal up to float rounding (sums over batches against one sum over the joined tensor)."""
    return streamed == joined or streamed == pytest.approx(joined, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_streamed_search_scores_equal_the_joined_computation_on_digits(run_pipeline, tmp_path: Path) -> None:
    spec, state, _ = run_pipeline(SQNR_SEARCH)
    loaded, calibrated, result = state.artifacts["loaded"], state.artifacts["calibrated"], state.artifacts["search"]
    assert len(result.trials) == 4 and not result.trials[0].meets and len(result.sensitivity) >= 3

    # The old computation: every evaluation batch joined, float outputs of the joined inputs.
    batches = loaded.data.evaluation.head(spec.evaluate.max_batches, spec.evaluate.max_samples)
    assert len(batches) == 15 and result.samples == 450
    inputs = ModelInputs.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    with torch.no_grad():
        float_outputs = inputs.call(loaded.model)
    plan = metric_plan([*spec.evaluate.metrics, "sqnr"], spec.evaluate.top_k, None, [], loaded.has_accuracy)
    assert set(plan.names) >= {"accuracy", "sqnr", "agreement", "cosine"}
    calibration = [x for x, _ in loaded.data.calibration[: spec.calibrate.max_batches]]

    def joined_lowered(skipped: list[str]) -> torch.nn.Module:
        skip = SkipSpec(name="joined", module_name=list(skipped))
        conversion = steps.convert_reference(
            calibrated.model, spec.backend, spec.qconfig_mapping, skip, spec.custom_config
        )
        if spec.recovery.bias_correction:
            steps.correct_bias(conversion, calibrated.model, calibration, spec.recovery)
        lowered, _ = steps.lower(conversion, spec.backend, loaded.data.example_inputs)
        return lowered

    quality_keys = [key for key in result.trials[0].metrics if key.startswith("eval/lowered/")]
    assert len(quality_keys) >= 5  # accuracy, sqnr, agreement, cosine mean and min
    lowered_zero = None
    for trial in result.trials:
        lowered = joined_lowered(trial.skipped)
        if lowered_zero is None:
            lowered_zero = lowered  # trial 0, fully quantized: what the sensitivity is measured on
        with quantized_engine(spec.backend.engine), torch.no_grad():
            outputs = inputs.call(lowered)
        joined = quality.quality_metrics("lowered", outputs, float_outputs, labels, plan)
        assert set(quality_keys) == set(joined), trial.number
        for key in quality_keys:
            assert _close(trial.metrics[key], joined[key]), (trial.number, key, trial.metrics[key], joined[key])
        assert _close(trial.score, joined[metric_keys.LOWERED_SQNR_DB])

    # The layer sensitivity, accumulated per batch, ranks the layers as the joined computation does.
    assert lowered_zero is not None
    bounds = get_engine().bounded_producers(loaded.model, spec.custom_config)
    ranked = numerics.layer_sensitivity(calibrated.model, lowered_zero, inputs, spec.backend.engine, bounds)
    joined_sensitivity = [layer for layer in ranked if layer.has_weight] or ranked
    assert [layer.module_name for layer in result.sensitivity] == [layer.module_name for layer in joined_sensitivity]
    for streamed, joined_layer in zip(result.sensitivity, joined_sensitivity, strict=True):
        assert _close(streamed.sqnr_db, joined_layer.sqnr_db), (streamed, joined_layer)

    # The float score and the scores without the float-output cache (a temporary folder) are the same figures.
    cached = ScoringSet(loaded.model, batches, loaded.has_accuracy, Path(spec.cache.dir))
    assert cached.float_evaluations == 0  # the search stored them; read back, not recomputed
    with ScoringSet(loaded.model, batches, loaded.has_accuracy) as temporary:
        folder = temporary.cache.directory
        assert temporary.float_evaluations == 1
        accuracy_plan = metric_plan(["accuracy", "topk"], 3, None, [], True)
        for criterion in ("accuracy", "topk"):
            assert _close(
                temporary.float_score(criterion, accuracy_plan),
                quality.float_score(criterion, float_outputs, labels, accuracy_plan),
            )
        assert temporary.score("lowered", lowered_zero, plan, spec.backend.engine) == cached.score(
            "lowered", lowered_zero, plan, spec.backend.engine
        )
    assert not folder.exists()  # the temporary folder is removed on close
    assert temporary.latency_pool(1).batch_size == 32  # latency on the first batch, not the set


def test_module_numerics_of_batches_sums_powers_like_one_joined_batch() -> None:
    """Per-batch SQNRs are not averaged: signal and noise powers are summed, as over the joined batches."""
    power = numerics._Power()
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(96, 10, generator=generator)
    approximation = reference + torch.linspace(0.01, 1.0, 96).unsqueeze(1) * torch.randn(96, 10, generator=generator)
    for part in range(0, 96, 32):
        power.add(reference[part : part + 32], approximation[part : part + 32])
    assert power.db == pytest.approx(numerics._sqnr(reference, approximation), rel=1e-5)
    mean_of_batches = sum(numerics._sqnr(reference[p : p + 32], approximation[p : p + 32]) for p in (0, 32, 64)) / 3
    assert abs(power.db - mean_of_batches) > 1.0  # the batches differ: a mean of dB would be another figure


_MEMORY_CHILD = """
    from pipeline.schema import BackendSpec, CustomConfigSpec, EvaluateSpec, LatencySpec, QConfigMappingSpec, SearchSpec
    from stages.search import search
    from stages.types import Calibrated, DataBundle, Loaded

    latency = LatencySpec(batch_sizes=[1], warmup=1, repeats=3, budget_s=0.1, forms=["eager"])
    spec = SearchSpec(enabled=True, criterion="sqnr", min_sqnr_db=90.0, max_trials=3, recovery_phase=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch, the models: before the search
    result = search(
        Loaded(model, data, "tiny", False),
        Calibrated(prepared, len(calibration), 64),
        backend, mapping, custom, EvaluateSpec(latency=latency), spec,
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {"samples": result.samples, "trials": len(result.trials), "layers": len(result.sensitivity)}
    print(json.dumps({"rss_mb": rss, "before_mb": before, **figures}))
    """


@pytest.mark.slow
def test_search_memory_stays_flat_as_the_scoring_set_grows_eightfold() -> None:
    """A search (3 trials, the layer sensitivity, latency) on 4 vs 32 batches of 64 generated 3x64x64 inputs
    (a lazy source: the set itself costs nothing): joining the 28 extra batches' inputs alone would add
    28 x 64 x 49,152 bytes = 88 MB, and the old joined search grew by 857 MB from 4 to 16 batches (its
    layer sensitivity recorded every layer's activations for the whole set); streamed, the process's max
    RSS grows by less than 30 MB (measured: 360 MB for 4 batches, 362 MB for 32)."""
    small, large = run_generated_sets_in_one_child(_MEMORY_CHILD, [4, 32])  # one child process, small first
    assert (small["samples"], large["samples"]) == (256, 2048)
    assert small["trials"] == large["trials"] == 3 and small["layers"] == large["layers"] == 3
    print(f"search max RSS: 4 batches {small['rss_mb']:.0f} MB, 32 batches {large['rss_mb']:.0f} MB")
    assert large["rss_mb"] - small["rss_mb"] < 30, (small, large)


def test_no_search_pass_joins_the_set_or_feeds_a_model_more_than_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deterministic side of the RSS test: with ModelInputs.cat refused, a whole search (float outputs,
    trials, layer sensitivity, latency) runs on a lazy source of 6 batches of 8, and every model call it
    makes (float, calibrated, int8) gets at most one batch."""
    from torch import nn

    from pipeline.batches import DatasetBatches
    from pipeline.schema import (
        BackendSpec,
        CustomConfigSpec,
        EvaluateSpec,
        LatencySpec,
        QConfigMappingSpec,
        SearchSpec,
    )
    from stages.search import search
    from stages.types import Calibrated, DataBundle, Loaded

    torch.manual_seed(0)
    data = DataBundle(
        "generated",
        DatasetBatches(LazyGenerated(), range(16), 8, identity="calibration"),
        DatasetBatches(LazyGenerated(), range(16, 16 + 6 * 8), 8, identity="evaluation"),
        None,
        False,
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)).eval()
    backend, mapping, custom = BackendSpec(engine="x86", backend_config="x86"), QConfigMappingSpec(), CustomConfigSpec()
    calibration = [inputs for inputs, _ in data.calibration]
    prepared = steps.recalibrate(model, data.example_inputs, "tiny", backend, mapping, custom, None, calibration)

    fed = record_batches_refuse_joins(monkeypatch, "the search")
    latency = LatencySpec(batch_sizes=[1], warmup=1, repeats=3, budget_s=0.05, forms=["eager"])
    result = search(
        Loaded(model, data, "tiny", False),
        Calibrated(prepared, len(calibration), 16),
        backend,
        mapping,
        custom,
        EvaluateSpec(latency=latency),
        SearchSpec(enabled=True, criterion="sqnr", min_sqnr_db=90.0, max_trials=3, recovery_phase=False),
    )
    assert result.samples == 48 and len(result.trials) == 3 and result.sensitivity
    assert max(fed) == 8  # one batch at a time, never the set's 48 samples
    # 6 batches for each pass: the float outputs (once), each trial with an int8 model (one with every layer
    # float is scored as float), the sensitivity's int8 and calibrated models
    scored = sum(metric_keys.QUANTIZED_NODES in trial.metrics for trial in result.trials)
    assert fed.count(8) == 6 * (1 + scored + 2) and scored >= 2
