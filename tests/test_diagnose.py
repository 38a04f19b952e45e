"""The diagnose stage (per-layer SQNR table, diagnosis, suggested skip-list), the inspect stage, and
models that call one module twice."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from pipeline.engine import custom_modules, fx, mappings, qconfigs
from pipeline.errors import ConfigError
from pipeline.measure import sqnr_db
from pipeline.schema import SkipSpec
from pipeline.validation import validate
from stages.lower import lower
from stages.reference_convert import reference_convert
from tests.conftest import CONF_DIR, to_spec

# diagnose on: run_pipeline turns it off unless a test asks for it
TO_LOWER = [
    "stages=[load,calibrate,reference_convert,lower]",
    "tracking=off",
    "cache.enabled=false",
    "diagnose.enabled=true",
]
RANDOM_WEIGHTS = ["model.checkpoint=null", "model.trained=false"]


class ConvReLU6Net(nn.Module):
    """conv -> ReLU6 twice (MobileNet-style, ReLU6 unfused), on 1x8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SharedReLUNet(nn.Module):
    """Calls one nn.ReLU object twice, like torchvision's BasicBlock."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def conv_relu6_net() -> nn.Module:
    torch.manual_seed(0)
    return ConvReLU6Net().eval()


def shared_relu_net() -> nn.Module:
    torch.manual_seed(0)
    return SharedReLUNet().eval()


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "diagnose" / "layers.csv").open() as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_default_model_table_chart_and_suggested_skip_are_consistent(run_pipeline, tmp_path: Path) -> None:
    # 36 dB sits inside the default model's own-SQNR range with 7-bit activations (33-40 dB), so the
    # suggestion is not empty (8 bits, the default on a VNNI CPU, lift every layer above it).
    _, state, run_dir = run_pipeline([*TO_LOWER, "diagnose.skip_below_db=36", "recovery.activation_bits=7"])
    rows = _rows(run_dir)
    # One row per quantized layer: the six convs and the classifier.
    assert sorted(row["module_name"] for row in rows) == sorted(
        ["stem.0", "block1.conv1", "block1.conv2", "widen.0", "block2.conv1", "block2.conv2", "fc"]
    )
    own = [float(row["own_sqnr_db"]) for row in rows]
    assert own == sorted(own), "worst own SQNR first"
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    for row in rows:  # every layer here has weights and a logged output; int8 is good but not exact
        assert 20 < float(row["cumulative_sqnr_db"]) < 60
        assert 30 < float(row["weight_sqnr_db"]) < 60
    metrics = state.metrics
    assert metrics["diagnose/layers"] == len(rows)
    assert metrics["diagnose/worst_layer_sqnr_db"] == pytest.approx(own[0], abs=1e-3)
    stem = next(row for row in rows if row["module_name"] == "stem.0")
    assert metrics["diagnose/first_layer_sqnr_db"] == pytest.approx(float(stem["cumulative_sqnr_db"]), abs=1e-3)
    assert metrics["diagnose/engine_problem"] == 0.0
    text = (run_dir / "diagnose" / "diagnosis.txt").read_text()
    assert "ENGINE FAULT" not in text and rows[0]["module_name"] in text

    png = (run_dir / "diagnose" / "layers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # Every candidate below the threshold was verified (re-converted and measured); the suggested file lists
    # only skips that helped, and is a conf/skip option as it stands.
    candidates = [row["module_name"] for row in rows if float(row["own_sqnr_db"]) < 36][:3]
    assert candidates
    verified = _suggestions(run_dir)
    assert all(f"skip.module_name=[{name}]" in verified for name in candidates)
    helping = {name for name, row in verified.items() if row["helps"] == "True"}
    assert all(float(verified[name]["gain_db"]) >= 1.0 for name in helping)
    suggested_file = run_dir / "diagnose" / "suggested_skip.yaml"
    assert "Copy to conf/skip/suggested.yaml and run with skip=suggested" in suggested_file.read_text()
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    shutil.copy(suggested_file, conf / "skip" / "suggested.yaml")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        spec = to_spec(compose(config_name="config", overrides=["skip=suggested"]))
    validate(spec)
    assert spec.skip.name == "suggested"
    if spec.skip.module_name:  # the best helping skip, exactly as verified
        assert f"skip.module_name=[{', '.join(spec.skip.module_name)}]" in helping


# SmoothQuant (and bias correction) fix outlier_mlp's outlier: off, and at 7 bits, the outlier costs 29 points.
OUTLIER_KEPT = ["recovery.activation_bits=7", "recovery.bias_correction=false", "recovery.smoothquant_alpha=0"]
# convert_fx's own output (the library's qconfigs, nothing done around them) equals the pipeline's only with
# every recovery option off: a parity check, not a diagnosis pin.
CONVERT_FX_LIKE = [
    "recovery.activation_bits=7",
    "recovery.bounded_activations=off",
    "recovery.bias_correction=false",
    "recovery.smoothquant_alpha=0",
]


def _suggestions(run_dir: Path) -> dict[str, dict[str, str]]:
    with (run_dir / "diagnose" / "suggestions.csv").open() as file:
        return {row["suggestion"]: row for row in csv.DictReader(file)}


@pytest.mark.slow
def test_suggested_skips_are_verified_and_raise_output_sqnr(run_pipeline) -> None:
    spec, state, run_dir = run_pipeline(
        ["model=outlier_mlp", "qconfig_mapping=minmax_per_channel", *TO_LOWER, *OUTLIER_KEPT]
    )
    suggested = OmegaConf.merge(
        OmegaConf.structured(SkipSpec), OmegaConf.load(run_dir / "diagnose" / "suggested_skip.yaml")
    )
    # The outlier sits between hidden.1 and hidden.2 (see stages/sources/outlier_mlp.py); diagnose measured
    # the gain of leaving them float and suggests what helped.
    assert {"hidden.1", "hidden.2"} <= set(suggested.module_name)
    diagnosis = state.artifacts["diagnosis"]
    best = max((v for v in diagnosis.verified if v.helps), key=lambda v: v.gain_db)
    assert best.gain_db > 15
    assert f"{best.gain_db:+.1f} dB" in (run_dir / "diagnose" / "diagnosis.txt").read_text()
    assert state.metrics["diagnose/best_gain_db"] == pytest.approx(best.gain_db)
    inputs = torch.cat([x.args[0] for x, _ in state.artifacts["loaded"].data.evaluation])
    with torch.no_grad():
        float_out = state.artifacts["loaded"].model(inputs)

    def output_sqnr(skip: SkipSpec) -> float:
        reference = reference_convert(
            state.artifacts["calibrated"], spec.backend, spec.qconfig_mapping, skip, spec.custom_config
        )
        lowered = lower(reference, spec.backend, state.artifacts["loaded"].data.example_inputs)
        with qconfigs.quantized_engine(spec.backend.engine), torch.no_grad():
            return sqnr_db(float_out, lowered.model(inputs))

    before = output_sqnr(SkipSpec(name="none"))
    after = output_sqnr(OmegaConf.to_object(suggested))
    assert before < 10 and after > before + 15, (before, after)


@pytest.mark.slow
def test_qnnpack_relu6_fault_is_named_on_a_real_model_and_the_fix_measured(run_pipeline) -> None:
    _, state, run_dir = run_pipeline(["experiment=mobile_digits", "backend=qnnpack", *TO_LOWER])
    assert state.metrics["diagnose/engine_problem"] == 1.0
    text = (run_dir / "diagnose" / "diagnosis.txt").read_text()
    assert "ENGINE FAULT: qnnpack's quantized ReLU6/hardtanh gives wrong values" in text
    assert "features.0.2" in text  # the stem's ReLU6, by its module name
    suggestions = _suggestions(run_dir)
    # The other backend, measured on the same reference model (same calibration): a real fix.
    x86 = suggestions["backend=x86"]
    assert x86["helps"] == "True" and float(x86["gain_db"]) > 5
    # Leaving the faulty ReLU6 modules float: lowering runs them in int8 again, and diagnose says so.
    faulty = next(row for name, row in suggestions.items() if name.startswith("skip.module_name=[features.0.2"))
    assert faulty["helps"] == "False" and "undone by lowering" in faulty["note"]
    assert "skipping layers does not fix" in (run_dir / "diagnose" / "suggested_skip.yaml").read_text()
    assert any("ENGINE FAULT" in warning for warning in state.warnings)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["x86", "onednn"])
def test_no_false_engine_alarm_on_a_clamped_model(run_pipeline, backend: str) -> None:
    # recovery.bounded_activations=auto clamps every ReLU6-fed conv: compared after the clip, and each kernel
    # judged against its own float simulation, nothing is an engine fault (on onednn with VNNI neither).
    _, state, run_dir = run_pipeline(["experiment=mobile_digits", f"backend={backend}", *TO_LOWER])
    assert state.metrics["diagnose/engine_problem"] == 0.0
    text = (run_dir / "diagnose" / "diagnosis.txt").read_text()
    assert "ENGINE FAULT" not in text and "No engine fault" in text
    clipped = [row for row in _rows(run_dir) if row["compared_after_clip"] == "0..6"]
    assert len(clipped) >= 10
    assert state.metrics["diagnose/wide_ranges"] == 0.0  # the clamp is on: nothing to recommend


@pytest.mark.slow
def test_relu6_net_on_x86_is_not_an_engine_problem(run_pipeline) -> None:
    model = ["model.factory._target_=tests.test_diagnose.conv_relu6_net", *RANDOM_WEIGHTS, *TO_LOWER]
    for clamp in ("on", "off"):
        _, x86, x86_dir = run_pipeline([*model, "backend=x86", f"recovery.bounded_activations={clamp}"])
        assert x86.metrics["diagnose/engine_problem"] == 0.0
        assert "ENGINE FAULT" not in (x86_dir / "diagnose" / "diagnosis.txt").read_text()


@pytest.mark.slow
def test_wide_relu6_ranges_recommend_the_range_fix_with_its_measured_gain(run_pipeline) -> None:
    _, state, run_dir = run_pipeline(["experiment=mobile_digits", *TO_LOWER, "recovery.bounded_activations=off"])
    assert state.metrics["diagnose/wide_ranges"] >= 10
    text = (run_dir / "diagnose" / "diagnosis.txt").read_text()
    assert "WIDE RANGES" in text and "recovery.bounded_activations=on" in text
    suggestions = _suggestions(run_dir)
    fix = suggestions["recovery.bounded_activations=on"]
    assert fix["helps"] == "True" and float(fix["gain_db"]) > 5
    # A skip that does not help is reported with its measured gain as no help, and never suggested.
    suggested = (run_dir / "diagnose" / "suggested_skip.yaml").read_text()
    for name, row in suggestions.items():
        if name.startswith("skip.") and row["helps"] == "False":
            assert "NO HELP" in text
            assert all(f"- {module}" not in suggested for module in name[18:-1].split(", "))


@pytest.mark.slow
def test_only_skippable_modules_are_named_and_an_undone_user_skip_warns(run_pipeline) -> None:
    # features.1.0.2 is a ReLU6 module: a module_name entry leaves it float at convert, lowering re-quantizes it.
    _, state, run_dir = run_pipeline(["experiment=mobile_digits", *TO_LOWER, "skip.module_name=[features.1.0.2]"])
    lowered = state.artifacts["lowered"].model
    called = {str(node.target) for node in lowered.graph.nodes if node.op == "call_module"}
    for row in _rows(run_dir):
        assert row["module_name"] and row["module_name"] in called  # never '' (the top level)
    assert state.metrics["diagnose/undone_skips"] == 1.0
    assert "SKIP UNDONE" in (run_dir / "diagnose" / "diagnosis.txt").read_text()
    assert any("undone by lowering" in warning and "features.1.0.2" in warning for warning in state.warnings)
    # The lower stage says it too ("left 1 nodes float", then 0 float ops), with or without diagnose.
    assert any(warning.startswith("lower: the skip-list left 1 nodes float") for warning in state.warnings)


def test_inspect_lists_real_names_and_marks_a_bogus_skip_entry(run_pipeline, capsys) -> None:
    _, state, run_dir = run_pipeline(
        [
            "stages=[load,inspect]",
            "tracking=off",
            "skip=first_last",
            "skip.module_name=[stem.0,fcc]",
            "skip.object_type=[operator.add]",
            "qconfig_mapping=mixed",
        ]
    )
    text = (run_dir / "inspect" / "model.txt").read_text()
    assert text in capsys.readouterr().out  # printed as well
    assert "calibrated" not in state.artifacts  # prepare only, no calibration
    lines = text.splitlines()
    assert any(line.split()[:2] == ["block1.conv1", "torch.ao.nn.intrinsic.modules.fused.ConvReLU2d"] for line in lines)
    assert any(line.split()[:3] == ["fc", "call_module", "fc"] for line in lines)
    assert "  skip.module_name[0]='stem.0' -> stem_0" in lines
    bogus = next(line for line in lines if line.startswith("  skip.module_name[1]='fcc'"))
    assert "matches nothing" in bogus and "Did you mean 'fc'" in bogus
    # operator.add: the two residual adds, wherever they run.
    adds = next(line for line in lines if line.startswith("  skip.object_type[0]='operator.add' -> "))
    assert adds.split(" -> ")[1].split(", ") == ["add", "add_1"]
    # The mapping's own entries: the Linear type, the stem regex, the block2 module name (prefix).
    assert "  qconfig_mapping.object_type[0]='torch.nn.Linear' -> fc" in lines
    assert "  qconfig_mapping.module_name_regex[0]='stem\\..*' -> stem_0" in lines
    block2 = next(line for line in lines if line.startswith("  qconfig_mapping.module_name[0]='block2' -> "))
    assert set(block2.split(" -> ")[1].split(", ")) == {"block2_conv1", "block2_conv2", "add_1", "block2_relu2"}


def test_inspect_needs_load() -> None:
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match=r"runs 'inspect' without \['load'\]"):
        validate(to_spec(compose_config(["stages=[inspect]"])))
    assert "inspect" not in to_spec(compose_config([])).stages


@pytest.mark.slow
def test_a_module_called_twice_lowers_and_diagnoses_with_convert_fx_numerics(run_pipeline, monkeypatch) -> None:
    model = ["model.factory._target_=tests.test_diagnose.shared_relu_net", *RANDOM_WEIGHTS, *TO_LOWER, *CONVERT_FX_LIKE]
    spec, state, run_dir = run_pipeline(model)
    assert state.metrics["diagnose/layers"] >= 3
    assert {row["module_name"] for row in _rows(run_dir)} >= {"conv1", "conv2", "fc"}
    prepared = state.artifacts["calibrated"].model
    # The fused conv1 keeps the original ReLU; the top-level `relu` is now its own copy.
    assert prepared.get_submodule("relu") is not prepared.get_submodule("conv1.1")

    # The same calibration on the unmodified prepared model, converted by torch's own convert_fx.
    from stages.calibrate import calibrate

    monkeypatch.setattr(fx, "unshare_stateless_modules", lambda model: [])
    plain = calibrate(
        state.artifacts["loaded"], spec.backend, spec.qconfig_mapping, spec.custom_config, spec.calibrate
    ).model
    assert plain.get_submodule("relu") is plain.get_submodule("conv1.1")
    assert plain.state_dict().keys() == prepared.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in prepared.state_dict().items())
    expected = fx.convert_in_one_step(
        plain,
        mappings.build_convert_mapping(spec.qconfig_mapping, spec.skip, spec.backend, plain),
        qconfigs.get_backend_config(spec.backend.backend_config),
        custom_modules.build_custom_configs(spec.custom_config)[1],
        spec.backend.engine,
    )
    inputs = torch.cat([x.args[0] for x, _ in state.artifacts["loaded"].data.evaluation])
    with qconfigs.quantized_engine(spec.backend.engine), torch.no_grad():
        assert torch.equal(state.artifacts["lowered"].model(inputs), expected(inputs))


def test_module_numerics_leaves_the_calibration_alone() -> None:
    """The float side runs the calibrated model itself with its observers bypassed (no copy): its observer
    state is the same after, no bypass is left behind, and its float outputs are the float model's."""
    from pipeline.batch import ModelInputs
    from pipeline.engine import steps
    from pipeline.engine.numerics import module_numerics
    from pipeline.schema import BackendSpec, CustomConfigSpec, QConfigMappingSpec, RecoverySpec

    torch.manual_seed(0)
    model = ConvReLU6Net().eval()
    backend, mapping = BackendSpec(engine="x86", backend_config="x86"), QConfigMappingSpec(name="backend_default")
    example = ModelInputs((torch.rand(4, 1, 8, 8),))
    prepared = steps.prepare(model, example, "m", backend, mapping, CustomConfigSpec(), RecoverySpec())
    with qconfigs.quantized_engine("x86"), torch.no_grad():
        prepared(torch.rand(16, 1, 8, 8))
        conversion = steps.convert_reference(prepared, backend, mapping, SkipSpec(name="none"), CustomConfigSpec())
        lowered, _ = steps.lower(conversion, backend, example)
    state = {name: value.clone() for name, value in prepared.state_dict().items()}
    inputs = ModelInputs((torch.rand(8, 1, 8, 8) * 10,))  # outside the calibrated range: observers would widen
    layers, logged = module_numerics(prepared, lowered, inputs, "x86", conversion.model)
    assert {layer.module_name for layer in layers} == {"conv1", "conv2", "fc"}
    after = prepared.state_dict()
    assert all(torch.equal(after[name], value) for name, value in state.items())
    assert not any("forward" in vars(module) for module in prepared.modules())
