"""search=greedy: the fastest skip-list meeting an accuracy bar, from one calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline.schema import SkipSpec

# Recovery off: SmoothQuant (recovery.smoothquant_alpha) fixes the MLP's outlier, and the search needs a miss.
RECOVERY_OFF = [
    "recovery.activation_bits=7",
    "recovery.bias_correction=false",
    "recovery.smoothquant_alpha=0",
]
SEARCH = ["model=outlier_mlp", "search=greedy", "search.max_drop=0.01", "export.onnx=false", *RECOVERY_OFF]


@pytest.mark.slow
def test_greedy_search_meets_the_bar_in_fewer_trials_than_layers_from_one_calibration(
    run_pipeline, tmp_path: Path
) -> None:
    _, state, run_dir = run_pipeline(SEARCH)
    result = state.artifacts["search"]
    layers = len(result.sensitivity)
    assert layers == 5  # four hidden Linear layers and the head
    assert not result.trials[0].meets, "the outlier model must miss the bar fully quantized"
    assert result.met and result.winner.meets
    assert result.winner.score >= result.bar == pytest.approx(result.float_score - 0.01)
    assert len(result.trials) < layers
    # The layers around the outlier (hidden.1 produces it, hidden.2 consumes it) are the ones found.
    assert set(result.winner.skipped) == {"hidden.1", "hidden.2"}
    # The pipeline carries on with the winner: the final lowered model meets the bar too.
    assert state.metrics["eval/lowered/accuracy"] >= result.bar
    assert state.metrics["skip/left_float_nodes"] == 2

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("fx-ptq")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["search_trial"]) for r in children) == list(range(len(result.trials)))
    assert all(r.info.status == "FINISHED" and "search/score" in r.data.metrics for r in children)
    # One calibration for the whole search: only the parent calibrated, once.
    history = client.get_metric_history(parent.info.run_id, "calibrate/calibrations")
    assert [m.value for m in history] == [1.0]
    assert not any("calibrate/calibrations" in r.data.metrics for r in children)
    assert parent.data.metrics["search/winner_trial"] == result.winner.number
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/searched_skip.yaml", "search/trials.png", "search/trials.csv"} <= artifacts

    # The written skip-list is valid conf/skip YAML that reproduces the winner.
    searched = OmegaConf.merge(OmegaConf.structured(SkipSpec), OmegaConf.load(run_dir / "search/searched_skip.yaml"))
    assert list(searched.module_name) == result.winner.skipped
    png = (run_dir / "search" / "trials.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_search_stops_at_trial_zero_when_full_quantization_meets_the_bar(run_pipeline) -> None:
    _, state, _ = run_pipeline(["search=greedy", "search.max_drop=0.01", "export.onnx=false"])
    assert len(state.artifacts["search"].trials) == 1
    assert state.artifacts["search"].winner.skipped == []
    assert state.artifacts["search"].sensitivity == []  # never needed


@pytest.mark.slow
def test_sqnr_criterion_and_max_trials(run_pipeline) -> None:
    _, state, _ = run_pipeline(
        [
            "search=greedy",
            "search.criterion=sqnr",
            "search.min_sqnr_db=60",
            "search.max_trials=3",
            "stages=[load,calibrate]",
        ]
    )
    result = state.artifacts["search"]
    assert len(result.trials) == 3
    assert not result.met
    assert result.winner.score == max(trial.score for trial in result.trials)
