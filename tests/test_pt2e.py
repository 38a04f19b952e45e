"""engine=pt2e: torch.export + torchao's PT2E flow behind the same config. The digits default end to end
(the .pt2 file reloaded in a fresh process by the export stage and compared; diagnose through torchao's
numeric debugger), what pt2e refuses at start-up, skip-lists at prepare time, the calibration cache key per
engine, and the calibration without the skip-list serving a skip-list sweep (observers filled by the tensors
they observe, all must find a source); the ResNet-18-shaped net end to end with every exported file (.pt2,
AOTInductor package, ONNX) reloaded in a fresh process and compared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cache import cache_key, skip_list_key
from pipeline.engine.pt2e_quantizers import torchao_available
from pipeline.errors import ConfigError
from pipeline.validation import validate
from tests.conftest import compose_config, run_pipeline_in, to_spec

pytestmark = pytest.mark.skipif(
    not torchao_available(), reason="torchao is not installed (the [pt2e] extra: pip install --no-deps torchao==0.18.0)"
)

# Quick: no AOTInductor package (about 15 s to build on 2 cores), no ONNX; the .pt2 is written and reloaded.
# The q/dq program ("reference") is evaluated too: its figures are what these tests compare.
QUICK = [
    "engine=pt2e",
    "tracking=off",
    "export.aot_inductor=false",
    "export.onnx=false",
    "evaluate.models=[float,reference,lowered]",
]


def _metrics(run_dir) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """The digits default on pt2e x86 end to end, with ONNX: one run both digits tests read (state, run dir)."""
    _, state, run_dir = run_pipeline_in(
        tmp_path_factory.mktemp("digits"), [*QUICK, "backend=x86", "export.onnx=true", "diagnose.enabled=true"]
    )
    return state, run_dir


@pytest.mark.slow
def test_digits_default_runs_end_to_end_on_pt2e_x86_and_the_pt2_file_reloads(digits_run) -> None:
    _, run_dir = digits_run
    metrics = _metrics(run_dir)
    assert metrics["eval/float/accuracy"] > 0.98
    assert metrics["eval/reference/accuracy"] >= metrics["eval/float/accuracy"] - 0.01
    assert metrics["eval/lowered/accuracy"] == metrics["eval/reference/accuracy"]
    assert metrics["eval/reference/sqnr_db"] > 30
    assert 0.2 < metrics["size/ratio"] < 0.5  # int8 weights, per-channel scales, float biases (as for FX)
    # The .pt2 was reloaded in a fresh process (plain torch) by the export stage and matches the q/dq program.
    assert (run_dir / "export" / "qdq_x86.pt2").is_file()
    assert metrics["export/pt2/disagrees"] == 0.0
    assert metrics["export/pt2/max_abs_diff"] < 1e-5
    # ONNX through the dynamo exporter, one self-contained file, run by onnxruntime against the q/dq program.
    assert sorted(path.name for path in (run_dir / "export").glob("*.onnx*")) == ["qdq_x86.onnx"]
    assert metrics["export/onnx/bytes"] == (run_dir / "export" / "qdq_x86.onnx").stat().st_size
    assert metrics["export/onnx/sqnr_db"] > 40 and metrics["export/onnx/agreement"] > 0.98
    assert metrics["export/onnx/disagrees"] == 0.0
    assert metrics["node_counts/quantized"] > 0 if "node_counts/quantized" in metrics else True
    assert "latency/lowered/compiled/b1_median_ms" in metrics
    _check_pt2e_diagnosis(run_dir, metrics)


# Every conv/linear of the digits default is above 30 dB cumulative: measured 36.8-44.3 dB with 8-bit
# activations (VNNI), and 7-bit activations cost about 3 dB of output SQNR (issue 16: 38.5 vs 35.6 dB), so
# about 33 dB at worst. The wrong reference (the float model: batch norm is folded only on the quantized
# side) gives -1 to 8 dB, far below. 30 dB is also diagnose.skip_below_db's default: a healthy model gets
# no skip candidates.
PT2E_NODE_FLOOR_DB = 30.0


def _check_pt2e_diagnosis(run_dir, metrics: dict[str, float]) -> None:
    """diagnose ran on pt2e (torchao's numeric debugger): one finite cumulative SQNR per conv/linear above the
    floor, no own SQNR claimed, the worst layer named first in diagnosis.txt, which says the figures are
    cumulative."""
    import csv
    import math

    assert "diagnose/skipped" not in metrics and metrics["diagnose/failed"] == 0.0
    with (run_dir / "diagnose" / "layers.csv").open() as file:
        rows = list(csv.DictReader(file))
    names = {row["module_name"] for row in rows}  # named by module, as skip.module_name entries are
    assert names == {"stem.0", "block1.conv1", "block1.conv2", "widen.0", "block2.conv1", "block2.conv2", "fc"}
    assert len(rows) == metrics["diagnose/layers"]
    cumulative = [float(row["cumulative_sqnr_db"]) for row in rows]
    assert all(math.isfinite(value) and value > PT2E_NODE_FLOOR_DB for value in cumulative), cumulative
    assert cumulative == sorted(cumulative)  # worst first
    assert metrics["diagnose/worst_layer_sqnr_db"] == pytest.approx(cumulative[0], abs=1e-3)  # the csv rounds
    assert all(row["own_sqnr_db"] == "" for row in rows)  # not measured on pt2e
    text = (run_dir / "diagnose" / "diagnosis.txt").read_text()
    assert "CUMULATIVE" in text and "torchao's numeric debugger" in text
    assert f"Lowest cumulative SQNR: {rows[0]['module_name']} ({rows[0]['op_type']}) " in text
    assert "nothing to skip" in text  # nothing below diagnose.skip_below_db


# A deployment's loader: plain torch (no torchao, no pipeline) or onnxruntime, in a new process, for every
# file a test checks (one process: each costs seconds of imports). Prints whether torchao got imported, so a
# test sees the files did not need it.
_FRESH_PROCESS = """
import sys, torch
import torch.ao.quantization.fx._decomposed  # the quantized_decomposed ops a q/dq program calls
jobs, results = torch.load(sys.argv[1]), []
for path, args in jobs:
    if path.endswith(".onnx"):
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {entry.name: value.numpy() for entry, value in zip(session.get_inputs(), args)}
        results.append(torch.from_numpy(session.run(None, feed)[0]))
        continue
    if path.endswith(".aoti.pt2"):
        module = torch._inductor.aoti_load_package(path)
    else:
        module = torch.export.load(path).module()
    with torch.no_grad():
        results.append(module(*args))
torch.save(results, sys.argv[2])
print("torchao imported" if "torchao" in sys.modules else "plain torch")
"""


def run_in_fresh_process(jobs: list[tuple[Path, tuple[torch.Tensor, ...]]], work: Path) -> list[torch.Tensor]:
    """Each `path` (.pt2, .aoti.pt2 or .onnx) loaded in one new Python process with plain torch (or
    onnxruntime) and run on its `args`; their outputs, in order."""
    inputs, result = work / "fresh.inputs.pt", work / "fresh.outputs.pt"
    torch.save([(str(path), args) for path, args in jobs], inputs)
    command = [sys.executable, "-c", _FRESH_PROCESS, str(inputs), str(result)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "plain torch"
    return torch.load(result)


def qdq_program(state) -> torch.nn.Module:
    """The run's q/dq program (what every exported file is compared with)."""
    from pipeline.engine import pt2e

    return pt2e.program_of(state.artifacts["lowered"].model)


@pytest.mark.slow
def test_pt2_file_loads_with_plain_torch_in_a_fresh_process(digits_run, tmp_path) -> None:
    state, run_dir = digits_run
    path, program = run_dir / "export" / "qdq_x86.pt2", qdq_program(state)
    batches = [torch.rand(batch, 1, 8, 8) for batch in (5, 1)]  # any batch size
    outputs = run_in_fresh_process([(path, (x,)) for x in batches], tmp_path)
    with torch.no_grad():
        for x, actual in zip(batches, outputs, strict=True):
            assert torch.equal(actual, program(x))


@pytest.mark.slow
def test_resnet18_shape_runs_end_to_end_on_pt2e_x86_and_every_file_reloads(run_pipeline, tmp_path) -> None:
    from pipeline.measure import sqnr_db

    small = ["data.factory.shape=[3,32,32]", "data.factory.calibration_batches=1", "data.factory.batch_size=4"]
    _, state, run_dir = run_pipeline(
        [
            *QUICK,
            "model=resnet18",
            "data=synthetic",
            *small,
            "data.factory.evaluation_batches=1",
            "diagnose.enabled=false",
            "evaluate.latency.batch_sizes=[4]",  # the compiled model's one shape: no extra compile
            "export.aot_inductor=true",
            "export.onnx=true",
        ]
    )
    metrics = _metrics(run_dir)
    assert metrics["eval/reference/sqnr_db"] > 30  # random weights: output SQNR against float, no accuracy
    assert metrics["eval/lowered/sqnr_db"] > 30
    assert "latency/lowered/compiled/b4_median_ms" in metrics
    # Sized by the tensors the q/dq program reads, not the float weights convert_pt2e leaves on the module.
    assert 0.2 < metrics["size/ratio"] < 0.3
    export = run_dir / "export"
    files = sorted(path.name for path in export.iterdir() if path.suffix in (".pt2", ".onnx"))
    assert files == ["compiled_x86_b4.aoti.pt2", "qdq_x86.onnx", "qdq_x86.pt2"]
    inputs = state.artifacts["loaded"].data.evaluation[0][0]
    program = qdq_program(state)
    args = inputs.positional(program)
    with torch.no_grad():
        expected = program(*args)
    names = ("qdq_x86.pt2", "compiled_x86_b4.aoti.pt2", "qdq_x86.onnx")
    reloaded, *others = run_in_fresh_process([(export / name, args) for name in names], tmp_path)
    assert torch.equal(reloaded, expected)
    for name, actual in zip(names[1:], others, strict=True):  # other kernels: close, not equal
        assert actual.shape == expected.shape == (4, 1000)
        assert sqnr_db(expected, actual) > 35, name
        assert (actual.argmax(1) == expected.argmax(1)).float().mean() >= 0.75, name
    for name in ("pt2", "aot_inductor", "onnx"):  # the export stage's own check agrees
        assert metrics[f"export/{name}/disagrees"] == 0.0


@pytest.mark.slow
def test_qnnpack_runs_through_the_xnnpack_quantizer(run_pipeline) -> None:
    _, _, run_dir = run_pipeline([*QUICK, "backend=qnnpack", "evaluate.latency.enabled=false"])
    metrics = _metrics(run_dir)
    assert metrics["eval/reference/accuracy"] > 0.97
    assert metrics["export/pt2/disagrees"] == 0.0


@pytest.mark.slow
def test_pt2e_onnx_is_skipped_with_the_reason_without_onnxscript(run_pipeline, monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a)
    )
    stages = "stages=[load,calibrate,reference_convert,lower,export]"
    _, _, run_dir = run_pipeline([*QUICK, "export.onnx=true", "evaluate.latency.enabled=false", stages])
    skipped = json.loads((run_dir / "export" / "skipped.json").read_text())
    assert "onnxscript not installed" in skipped["onnx"] and ".[onnx]" in skipped["onnx"]
    assert not list((run_dir / "export").glob("*.onnx"))


@pytest.mark.slow
def test_skip_list_applies_at_prepare_time(run_pipeline) -> None:
    # Only reference_convert's left_float.json is read: the run stops there.
    _, _, run_dir = run_pipeline([*QUICK, "skip=first_last", "stages=[load,calibrate,reference_convert]"])
    left = json.loads((run_dir / "reference_convert" / "left_float.json").read_text())
    assert any(entry.startswith("stem.0") for entry in left) and any(entry.startswith("fc") for entry in left)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["backend=fbgemm"], r"backend=fbgemm with engine=pt2e: pt2e has no fbgemm quantizer.*backend=x86"),
        (["backend=onednn"], r"backend=onednn with engine=pt2e"),
        (["skip=add"], r"skip.object_type\[0\]='operator.add' with engine=pt2e.*fuses add into the conv"),
        (["qconfig_mapping=histogram_per_channel"], r"with engine=pt2e: a pt2e Quantizer takes its own"),
        (["search=greedy"], r"search=greedy with engine=pt2e"),
        (["stages=[load,inspect]"], r"inspect with engine=pt2e"),
        (["engine.name=pt3e"], r"engine.name='pt3e' is not valid.*pt2e"),
    ],
)
def test_what_pt2e_cannot_express_is_refused_at_start_up(overrides, expected) -> None:
    spec = to_spec(compose_config(["engine=pt2e", *overrides]))
    with pytest.raises(ConfigError, match=expected):
        validate(spec)


def test_engine_group_validates_both_options() -> None:
    for option in ("fx", "pt2e"):
        spec = to_spec(compose_config([f"engine={option}"]))
        validate(spec)
        assert spec.engine.name == option


def test_cache_key_says_which_engine_and_leaves_the_skip_list_out() -> None:
    from stages.load import load

    def key(*overrides: str) -> str:
        spec = to_spec(compose_config(list(overrides)))
        loaded = load(spec.model, spec.data, spec.seed)
        return cache_key(spec, loaded.model, [x for x, _ in loaded.data.calibration])

    fx, pt2e = key("engine=fx"), key("engine=pt2e")
    assert fx != pt2e
    assert key("engine=fx", "skip=first_last") == fx  # FX skips at convert time: one calibration serves all
    # pt2e skips at prepare time, but the entry is the model calibrated without the skip-list, which serves it;
    # a skip-list it cannot serve is calibrated under its own key.
    assert key("engine=pt2e", "skip=first_last") == pt2e
    skip = to_spec(compose_config(["skip=first_last"])).skip
    assert skip_list_key(pt2e, skip) not in (pt2e, skip_list_key(fx, skip))


def test_observer_state_keeps_metadata_and_reloads_bit_equal() -> None:
    from pipeline.engine import get_engine
    from pipeline.engine.pt2e import convert
    from stages.calibrate import calibrate, prepare
    from stages.load import load

    spec = to_spec(compose_config(["engine=pt2e"]))
    loaded = load(spec.model, spec.data, spec.seed)
    calibrated = calibrate(
        loaded, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.calibrate, spec.recovery, spec.engine
    )
    engine = get_engine(spec.engine)
    state = engine.observer_state(calibrated.model)
    assert getattr(state, "_metadata", None)
    fresh = prepare(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.recovery, None, spec.engine)
    engine.load_observer_state(fresh, state)
    x = loaded.data.evaluation[0][0].args[0]
    with torch.no_grad():
        assert torch.equal(convert(calibrated.model)(x), convert(fresh)(x))


# --------------------------------------------------------------------------------------------------
# The calibration cache serving skip-lists: observers filled by the tensors they observe


class PoolHead(torch.nn.Module):
    """conv -> relu -> avgpool -> flatten -> linear: x86 shares one observer across relu, avgpool and flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.relu = torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.flatten = torch.nn.Flatten()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


@pytest.mark.slow
def test_observers_are_filled_by_the_tensor_they_observe_and_all_must_find_a_source() -> None:
    from pipeline.batch import ModelInputs
    from pipeline.engine import get_engine, steps
    from pipeline.engine.base import MissingObserverSource
    from pipeline.engine.pt2e import convert
    from pipeline.schema import SkipSpec

    spec = to_spec(compose_config(["engine=pt2e", "backend=x86"]))
    engine = get_engine(spec.engine)
    torch.manual_seed(0)
    model, batches = PoolHead().eval(), [torch.randn(4, 1, 6, 6) for _ in range(3)]

    def calibrated(skip: SkipSpec | None, run: bool = True) -> torch.nn.Module:
        prepared = steps.prepare(
            model,
            ModelInputs((batches[0],)),
            "pool_head",
            spec.backend,
            spec.qconfig_mapping,
            spec.custom_config,
            flow=spec.engine,
            skip=skip,
        )
        with torch.no_grad():
            for batch in batches if run else []:
                prepared(batch)
        return prepared

    state = engine.observer_state(calibrated(None))
    assert "relu+adaptive_avg_pool2d+flatten.min_val" in state  # one shared observer, keyed by all it observes

    # fc left float: every observer of that model observed exactly what one of the model without it did.
    skip_fc = SkipSpec(name="fc", module_name=["fc"])
    served = calibrated(skip_fc, run=False)
    assert engine.missing_observer_sources(served, state) == []
    engine.load_observer_state(served, state)
    with torch.no_grad():
        assert torch.equal(convert(served)(batches[0]), convert(calibrated(skip_fc))(batches[0]))

    # conv left float: flatten gets its own observer, which no observer of the all-int8 model matches.
    unserved = calibrated(SkipSpec(name="conv", object_type=["torch.nn.Conv2d"]), run=False)
    (line,) = engine.missing_observer_sources(unserved, state)
    assert "observes (flatten), which no calibrated observer observed alone" in line
    assert "observed (relu, adaptive_avg_pool2d, flatten)" in line
    with pytest.raises(MissingObserverSource, match="observes \\(flatten\\)"):
        engine.load_observer_state(unserved, state)


@pytest.mark.slow
def test_a_served_skip_list_converts_bit_identical_to_its_own_calibration(tmp_path) -> None:
    """On the digits default, first_last and linear are filled from the calibration without the skip-list
    (run by the first job, stored, then hit) and give the same q/dq outputs, bit for bit, as a fresh
    calibration of that skip-list: every observer saw the same float tensors (the prepared model computes in
    float), in the same order."""
    from pipeline.engine.pt2e import convert, float_weighted_ops
    from stages.calibrate import calibrate_or_load
    from stages.load import load

    loaded = None
    served_keys, hits = set(), []
    for name in ("first_last", "linear", "none"):
        overrides = ["engine=pt2e", "backend=x86", f"skip={name}", f"cache.dir={tmp_path}"]
        spec = to_spec(compose_config(overrides))
        loaded = loaded or load(spec.model, spec.data, spec.seed)
        x = torch.cat([inputs.args[0] for inputs, _ in loaded.data.evaluation])
        served = calibrate_or_load(spec, loaded)
        fresh = calibrate_or_load(to_spec(compose_config([*overrides, "cache.enabled=false"])), loaded)
        program = convert(served.model)
        with torch.no_grad():
            assert torch.equal(program(x), convert(fresh.model)(x)), name
        assert bool(float_weighted_ops(program)) == (name != "none")  # the skip-list did leave layers float
        served_keys.add(served.cache_key)
        hits.append(served.cache_hit)
    assert hits == [False, True, True]  # one calibration, by the first job
    assert len(served_keys) == 1


@pytest.mark.slow
def test_a_pt2e_skip_list_sweep_calibrates_once_where_every_observer_has_a_source(tmp_path) -> None:
    """The CLI sweep none, first_last, linear, conv on pt2e x86: the first three share the calibration without
    the skip-list (one calibration); conv leaves every conv float, so flatten gets an observer of its own that
    the all-int8 model never had (it shared one across relu -> avgpool -> flatten): that job says so and
    calibrates on its own, under its own key."""
    from tests.helpers import parent_and_children, sweep

    skips = ["none", "first_last", "linear", "conv"]
    result = sweep(tmp_path, "engine=pt2e", "backend=x86", f"skip={','.join(skips)}", "stages=[load,calibrate]")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    _, _, children = parent_and_children(tmp_path)
    by_skip = {c.data.tags["override.skip"]: c for c in children}
    assert sorted(by_skip) == sorted(skips)
    calibrations = {skip: by_skip[skip].data.metrics["calibrate/calibrations"] for skip in skips}
    assert calibrations == {"none": 1.0, "first_last": 0.0, "linear": 0.0, "conv": 1.0}
    keys = {skip: by_skip[skip].data.tags["cache_key"] for skip in skips}
    assert keys["none"] == keys["first_last"] == keys["linear"] != keys["conv"]
    assert "skip=first_last's observers filled from it by the tensors they observe" in output
    assert "skip=conv cannot reuse the calibration without the skip-list" in output
    assert "observes (flatten), which no calibrated observer observed alone" in output
