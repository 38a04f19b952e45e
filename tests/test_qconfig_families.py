"""Dynamic int8, weight-only int8 and float16 qconfigs: what each backend supports (measured here and
compared with README's table), each family end to end, next to static entries, and a mapping entry
the backend ignores being reported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pipeline.engine import get_engine, qconfigs, steps
from pipeline.errors import ConfigError
from pipeline.schema import BackendSpec, CustomConfigSpec, ObjectTypeEntry, QConfigMappingSpec, SkipSpec
from tests.conftest import REPO_ROOT
from tests.token_model import token_data, token_mlp

ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")
# README column -> (named qconfig, the op type it is put on in the tiny token model)
FAMILIES = {
    "static int8": ("backend_default", "torch.nn.Linear"),
    "dynamic int8": ("dynamic", "torch.nn.Linear"),
    "dynamic int8, per-channel": ("dynamic_per_channel", "torch.nn.Linear"),
    "weight-only int8 (Embedding)": ("weight_only", "torch.nn.Embedding"),
    "float16 (Linear)": ("fp16_dynamic", "torch.nn.Linear"),
}
MAPPING_FILE = {"dynamic": "dynamic", "dynamic_per_channel": "dynamic_per_channel", "weight_only": "weight_only"}
MAPPING_FILE["fp16_dynamic"] = "fp16_dynamic"
TOKENS = [
    "model.factory._target_=tests.token_model.token_mlp",
    "model.name=tokens",
    "model.trained=false",
    "data=custom",
    "data.factory._target_=tests.token_model.token_data",
    "data.name=tokens",
    "diagnose.enabled=false",
    "evaluate.latency.batch_sizes=[1]",
]


def readme_support_table() -> dict[str, dict[str, str]]:
    """README's backend-support table: engine -> column -> first word of the cell (yes, ignored, error)."""
    text = (REPO_ROOT / "README.md").read_text()
    lines = text[text.index("| backend | static int8 |") :].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0].strip("`")] = {
            column: re.split(r"\W", cell)[0] for column, cell in zip(header[1:], cells[1:], strict=True)
        }
    return table


def measure_support(engine: str, qconfig: str, object_type: str) -> str:
    """yes: lowered with the op quantized; ignored: the BackendConfig left it float; error: torch raises."""
    backend = BackendSpec(engine=engine, backend_config=engine)
    mapping = QConfigMappingSpec(
        name="probe", base="empty", global_qconfig=None, object_type=[ObjectTypeEntry(object_type, qconfig)]
    )
    data = token_data(calibration_size=16, evaluation_size=16)
    engine_ = get_engine()
    try:
        prepared = engine_.prepare(token_mlp(), data.example_inputs, backend, mapping, CustomConfigSpec())
        with qconfigs.quantized_engine(engine), torch.no_grad():
            for inputs, _ in data.calibration:
                inputs.call(prepared)
        conversion = engine_.convert_reference(prepared, backend, mapping, SkipSpec(name="none"), CustomConfigSpec())
        lowered, _, ignored = steps.lower_with_report(conversion, backend, data.example_inputs)
        with qconfigs.quantized_engine(engine), torch.no_grad():
            data.evaluation[0][0].call(lowered)
    except steps.NothingQuantizedError as error:
        assert "qconfig_mapping.object_type[0]" in str(error) and "none was quantized" in str(error)
        return "ignored"
    except (RuntimeError, NotImplementedError):
        return "error"
    return "ignored" if ignored else "yes"


def test_backend_support_table_is_measured_and_matches_the_readme(monkeypatch) -> None:
    monkeypatch.setattr(qconfigs, "ENGINE_UNSUPPORTED", {})  # measure what the start-up check refuses, too
    measured = {
        engine: {column: measure_support(engine, *FAMILIES[column]) for column in FAMILIES} for engine in ENGINES
    }
    assert readme_support_table() == measured
    monkeypatch.undo()
    # What errors at run time is refused at start-up, by name, with the engines that work.
    for engine, row in measured.items():
        for column, verdict in row.items():
            name = FAMILIES[column][0]
            assert (engine in qconfigs.ENGINE_UNSUPPORTED.get(name, {})) == (verdict == "error"), (engine, name)
    with pytest.raises(ConfigError, match=r"qconfig_mapping.object_type\[0\].qconfig='fp16_dynamic' cannot run on"):
        qconfigs.named_qconfig(
            "fp16_dynamic",
            BackendSpec(engine="qnnpack", backend_config="qnnpack"),
            "qconfig_mapping.object_type[0].qconfig",
        )


def _supported() -> list[tuple[str, str]]:
    table = readme_support_table()
    return [
        (FAMILIES[column][0], engine)
        for column in FAMILIES
        if column != "static int8"
        for engine in ENGINES
        if table[engine][column] == "yes"
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("qconfig", "engine"), _supported())
def test_each_family_end_to_end(run_pipeline, qconfig: str, engine: str) -> None:
    """calibrate -> reference_convert -> lower -> evaluate -> export with a shipped dynamic / weight-only / fp16
    mapping on a token-id model; unlabeled data gets sqnr and cosine; ONNX is skipped with the reason."""
    _, state, run_dir = run_pipeline([*TOKENS, f"qconfig_mapping={MAPPING_FILE[qconfig]}", f"backend={engine}"])
    metrics = state.metrics
    assert metrics["nodes/quantized"] >= 1 and metrics["lower/ignored_mapping_entries"] == 0
    modules = {type(m).__module__ for m in state.artifacts["lowered"].model.modules()}
    expected = "embedding_ops" if qconfig == "weight_only" else ".dynamic."
    assert any(expected in module for module in modules), modules
    assert metrics["eval/lowered/cosine_mean"] > 0.99 and metrics["eval/lowered/sqnr_db"] > 20
    assert "eval/lowered/agreement" not in metrics and "eval/lowered/accuracy" not in metrics  # no labels
    assert metrics["export/torchscript/max_abs_diff"] == 0.0
    skipped = json.loads((run_dir / "export" / "skipped.json").read_text())
    assert "cannot express dynamic, float16 or weight-only" in skipped["onnx"]


@pytest.mark.slow
def test_dynamic_entries_next_to_static_ones_and_a_skip_of_one(run_pipeline) -> None:
    """Static int8 convs (backend_default) with a dynamic per-channel head by module_name; a skip-list may set
    the dynamic entry to None at convert time (convert_fx's rule holds)."""
    mapping = ["qconfig_mapping.module_name=[{module_name: fc, qconfig: dynamic_per_channel}]"]
    stages = "stages=[load,calibrate,reference_convert,lower,evaluate]"
    _, state, _ = run_pipeline([*mapping, stages, "diagnose.enabled=false", "evaluate.latency.enabled=false"])
    lowered = state.artifacts["lowered"].model
    assert type(lowered.fc).__module__ == "torch.ao.nn.quantized.dynamic.modules.linear"
    assert type(lowered.get_submodule("widen.0")).__module__.startswith("torch.ao.nn.intrinsic.quantized")
    assert state.metrics["eval/lowered/accuracy"] > 0.9 and state.metrics["lower/ignored_mapping_entries"] == 0
    _, state, _ = run_pipeline(
        [*mapping, stages, "diagnose.enabled=false", "evaluate.latency.enabled=false", "skip.module_name=[fc]"]
    )
    assert type(state.artifacts["lowered"].model.fc) is torch.nn.Linear


@pytest.mark.slow
def test_an_entry_the_backend_ignores_is_a_warning_metric_and_artifact(run_pipeline, caplog) -> None:
    """Dynamic int8 on Conv2d: no backend has it, and BackendConfig drops it silently; the lower stage names it."""
    entry = "qconfig_mapping.object_type=[{object_type: torch.nn.Conv2d, qconfig: dynamic}]"
    _, state, run_dir = run_pipeline(
        [entry, "stages=[load,calibrate,reference_convert,lower]", "diagnose.enabled=false"]
    )
    assert state.metrics["lower/ignored_mapping_entries"] == 1
    (line,) = json.loads((run_dir / "lower" / "ignored_mapping_entries.json").read_text())
    assert line.startswith("qconfig_mapping.object_type[0] (torch.nn.Conv2d: dynamic) gives a dynamic qconfig to")
    assert "none was quantized: backend.backend_config='x86' has no such dtype config" in line
    assert any(record.levelname == "WARNING" and line in record.getMessage() for record in caplog.records)
    assert state.metrics["nodes/quantized"] > 0  # the rest stays static int8


def test_the_shipped_dynamic_mapping_is_refused_on_qnnpack_only_for_fp16() -> None:
    qnnpack = BackendSpec(engine="qnnpack", backend_config="qnnpack")
    assert qconfigs.named_qconfig("dynamic", qnnpack, "k") is not None
    with pytest.raises(ConfigError) as error:
        qconfigs.named_qconfig("fp16_dynamic", qnnpack, "qconfig_mapping.object_type[0].qconfig")
    assert "\n" not in str(error.value) and "backend=x86" in str(error.value)


def test_conf_lists_a_mapping_file_per_family() -> None:
    for name in MAPPING_FILE.values():
        assert (REPO_ROOT / "conf" / "qconfig_mapping" / f"{name}.yaml").is_file()
    assert Path(REPO_ROOT / "conf").is_dir()


def test_diagnose_skips_a_dynamic_model_with_the_reason(run_pipeline) -> None:
    stages = "stages=[load,calibrate,reference_convert,lower,diagnose]"
    _, _, run_dir = run_pipeline([*TOKENS, "diagnose.enabled=true", stages, "qconfig_mapping=dynamic"])
    text = (run_dir / "diagnose" / "diagnosis.txt").read_text()
    assert text.startswith("Skipped: torch's FX numeric suite compares int8 activations") and "hidden" in text
