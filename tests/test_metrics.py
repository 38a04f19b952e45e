"""evaluate.metrics (accuracy, top-k, SQNR, agreement, cosine, a user's function) from output tensors, the
`auto` default per run, and the search criteria that use them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline import quality
from pipeline.errors import ConfigError
from pipeline.validation import validate
from tests.conftest import compose_config, to_spec

# Recovery off: SmoothQuant fixes the MLP's outlier, and the search needs a miss (its recovery phase, which
# would switch SmoothQuant back on, off too).
RECOVERY_OFF = [
    "recovery.activation_bits=7",
    "recovery.bias_correction=false",
    "recovery.smoothquant_alpha=0",
    "search.recovery_phase=false",
]
FAST_SEARCH = ["model=outlier_mlp", "search=greedy", "stages=[load,calibrate]", "tracking=off", *RECOVERY_OFF]
USER_METRIC = """
import torch

def top1_agreement(float_outputs, int8_outputs, labels):
    return (float_outputs.argmax(1) == int8_outputs.argmax(1)).float().mean().item()

not_a_function = 3
"""


def test_cosine_topk_and_custom_from_output_tensors() -> None:
    reference = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    approximation = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    cosine = quality.cosine_per_sample(reference, approximation)
    assert cosine.tolist() == pytest.approx([1.0, 0.0, 1.0])
    assert quality.cosine_per_sample(torch.zeros(2, 4), torch.zeros(2, 4)).tolist() == [1.0, 1.0]
    labels = torch.tensor([2, 1, 0])
    assert quality.top_k_accuracy(approximation, labels, 1) == pytest.approx(1 / 3)
    assert quality.top_k_accuracy(approximation, labels, 5) == 1.0  # k capped at the 3 outputs
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    assert quality.top_k_accuracy(logits, torch.tensor([0, 1, 2]), 2) == pytest.approx(2 / 3)
    plan = quality.MetricPlan(("accuracy", "cosine", "custom"), top_k=2, custom=lambda f, q, y: 0.25)
    metrics = quality.quality_metrics("lowered", approximation, reference, labels, plan)
    assert metrics == {
        "eval/lowered/accuracy": pytest.approx(1 / 3),
        "eval/lowered/cosine_mean": pytest.approx(2 / 3),
        "eval/lowered/cosine_min": pytest.approx(0.0),
        "eval/lowered/custom": 0.25,
    }


def test_no_float_outputs_means_no_metric_against_float() -> None:
    """Without float outputs (evaluate.models without float) only the label metrics are reported; with
    them, identical outputs are an SQNR of inf and a real error a finite one."""
    plan = quality.MetricPlan(("accuracy", "sqnr", "agreement", "cosine", "custom"), custom=lambda f, q, y: 0.5)
    outputs, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    blind = quality.QualityAccumulator("lowered", plan, labelled=True)
    blind.update(outputs, None, labels)
    blind.update(outputs, None, labels)
    assert blind.result() == {
        "eval/lowered/accuracy": 0.5,
        "eval/lowered/accuracy_ci_low": pytest.approx(quality.wilson_interval(2, 4)[0]),
        "eval/lowered/accuracy_ci_high": pytest.approx(quality.wilson_interval(2, 4)[1]),
    }
    same = quality.quality_metrics("lowered", torch.zeros(2, 2), torch.zeros(2, 2), None, plan)
    assert same["eval/lowered/sqnr_db"] == float("inf") and same["eval/lowered/agreement"] == 1.0
    noisy = quality.quality_metrics("lowered", outputs + 0.1, outputs, None, plan)
    assert noisy["eval/lowered/sqnr_db"] == pytest.approx(10 * math.log10(2 / 0.04))  # signal 2, noise 4 x 0.1^2


def test_auto_is_sqnr_and_cosine_without_labels() -> None:
    assert quality.resolve_metric_names(["auto"], labelled=False, has_custom=False) == ("sqnr", "cosine")
    assert quality.resolve_metric_names(["auto"], labelled=True, has_custom=True) == (
        "accuracy",
        "sqnr",
        "agreement",
        "cosine",
        "custom",
    )
    assert quality.resolve_metric_names(["auto", "topk"], labelled=False, has_custom=False) == ("sqnr", "cosine")


def test_unlabeled_run_logs_sqnr_and_cosine_not_agreement(run_pipeline) -> None:
    _, state, _ = run_pipeline(
        [
            "data=synthetic",
            "data.factory.shape=[1,8,8]",
            "stages=[load,calibrate,reference_convert,lower,evaluate]",
            "diagnose.enabled=false",
            "evaluate.latency.enabled=false",
            "tracking=off",
        ]
    )
    quality = {key for key in state.metrics if key.startswith("eval/lowered/")}
    assert quality == {"eval/lowered/sqnr_db", "eval/lowered/cosine_mean", "eval/lowered/cosine_min"}
    assert 0.9 < state.metrics["eval/lowered/cosine_min"] <= state.metrics["eval/lowered/cosine_mean"] <= 1.0


def _validate(overrides: list[str], tmp_path: Path) -> None:
    validate(to_spec(compose_config(overrides, output_dir=tmp_path)))


def test_a_bad_custom_metric_is_a_one_paragraph_config_error(tmp_path: Path) -> None:
    (tmp_path / "user_metrics.py").write_text(USER_METRIC)
    folder = f"model.python_path=[{tmp_path}]"
    cases = {
        "evaluate.custom_metric=no_such_module.fn": "no module 'no_such_module' was found in model.python_path",
        "evaluate.custom_metric=user_metrics.top1_agreemnt": "Did you mean 'top1_agreement'",
        "evaluate.custom_metric=user_metrics.not_a_function": "is a int, not a function",
        "evaluate.custom_metric=justaname": "is not an import path",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as error:
            _validate([override, folder], tmp_path)
        message = str(error.value)
        assert (
            "\n" not in message
            and "evaluate.custom_metric=" in message
            and "(float_outputs, int8_outputs, labels)" in message
        )
        assert expected.lower() in message.lower(), message
    with pytest.raises(ConfigError, match="evaluate.custom_metric=null names no function"):
        _validate(["search=greedy", "search.criterion=custom"], tmp_path)
    with pytest.raises(ConfigError, match=r"evaluate.metrics\[0\]='cosin' is not valid"):
        _validate(["evaluate.metrics=[cosin]"], tmp_path)
    with pytest.raises(ConfigError, match="search.min_cosine=1.5 is out of range"):
        _validate(["search.min_cosine=1.5"], tmp_path)
    _validate(["evaluate.custom_metric=user_metrics.top1_agreement", folder], tmp_path)  # resolves


@pytest.mark.slow
def test_search_meets_a_cosine_bar(run_pipeline) -> None:
    """The outlier MLP fully quantized has output cosine ~0.76 against float; the search finds the layers."""
    _, state, _ = run_pipeline([*FAST_SEARCH, "search.criterion=cosine", "search.min_cosine=0.99"])
    result = state.artifacts["search"]
    assert not result.trials[0].meets and result.met
    assert result.bar == 0.99 and result.winner.score >= 0.99 and result.float_score == 1.0
    assert result.winner.metrics["eval/lowered/cosine_mean"] == result.winner.score
    assert set(result.winner.skipped) == {"hidden.1", "hidden.2"}


@pytest.mark.slow
def test_a_user_metric_is_a_search_criterion_and_an_evaluate_metric(run_pipeline, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "user_metrics.py").write_text(USER_METRIC)
    _, state, _ = run_pipeline(
        [
            "model=outlier_mlp",
            *RECOVERY_OFF,
            "search=greedy",
            "search.criterion=custom",
            "search.min_value=0.99",
            "evaluate.custom_metric=user_metrics.top1_agreement",
            f"model.python_path=[{folder}]",
            "stages=[load,calibrate,reference_convert,lower,evaluate]",
            "diagnose.enabled=false",
            "evaluate.latency.enabled=false",
            "tracking=off",
        ]
    )
    result = state.artifacts["search"]
    assert result.met and result.winner.score >= 0.99 and result.bar == 0.99
    assert result.winner.score == result.winner.metrics["eval/lowered/custom"]
    # evaluate's auto metrics include the custom one, computed on the searched skip-list's model.
    assert state.metrics["eval/lowered/custom"] >= 0.99
    assert state.metrics["eval/lowered/custom"] == pytest.approx(state.metrics["eval/lowered/agreement"])
