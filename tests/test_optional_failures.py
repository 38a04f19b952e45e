"""Nothing optional kills a run: a stage declared FAILURE_IS_FATAL = False (diagnose, inspect) that
raises is recorded (warning, <stage>/error.txt, <stage>/failed) and the run goes on to evaluate and
export and ends FINISHED; and diagnose on a model whose graph does shape arithmetic on tuples."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline import metric_keys, registry

# Linear layers only (as a transformer user quantizes): the shape arithmetic stays unobserved, and
# torch's numeric suite still logs its operator.add nodes, whose results hold no tensors.
LINEAR_ONLY = [
    "qconfig_mapping.base=empty",
    "qconfig_mapping.global_qconfig=null",
    "qconfig_mapping.object_type=[{object_type: torch.nn.Linear, qconfig: default}]",
]


class ShapeArithmeticNet(nn.Module):
    """Reshapes with `x.size()[:-k] + (n,)`, like Hugging Face attention's `size()[:-2] + (all_head_size,)`:
    the traced graph has operator.add nodes on torch.Size tuples. Before the fix, diagnose raised
    `RuntimeError: stack expects a non-empty TensorList` on them (in numerics._mean_sqnr)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)  # [N, 1, 8, 16]
        x = x.view(x.size()[:-2] + (128,))  # [N, 1, 128]
        x = x.view(x.size()[:-1] + (2, 64)).mean(-2)  # [N, 1, 64]
        return self.fc2(torch.flatten(x, 1))


def shape_arithmetic_net() -> nn.Module:
    torch.manual_seed(0)
    return ShapeArithmeticNet().eval()


SHAPE_MODEL = ["model.factory._target_=tests.test_optional_failures.shape_arithmetic_net", "model.checkpoint=null"]


def test_the_registry_keeps_the_contract_and_names_a_stage_that_breaks_it() -> None:
    assert registry.contract_problems() == []
    assert [stage.NAME for stage in registry.REGISTRY if not registry.failure_is_fatal(stage)] == [
        "inspect",
        "diagnose",
    ]
    analysis = SimpleNamespace(NAME="analysis", PRODUCES=("report",), CONSUMES=(), FAILURE_IS_FATAL=False)
    reader = SimpleNamespace(NAME="reader", PRODUCES=(), CONSUMES=("report",))
    (problem,) = registry.contract_problems((analysis, reader))  # type: ignore[arg-type]
    assert "reader CONSUMES ['report'] from analysis, whose FAILURE_IS_FATAL is False" in problem


def test_diagnose_ignores_ops_that_produce_no_tensors(run_pipeline) -> None:
    overrides = [*SHAPE_MODEL, *LINEAR_ONLY, "stages=[load,calibrate,reference_convert,lower]"]
    _, state, run_dir = run_pipeline([*overrides, "diagnose.enabled=true", "tracking=off", "cache.enabled=false"])
    assert state.metrics[metric_keys.stage_failed("diagnose")] == 0.0
    assert state.metrics[metric_keys.DIAGNOSE_LAYERS] == 2.0
    assert "fc1" in (run_dir / "diagnose" / "layers.csv").read_text()
    assert not (run_dir / "diagnose" / "error.txt").exists()


@pytest.mark.slow
def test_a_failing_diagnose_is_recorded_and_the_run_goes_on(run_pipeline, tmp_path: Path, monkeypatch, caplog) -> None:
    import stages.diagnose

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("stack expects a non-empty TensorList")

    monkeypatch.setattr(stages.diagnose, "diagnose", broken)
    with caplog.at_level(logging.WARNING):
        _, state, run_dir = run_pipeline(["diagnose.enabled=true", "cache.enabled=false", "export.onnx=false"])
    # The run went on to evaluate and export.
    assert metric_keys.LOWERED_ACCURACY in state.metrics
    assert (run_dir / "export" / "lowered_x86.torchscript.pt").is_file()
    assert "diagnosis" not in state.artifacts
    assert state.metrics[metric_keys.stage_failed("diagnose")] == 1.0
    error = (run_dir / "diagnose" / "error.txt").read_text()
    assert "RuntimeError: stack expects a non-empty TensorList" in error and "Traceback" in error
    assert not (run_dir / "error.txt").exists()  # the run itself did not fail
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    warning = next(message for message in warnings if message.startswith("diagnose failed"))
    assert "diagnose failed (RuntimeError: stack expects a non-empty TensorList)" in warning
    assert "the run goes on" in warning
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fx-ptq").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["failed_optional_stages"] == "diagnose"
    assert run.data.metrics["diagnose/failed"] == 1.0
    assert "diagnose/error.txt" in {a.path for a in client.list_artifacts(run.info.run_id, "diagnose")}


def test_a_stop_request_during_a_non_fatal_stage_still_stops_the_run(run_pipeline, monkeypatch) -> None:
    import stages.inspect

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(stages.inspect, "inspect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(["stages=[load,inspect]", "tracking=off", "cache.enabled=false"])


# --------------------------------------------------------------------------------------------------
# An exported file that disagrees with the int8 torch model


@pytest.mark.slow
def test_an_exported_file_that_disagrees_is_a_warning_with_its_figure(run_pipeline, tmp_path: Path, caplog) -> None:
    pytest.importorskip("onnxruntime")
    # ONNX gives ~37 dB against the int8 torch model here: a 99 dB bar forces the disagreement, while the
    # reloaded TorchScript file is identical to the int8 model (inf dB) and agrees.
    overrides = ["stages=[load,calibrate,reference_convert,lower,export]", "diagnose.enabled=false"]
    with caplog.at_level(logging.INFO):
        _, state, run_dir = run_pipeline([*overrides, "cache.enabled=false", "export.min_sqnr_db=99"])
    onnx_file = run_dir / "export" / "lowered_x86.onnx"
    sqnr = state.metrics["export/onnx/sqnr_db"]
    assert sqnr < 99 and state.metrics["export/onnx/disagrees"] == 1.0
    assert state.metrics["export/torchscript/disagrees"] == 0.0
    figure = f"{sqnr:.1f} dB SQNR (export.min_sqnr_db=99)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(onnx_file) in message and figure in message for message in warnings), warnings
    wrote = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("export: wrote"))
    assert wrote == f"export: wrote onnx (ONNX disagrees: {sqnr:.1f} dB SQNR), torchscript"
    assert figure in (run_dir / "warnings.txt").read_text()  # the run's summary
    assert json.loads((run_dir / "export" / "disagreements.json").read_text()) == {"onnx": figure}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fx-ptq").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["export.disagrees"] == f"onnx: {figure}"
    assert figure in run.data.tags["warnings"]
    assert run.data.metrics["export/onnx/disagrees"] == 1.0


def test_export_tolerances_are_range_checked() -> None:
    from pipeline.errors import ConfigError
    from pipeline.validation import validate
    from tests.conftest import compose_config, to_spec

    with pytest.raises(ConfigError, match=r"export.min_agreement=1.5 is out of range; use a number in \[0, 1\]"):
        validate(to_spec(compose_config(["export.min_agreement=1.5"])))
