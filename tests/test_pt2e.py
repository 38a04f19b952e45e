"""engine=pt2e: torch.export + torchao's PT2E flow behind the same config. The digits default end to end
(the .pt2 file reloaded in a fresh process by the export stage and compared), what pt2e refuses at start-up,
skip-lists at prepare time, and the calibration cache key per engine; the ResNet-18-shaped net end to end
with every exported file (.pt2, AOTInductor package, ONNX) reloaded in a fresh process and compared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cache import cache_key
from pipeline.engine.pt2e_quantizers import torchao_available
from pipeline.errors import ConfigError
from pipeline.validation import validate
from tests.conftest import compose_config, to_spec

pytestmark = pytest.mark.skipif(
    not torchao_available(), reason="torchao is not installed (the [pt2e] extra: pip install --no-deps torchao==0.18.0)"
)

# Quick: no AOTInductor package (about 15 s to build on 2 cores), no ONNX; the .pt2 is written and reloaded.
QUICK = ["engine=pt2e", "tracking=off", "export.aot_inductor=false", "export.onnx=false"]


def _metrics(run_dir) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_digits_default_runs_end_to_end_on_pt2e_x86_and_the_pt2_file_reloads(run_pipeline) -> None:
    spec, _, run_dir = run_pipeline([*QUICK, "backend=x86", "export.onnx=true"])
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
    # diagnose is skipped on pt2e, with the reason, and the run goes on.
    assert "pt2e" in (run_dir / "diagnose" / "diagnosis.txt").read_text()


# A deployment's loader: plain torch (no torchao, no pipeline) or onnxruntime, in a new process. Prints
# whether torchao got imported, so a test sees the file did not need it.
_FRESH_PROCESS = """
import sys, torch
path, inputs, result = sys.argv[1:]
args = torch.load(inputs)
if path.endswith(".onnx"):
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {entry.name: value.numpy() for entry, value in zip(session.get_inputs(), args)}
    outputs = torch.from_numpy(session.run(None, feed)[0])
else:
    import torch.ao.quantization.fx._decomposed  # the quantized_decomposed ops a q/dq program calls
    if path.endswith(".aoti.pt2"):
        module = torch._inductor.aoti_load_package(path)
    else:
        module = torch.export.load(path).module()
    with torch.no_grad():
        outputs = module(*args)
torch.save(outputs, result)
print("torchao imported" if "torchao" in sys.modules else "plain torch")
"""


def run_in_fresh_process(path: Path, args: tuple[torch.Tensor, ...], work: Path) -> torch.Tensor:
    """`path` (.pt2, .aoti.pt2 or .onnx) loaded in a new Python process with plain torch (or onnxruntime) and
    run on `args`; its outputs."""
    inputs, result = work / f"{path.name}.inputs.pt", work / f"{path.name}.outputs.pt"
    torch.save(args, inputs)
    command = [sys.executable, "-c", _FRESH_PROCESS, str(path), str(inputs), str(result)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "plain torch"
    return torch.load(result)


def qdq_program(state) -> torch.nn.Module:
    """The run's q/dq program (what every exported file is compared with)."""
    from pipeline.engine import pt2e

    return pt2e.program_of(state.artifacts["lowered"].model)


@pytest.mark.slow
def test_pt2_file_loads_with_plain_torch_in_a_fresh_process(run_pipeline, tmp_path) -> None:
    _, state, run_dir = run_pipeline(
        [*QUICK, "evaluate.latency.enabled=false", "stages=[load,calibrate,reference_convert,lower,export]"]
    )
    path, program = run_dir / "export" / "qdq_x86.pt2", qdq_program(state)
    for batch in (5, 1):  # any batch size
        x = torch.rand(batch, 1, 8, 8)
        with torch.no_grad():
            assert torch.equal(run_in_fresh_process(path, (x,), tmp_path), program(x))


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
    assert torch.equal(run_in_fresh_process(export / "qdq_x86.pt2", args, tmp_path), expected)
    for name in ("compiled_x86_b4.aoti.pt2", "qdq_x86.onnx"):  # other kernels: close, not equal
        actual = run_in_fresh_process(export / name, args, tmp_path)
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
    _, _, run_dir = run_pipeline([*QUICK, "skip=first_last", "evaluate.latency.enabled=false", "export.onnx=false"])
    left = json.loads((run_dir / "reference_convert" / "left_float.json").read_text())
    assert any(entry.startswith("stem.0") for entry in left) and any(entry.startswith("fc") for entry in left)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["backend=fbgemm"], r"backend=fbgemm with engine=pt2e: pt2e has no fbgemm quantizer.*backend=x86"),
        (["backend=onednn"], r"backend=onednn with engine=pt2e"),
        (["skip=add"], r"skip.object_type\[0\]='operator.add' with engine=pt2e.*fuses add into the conv"),
        (["qconfig_mapping=histogram_per_channel"], r"with engine=pt2e: a pt2e Quantizer takes its own"),
        (["experiment=custom_module"], r"custom_config=.* with engine=pt2e: custom modules"),
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


def test_cache_key_says_which_engine_and_holds_the_skip_list_only_for_pt2e() -> None:
    from stages.load import load

    def key(*overrides: str) -> str:
        spec = to_spec(compose_config(list(overrides)))
        loaded = load(spec.model, spec.data, spec.seed)
        return cache_key(spec, loaded.model, [x for x, _ in loaded.data.calibration])

    fx, pt2e = key("engine=fx"), key("engine=pt2e")
    assert fx != pt2e
    assert key("engine=fx", "skip=first_last") == fx  # FX skips at convert time: one calibration serves all
    assert key("engine=pt2e", "skip=first_last") != pt2e  # pt2e skips at prepare time


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
