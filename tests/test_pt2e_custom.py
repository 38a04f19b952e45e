"""engine=pt2e with custom_config: every block of a class custom_config names stays float as one
`ptq_pipeline::<class>` torch.library.custom_op node (pipeline/engine/pt2e_custom.py); the experiment=custom_module
example end to end against FX, and its .pt2 reloaded in a fresh process through the saved op registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.batch import ModelInputs
from pipeline.engine.pt2e_quantizers import torchao_available
from pipeline.errors import ConfigError
from pipeline.measure import sqnr_db
from pipeline.schema import CustomConfigSpec
from pipeline.validation import validate
from stages.sources.custom_block import CustomBlockCNN
from tests.conftest import REPO_ROOT, compose_config, to_spec

pytestmark = pytest.mark.skipif(
    not torchao_available(), reason="torchao is not installed (the [pt2e] extra: pip install --no-deps torchao==0.18.0)"
)

OP = "ptq_pipeline.peak_limiter.default"


def _custom_ops(program: nn.Module) -> list[torch.fx.Node]:
    return [node for node in program.graph.nodes if str(node.target).startswith("ptq_pipeline.")]


def _spec(overrides: list[str] | None = None):
    return to_spec(compose_config(["engine=pt2e", "backend=x86", "experiment=custom_module", *(overrides or [])]))


def _prepared(model: nn.Module, example: torch.Tensor, custom: CustomConfigSpec) -> nn.Module:
    from pipeline.engine import get_engine

    spec = _spec()
    return get_engine(spec.engine).prepare(model, ModelInputs((example,)), spec.backend, spec.qconfig_mapping, custom)


def test_the_custom_module_example_validates_on_pt2e() -> None:
    validate(_spec())  # refused before: custom modules were FX only


def test_a_custom_block_is_one_float_custom_op_node_with_its_weights_lifted() -> None:
    """The data-dependent PeakLimiter, which torch.export cannot capture, becomes one op node: its conv weight
    reaches it as a program tensor (not baked into the op, not quantized), nothing of it is observed, the
    rest of the model is int8, and the dynamic batch survives (the fake function follows the input's batch)."""
    from pipeline.engine.pt2e import convert, node_kinds

    torch.manual_seed(0)
    model = CustomBlockCNN().eval()
    batches = [torch.randn(8, 1, 8, 8) * 2 for _ in range(4)]
    prepared = _prepared(model, batches[0], _spec().custom_config)
    (node,) = _custom_ops(prepared)
    assert str(node.target) == OP
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    converted = convert(prepared)
    (node,) = _custom_ops(converted)
    params = node.args[1]
    assert [p.op for p in params] == ["get_attr", "get_attr"]
    assert [str(p.target) for p in params] == ["limiter.module.conv.weight", "limiter.module.conv.bias"]
    assert torch.equal(converted.get_submodule("limiter.module.conv").weight, model.limiter.conv.weight)
    assert node_kinds(converted)[node.name] == "float"
    assert not any("quantize" in str(arg.target) for arg in node.all_input_nodes)  # float in: not observed
    kinds = list(node_kinds(converted).values())
    assert kinds.count("quantized") >= 3 and kinds.count("quantize_dequantize") > 0  # stem, widen, fc int8
    x = torch.randn(5, 1, 8, 8) * 3  # another batch size than the export example's
    with torch.no_grad():
        float_out, int8_out = model(x), converted(x)
    assert int8_out.shape == (5, 10)
    assert sqnr_db(float_out, int8_out) > 20


class PairBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x), x


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = PairBlock()
        self.fc = nn.Linear(3 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(x)
        return self.fc(torch.cat([a, b], 1).flatten(1))


def test_a_block_a_custom_op_cannot_carry_is_refused_naming_the_config_and_the_block() -> None:
    custom = CustomConfigSpec(
        name="pairs", prepare={"non_traceable_module_class": ["tests.test_pt2e_custom.PairBlock"]}, convert={}
    )
    with pytest.raises(ConfigError) as error:
        _prepared(PairNet().eval(), torch.randn(2, 1, 4, 4), custom)
    message = str(error.value)
    assert "custom_config=pairs names block 'pair' (tests.test_pt2e_custom.PairBlock), which returns a tuple" in message
    assert "takes tensors positionally and returns one tensor" in message and "engine=fx" in message


def test_a_block_that_breaks_the_recorded_shape_rule_says_so() -> None:
    """A block that cannot run on meta tensors gets the output shape recorded on the example (only the batch
    may vary); an input of another spatial size is refused by the op with the reason, not a wrong shape."""
    from pipeline.engine import pt2e_custom

    torch.manual_seed(0)
    model = CustomBlockCNN().eval()
    names = pt2e_custom.block_names(model, (type(model.limiter),), [])
    pt2e_custom.wrap_blocks(model, names, lambda m: m(torch.randn(2, 1, 8, 8)))
    with torch.no_grad():
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
        with pytest.raises(RuntimeError, match=r"only the batch dimension may vary"):
            model(torch.randn(3, 1, 6, 6))


_RELOAD = """
import sys, torch
from pipeline.engine.pt2e_custom import load_custom_ops
registry, program, inputs, result = sys.argv[1:]
assert load_custom_ops(registry) == ["ptq_pipeline::peak_limiter"]
with torch.no_grad():
    torch.save(torch.export.load(program).module()(torch.load(inputs)), result)
"""


@pytest.mark.slow
def test_custom_block_on_pt2e_stays_float_within_a_point_of_fx_and_its_pt2_reloads_via_the_registry(
    run_pipeline, tmp_path: Path
) -> None:
    from pipeline.engine.pt2e import program_of

    quick = ["tracking=off", "evaluate.latency.enabled=false", "experiment=custom_module", "backend=x86"]
    fx_stages = ["stages=[load,calibrate,reference_convert,evaluate]", "evaluate.models=[reference]"]
    _, _, fx_dir = run_pipeline([*quick, "engine=fx", *fx_stages])
    fx_accuracy = json.loads((fx_dir / "metrics.json").read_text())["eval/reference/accuracy"]
    pt2e = ["engine=pt2e", "diagnose.enabled=false", "export.aot_inductor=false", "export.onnx=true"]
    pt2e.append("evaluate.models=[float,reference,lowered]")  # the q/dq program's figures are compared
    _, state, run_dir = run_pipeline([*quick, *pt2e])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Measured (x86, this example): FX 0.9733 / 34.3 dB (the block int8 through its quantized class), pt2e
    # 0.9711 / 38.6 dB (the block float), float 0.9711.
    assert abs(metrics["eval/reference/accuracy"] - fx_accuracy) <= 0.01
    assert metrics["eval/lowered/accuracy"] == metrics["eval/reference/accuracy"]
    assert metrics["eval/reference/sqnr_db"] > 30
    program = program_of(state.artifacts["lowered"].model)
    assert [str(node.target) for node in _custom_ops(program)] == [OP]
    assert metrics["nodes/float"] >= 1 and metrics["nodes/quantized"] >= 3
    export = run_dir / "export"
    registry, saved = export / "qdq_x86.custom_ops.pt", export / "qdq_x86.pt2"
    assert registry.is_file() and metrics["export/custom_ops/bytes"] == registry.stat().st_size
    assert metrics["export/pt2/disagrees"] == 0.0 and metrics["export/pt2/max_abs_diff"] == 0.0
    skipped = json.loads((export / "skipped.json").read_text())
    assert "ptq_pipeline::peak_limiter" in skipped["onnx"] and "cannot translate" in skipped["onnx"]
    assert not list(export.glob("*.onnx"))
    # A fresh process (no pipeline state): the registry re-registers the op, then the .pt2 loads and runs,
    # at a batch size the export never saw, equal to the in-process q/dq program.
    x = torch.cat([inputs.args[0] for inputs, _ in state.artifacts["loaded"].data.evaluation[:2]])[:37]
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    args = [str(registry), str(saved), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    done = subprocess.run(
        [sys.executable, "-c", _RELOAD, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        expected = program(x)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


class Halve(nn.Module):
    """A block that runs on meta tensors: its fake function runs it (no recorded shape needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.register_buffer("gain", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.gain


class HalveNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.halver = Halve()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.halver(torch.relu(self.stem(x))).flatten(1))


def test_a_block_that_runs_on_meta_gets_its_shapes_from_running_it_and_buffers_travel_as_params() -> None:
    from pipeline.engine import pt2e_custom
    from pipeline.engine.pt2e import convert

    torch.manual_seed(0)
    model = HalveNet().eval()
    custom = CustomConfigSpec(name="halves", prepare={"non_traceable_module_name": ["halver"]}, convert={})
    prepared = _prepared(model, torch.randn(4, 1, 8, 8), custom)
    (node,) = _custom_ops(prepared)
    assert str(node.target) == "ptq_pipeline.halve.default"
    instance = pt2e_custom._OPS["ptq_pipeline::halve"].instances[node.args[2]]
    assert instance.meta_ok and instance.out_shape == (4, 3, 4, 4)
    with torch.no_grad():
        prepared(torch.randn(16, 1, 8, 8))
        converted = convert(prepared)
        (node,) = _custom_ops(converted)
        lifted = [str(p.target) for p in node.args[1]]
        assert lifted == ["halver.module.conv.weight", "halver.module.conv.bias", "halver.module.gain"]
        x = torch.randn(3, 1, 8, 8)
        assert sqnr_db(model(x), converted(x)) > 25
