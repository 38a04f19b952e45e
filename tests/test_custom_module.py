"""Custom modules through PrepareCustomConfig / ConvertCustomConfig, the experiment=custom_module
example end to end, and the error for a model FX cannot trace."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pipeline.engine import custom_modules
from pipeline.errors import ConfigError
from pipeline.schema import BackendSpec, CustomConfigSpec, QConfigMappingSpec
from pipeline.validation import validate
from stages.calibrate import prepare
from stages.export import PRESERVED_ATTRIBUTES_FILE, read_extra_file
from stages.sources.custom_block import (
    CLASS_NAMES,
    VERSION,
    CustomBlockCNN,
    ObservedPeakLimiter,
    PeakLimiter,
    QuantizedPeakLimiter,
)
from stages.sources.digits import digits_data
from stages.types import Loaded
from tests.conftest import CONF_DIR, FAST, REPO_ROOT, compose_config, to_spec

MODULE = "stages.sources.custom_block"
FLOAT, OBSERVED, QUANTIZED = f"{MODULE}.PeakLimiter", f"{MODULE}.ObservedPeakLimiter", f"{MODULE}.QuantizedPeakLimiter"
# Measured on this example: lowered output SQNR vs float 32.4 dB (fbgemm) and 32.1 dB (qnnpack), the
# same as the reference model. 28 dB leaves room for other CPUs' rounding, while a quantized block
# that ignored the calibrated qparams (or a lowering that broke around it) lands far below.
SQNR_FLOOR_DB = 28.0


def _example_spec() -> CustomConfigSpec:
    return to_spec(compose_config(["experiment=custom_module"])).custom_config


def _spec(prepare: dict | None = None, convert: dict | None = None) -> CustomConfigSpec:
    return CustomConfigSpec(name="test", prepare=prepare or {}, convert=convert or {})


def _static(key: str, mapping: dict[str, str]) -> dict:
    return {key: {"static": mapping}}


PREPARE_KEY = "float_to_observed_custom_module_class"
CONVERT_KEY = "observed_to_quantized_custom_module_class"


# --------------------------------------------------------------------------------------------------
# YAML -> configs -> to_dict


def test_experiment_preset_picks_model_data_and_custom_config_and_validates() -> None:
    spec = to_spec(compose_config(["experiment=custom_module"]))
    validate(spec)
    assert (spec.model.name, spec.data.name, spec.custom_config.name) == ("custom_block", "digits", "custom_block")
    default = to_spec(compose_config([]))
    assert (default.model.name, default.custom_config.name) == ("digits_cnn", "none")
    assert sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml")) == [
        "custom_module",
        "mobile_digits",
        "none",
        "outlier_transformer",
        "text_encoder",
    ]


def test_resolved_configs_round_trip_through_to_dict_and_the_logged_yaml() -> None:
    spec = _example_spec()
    prepare_config, convert_config = custom_modules.build_custom_configs(spec)
    prepare_dict, convert_dict = prepare_config.to_dict(), convert_config.to_dict()
    assert prepare_dict[PREPARE_KEY] == {"static": {PeakLimiter: ObservedPeakLimiter}}
    assert convert_dict[CONVERT_KEY] == {"static": {ObservedPeakLimiter: QuantizedPeakLimiter}}
    assert prepare_dict["preserved_attributes"] == convert_dict["preserved_attributes"] == ["class_names", "version"]
    # to_dict -> from_dict -> to_dict is the identity on the resolved configs.
    assert type(prepare_config).from_dict(prepare_dict).to_dict() == prepare_dict
    assert type(convert_config).from_dict(convert_dict).to_dict() == convert_dict
    # The YAML written into the run folders holds import paths and builds the same configs again.
    logged_prepare = yaml.safe_load(custom_modules.custom_config_yaml(prepare_config))
    logged_convert = yaml.safe_load(custom_modules.custom_config_yaml(convert_config))
    assert logged_prepare[PREPARE_KEY] == {"static": {FLOAT: OBSERVED}}
    assert logged_convert[CONVERT_KEY] == {"static": {OBSERVED: QUANTIZED}}
    rebuilt_prepare, rebuilt_convert = custom_modules.build_custom_configs(_spec(logged_prepare, logged_convert))
    assert rebuilt_prepare.to_dict() == prepare_dict
    assert rebuilt_convert.to_dict() == convert_dict


# --------------------------------------------------------------------------------------------------
# Validation before calibration


def test_validation_runs_from_pipeline_validation() -> None:
    spec = to_spec(compose_config(["experiment=custom_module"]))
    spec = replace(spec, custom_config=_spec(_static(PREPARE_KEY, {f"{MODULE}.Nope": OBSERVED})))
    with pytest.raises(ConfigError, match=r"Nope"):
        validate(spec)


def test_import_path_that_does_not_resolve() -> None:
    with pytest.raises(ConfigError) as error:
        custom_modules.check_custom_config(_spec(_static(PREPARE_KEY, {FLOAT: f"{MODULE}.ObservedPeakLimitr"})))
    assert (
        f"custom_config.prepare.float_to_observed_custom_module_class.static['{FLOAT}']="
        f"'{MODULE}.ObservedPeakLimitr' is not an importable path: '{MODULE}'"
    ) in str(error.value)
    assert "has no attribute 'ObservedPeakLimitr'. Did you mean 'ObservedPeakLimiter'" in str(error.value)


def test_quantized_class_without_from_observed() -> None:
    spec = _spec(_static(PREPARE_KEY, {FLOAT: OBSERVED}), _static(CONVERT_KEY, {OBSERVED: FLOAT}))
    with pytest.raises(ConfigError) as error:
        custom_modules.check_custom_config(spec)
    assert (
        f"custom_config.convert.observed_to_quantized_custom_module_class.static['{OBSERVED}']='{FLOAT}' "
        f"has no classmethod from_observed()"
    ) in str(error.value)


def test_observed_class_in_convert_mapping_that_prepare_never_produces() -> None:
    with pytest.raises(ConfigError) as error:
        custom_modules.check_custom_config(_spec(convert=_static(CONVERT_KEY, {OBSERVED: QUANTIZED})))
    message = str(error.value)
    assert f"custom_config.convert.observed_to_quantized_custom_module_class.static['{OBSERVED}']" in message
    assert "no custom_config.prepare.float_to_observed_custom_module_class.static entry" in message
    assert "produces for static: none" in message


def test_observed_class_without_from_float() -> None:
    with pytest.raises(ConfigError) as error:
        custom_modules.check_custom_config(_spec(_static(PREPARE_KEY, {FLOAT: QUANTIZED})))
    assert (
        f"custom_config.prepare.float_to_observed_custom_module_class.static['{FLOAT}']='{QUANTIZED}' "
        f"has no classmethod from_float()"
    ) in str(error.value)


def test_unknown_quant_mode() -> None:
    with pytest.raises(ConfigError) as error:
        custom_modules.check_custom_config(_spec({PREPARE_KEY: {"statik": {FLOAT: OBSERVED}}}))
    message = str(error.value)
    assert "custom_config.prepare.float_to_observed_custom_module_class has quant mode 'statik'" in message
    assert "['static', 'dynamic', 'weight_only']" in message
    assert "Did you mean 'static'?" in message


def test_unknown_key_is_named_with_the_valid_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"custom_config.prepare.preserved_attribute is not a key.*'preserved_attributes'"
    ):
        custom_modules.check_custom_config(_spec({"preserved_attribute": ["version"]}))


# --------------------------------------------------------------------------------------------------
# A model FX cannot trace


def _loaded(model: nn.Module) -> Loaded:
    return Loaded(model=model.eval(), data=digits_data(), model_name="custom_block", trained_weights=False)


BACKEND = BackendSpec(engine="fbgemm", backend_config="fbgemm")
MAPPING = QConfigMappingSpec(name="backend_default")


def test_untraceable_submodule_is_a_config_error_naming_it_and_the_fix() -> None:
    with pytest.raises(ConfigError) as error:
        prepare(_loaded(CustomBlockCNN()), BACKEND, MAPPING, CustomConfigSpec())
    message = str(error.value)
    assert "cannot symbolically trace model=custom_block" in message
    assert f"submodule 'limiter' ({FLOAT}) raised TraceError" in message
    assert "symbolically traced variables cannot be used as inputs to control flow" in message
    assert "`custom_config.prepare.non_traceable_module_name: [limiter]`" in message
    assert f"`custom_config.prepare.non_traceable_module_class: [{FLOAT}]`" in message


def test_the_suggested_setting_makes_the_model_prepare() -> None:
    prepared = prepare(_loaded(CustomBlockCNN()), BACKEND, MAPPING, _spec({"non_traceable_module_name": ["limiter"]}))
    assert type(prepared.limiter) is PeakLimiter  # called as a leaf, left float


def test_untraceable_top_level_forward_is_named_as_such() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.flatten(x, 1)
            return self.fc(x) if x.sum() > 0 else self.fc(-x)

    with pytest.raises(ConfigError, match=r"its own top-level forward \(.*Gated\) raised TraceError"):
        prepare(_loaded(Gated()), BACKEND, MAPPING, CustomConfigSpec())


# --------------------------------------------------------------------------------------------------
# The example end to end


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack"])
def test_custom_module_example_end_to_end(run_pipeline, engine: str) -> None:
    spec, state, run_dir = run_pipeline(["experiment=custom_module", f"backend={engine}", "diagnose.enabled=true"])
    lowered = state.artifacts["lowered"].model
    assert isinstance(lowered.limiter, QuantizedPeakLimiter)
    # lowered_model.txt shows the custom quantized class in the int8 model, in the tree and the type table.
    listing = (run_dir / "lower" / "lowered_model.txt").read_text()
    assert "(limiter): QuantizedPeakLimiter(" in listing
    assert f"\n1  {QUANTIZED}\n" in listing
    assert state.artifacts["lowered"].node_counts["float"] == 0  # the custom block runs on quantized tensors
    # The preserved attributes, on the lowered model and inside every exported file after reload.
    assert lowered.class_names == CLASS_NAMES and lowered.version == VERSION
    expected = {"class_names": CLASS_NAMES, "version": VERSION}
    files = {PRESERVED_ATTRIBUTES_FILE: ""}
    torch.jit.load(str(run_dir / "export" / f"lowered_{engine}.torchscript.pt"), _extra_files=files)
    assert json.loads(files[PRESERVED_ATTRIBUTES_FILE]) == expected
    if engine == "qnnpack":
        assert (
            json.loads(read_extra_file(run_dir / "export" / "lowered_qnnpack.ptl", PRESERVED_ATTRIBUTES_FILE))
            == expected
        )
    onnx_file = run_dir / "export" / f"lowered_{engine}.onnx"
    if onnx_file.exists():
        import onnx

        props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
        assert json.loads(props[PRESERVED_ATTRIBUTES_FILE]) == expected
    # Sane numbers.
    metrics = state.metrics
    assert metrics["eval/float/accuracy"] >= 0.9
    assert abs(metrics["eval/lowered/accuracy"] - metrics["eval/float/accuracy"]) <= 0.02
    assert metrics["eval/lowered/sqnr_db"] >= SQNR_FLOOR_DB
    assert metrics["export/torchscript/max_abs_diff"] == 0.0
    # Both configs are in the run folders (so in MLflow with the stage artifacts), as import paths.
    logged_prepare = yaml.safe_load((run_dir / "calibrate" / "prepare_custom_config.yaml").read_text())
    logged_convert = yaml.safe_load((run_dir / "reference_convert" / "convert_custom_config.yaml").read_text())
    assert logged_prepare[PREPARE_KEY] == {"static": {FLOAT: OBSERVED}}
    assert logged_convert[CONVERT_KEY] == {"static": {OBSERVED: QUANTIZED}}
    # Diagnose compares same-named modules by forward hooks, so the custom module is diagnosed like the rest
    # (torch's numeric suite, which re-traces the model, could not step around it).
    assert metrics["diagnose/failed"] == 0.0 and metrics["diagnose/layers"] >= 4
    with (run_dir / "diagnose" / "layers.csv").open() as file:
        kinds = {row["module_name"]: row["op_type"] for row in csv.DictReader(file)}
    assert kinds["limiter"] == "QuantizedPeakLimiter"


def test_search_accepts_custom_modules() -> None:
    validate(to_spec(compose_config(["experiment=custom_module", "search=greedy"])))


@pytest.mark.slow
def test_cli_runs_the_example_in_one_command(tmp_path: Path) -> None:
    # Off what the test reads nothing of: test_custom_module_example_end_to_end runs the same example with
    # tracking (MLflow) and diagnose on, in-process; here the one command and its TorchScript file.
    untimed = ["tracking=off", "diagnose.enabled=false", "evaluate.latency.enabled=false", "export.onnx=false"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "experiment=custom_module",
            "backend=fbgemm",
            f"output_dir={tmp_path}",
            *FAST,
            *untimed,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "export" / "lowered_fbgemm.torchscript.pt").is_file()


# --------------------------------------------------------------------------------------------------
# A user's own classes in their own file, and the custom-module contract checked before calibration

USER_PROJECT = Path(__file__).resolve().parent / "user_project"


def _gate_spec(observed: str = "ObservedGate", quantized: str = "QuantizedGate", module: str = "gate_net", **kw):
    return CustomConfigSpec(
        name="gate",
        prepare=_static(PREPARE_KEY, {f"{module}.Gate": f"{module}.{observed}"}),
        convert=_static(CONVERT_KEY, {f"{module}.{observed}": f"{module}.{quantized}"}),
        **kw,
    )


def _gate_loaded() -> Loaded:
    from stages.load import resolve_factory

    build = resolve_factory({"_target_": "gate_net.build"}, "model.factory", [str(USER_PROJECT)])
    return _loaded(build())


def test_classes_in_a_user_file_resolve_through_model_python_path_and_run(tmp_path: Path) -> None:
    from pipeline import runner

    overrides = ["model=custom", "model.factory._target_=gate_net.build", f"model.python_path=[{USER_PROJECT}]"]
    overrides += ["model.trained=false", "stages=[load,calibrate,reference_convert,lower]", "tracking=off"]
    cfg = compose_config([*overrides, "cache.enabled=false", "diagnose.enabled=false"], output_dir=tmp_path)
    spec = replace(to_spec(cfg), custom_config=_gate_spec())
    validate(spec)  # resolves gate_net.* with model.python_path on the path: no PYTHONPATH
    state = runner.run(spec, cfg, tmp_path / "run")
    assert type(state.artifacts["lowered"].model.gate).__name__ == "QuantizedGate"
    listing = (tmp_path / "run" / "lower" / "lowered_model.txt").read_text()
    assert "(gate): QuantizedGate(" in listing and "\n1  gate_net.QuantizedGate\n" in listing


def test_custom_config_python_path_finds_classes_and_a_typo_gets_did_you_mean(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    (own / "my_gates.py").write_text((USER_PROJECT / "gate_net.py").read_text())
    spec = _gate_spec(module="my_gates", python_path=[str(own)])
    custom_modules.check_custom_config(spec)
    with pytest.raises(ConfigError) as error:
        custom_modules.check_custom_config(_gate_spec("ObservedGte", module="my_gates", python_path=[str(own)]))
    message = str(error.value)
    assert f"'my_gates' ({own / 'my_gates.py'}) has no attribute 'ObservedGte'" in message
    assert "Did you mean 'ObservedGate'" in message
    with pytest.raises(ConfigError, match=r"no module 'nowhere_gates' was found.*set custom_config.python_path"):
        custom_modules.check_custom_config(_gate_spec(module="nowhere_gates"))


def test_an_observed_class_that_drops_qconfig_is_named_before_calibration() -> None:
    with pytest.raises(ConfigError) as error:
        prepare(_gate_loaded(), BACKEND, MAPPING, _gate_spec("ObservedGateNoQconfig"))
    message = str(error.value)
    assert "\n" not in message
    assert "='gate_net.ObservedGateNoQconfig': module 'gate'" in message
    assert "Rule: the observed class must carry the float module's qconfig over" in message
    assert "AttributeError: 'ObservedGateNoQconfig' object has no attribute 'qconfig'" in message


def test_a_quantized_class_that_returns_a_float_tensor_is_named_before_calibration() -> None:
    with pytest.raises(ConfigError) as error:
        prepare(_gate_loaded(), BACKEND, MAPPING, _gate_spec(quantized="QuantizedGateFloatOut"))
    message = str(error.value)
    assert "\n" not in message
    assert (
        "='gate_net.QuantizedGateFloatOut': module 'gate' built by gate_net.QuantizedGateFloatOut.from_observed()"
        in message
    )
    assert "returned a non-quantized torch.float32 tensor when given a quantized torch.quint8 tensor" in message
    assert (
        "Rule: for quant mode static, the quantized class takes a quantized tensor and returns a quantized" in message
    )


def test_the_example_classes_keep_the_contract() -> None:
    prepared = prepare(_loaded(CustomBlockCNN()), BACKEND, MAPPING, _example_spec())
    assert isinstance(prepared.limiter, ObservedPeakLimiter)
