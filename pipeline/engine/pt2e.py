"""The PT2E engine: torch.export, torchao's prepare_pt2e / convert_pt2e with a Quantizer, and torch.compile
(inductor, freezing) of the quantize-dequantize program as the lowered form. With pt2e_quantizers.py (the
Quantizer and its checks), the only module importing torchao; `Pt2eEngine` is its `Engine` (engine/base.py).

What differs from FX, and why (measured with torch 2.13.0 and torchao 0.18.0, see issue 16):
- torch.export captures the model with a batch of at least 2 and a dynamic batch `Dim`: the project's
  batch-1 example specializes the batch (calibration at 32 then fails `x.size()[0] == 1`), and a dynamic Dim
  with a batch-1 example fails too. The example is repeated to 2 samples.
- A Quantizer has no convert-time mapping: skip-lists apply at prepare time (`set_module_name_qconfig(name,
  None)`, `set_module_type_qconfig(type, None)`), so pipeline/engine/steps.prepare folds the skip-list into the
  prepare-time mapping for this engine, and the calibration cache key holds the skip-list.
- What a Quantizer cannot express is refused at start-up with the reason (`check`): call-order entries,
  qconfig names of the FX library, op types the quantizer has no entry for (x86 fuses `add` into the conv
  before it, so there is no add to leave float), custom modules.
- The compiled model (torch.compile of the q/dq program) is checked against the q/dq program on the first
  call at every input shape: a compiled artifact was seen to give wrong outputs (issue 16, AOTInductor with
  freezing and a dynamic batch on the digits net).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from pipeline.batch import ModelInputs
from pipeline.engine.base import ReferenceConversion, UntraceableModule
from pipeline.engine.pt2e_quantizers import build_quantizer, check_specs, quiet_import, torchao_module
from pipeline.engine.qconfigs import import_path, resolve_import
from pipeline.errors import ConfigError, closest
from pipeline.schema import (
    BackendSpec,
    CustomConfigSpec,
    EngineSpec,
    QConfigMappingSpec,
    RecoverySpec,
    SkipSpec,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# prepare / observers / convert


@dataclass
class Pt2eOrigin:
    """What a prepared pt2e model keeps of the float model: names for skip checks, the export example."""

    module_names: list[str]
    module_types: set[Any]
    example: ModelInputs
    mapping: QConfigMappingSpec
    engine: EngineSpec = field(default_factory=EngineSpec)


def export_example(example_inputs: ModelInputs) -> ModelInputs:
    """The example torch.export captures with: at least 2 samples (batch 1 specializes the batch dim)."""
    return example_inputs.repeat_to(max(2, example_inputs.batch_size))


def export_program(model: nn.Module, example: ModelInputs) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension shared by every input."""
    batch = torch.export.Dim("batch")
    positional = example.positional(model)
    dynamic = tuple({0: batch} if isinstance(value, torch.Tensor) else None for value in positional)
    return torch.export.export(model, positional, dynamic_shapes=dynamic)


def prepare(
    model: nn.Module,
    example_inputs: ModelInputs,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    engine: EngineSpec,
    bits: int | None = None,
) -> GraphModule:
    _, quantize_pt2e, _ = torchao_module()
    example = export_example(example_inputs)
    float_model = copy.deepcopy(model).eval()
    exported = export_program(float_model, example).module()
    quantizer = build_quantizer(float_model, backend, mapping, engine, bits)
    with quiet_import():
        prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
    prepared.meta["pt2e_origin"] = Pt2eOrigin(
        [name for name, _ in model.named_modules() if name],
        {type(module) for module in model.modules()},
        example,
        mapping,
        engine,
    )
    return prepared


def _observers(prepared: nn.Module) -> dict[str, nn.Module]:
    pt2e, _, _ = torchao_module()
    kinds = (pt2e.ObserverBase, pt2e.FakeQuantizeBase)
    return {name: module for name, module in prepared.named_modules() if isinstance(module, kinds)}


def observer_state(prepared: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Every observer's buffers, with the state_dict's `_metadata` (module versions): without it torchao's
    observers take the state for an old checkpoint and reset eps (2**-12 -> 1.19e-7), and loaded outputs differ."""
    prefixes = tuple(f"{name}." for name in _observers(prepared))
    full = prepared.state_dict()
    state: OrderedDict[str, torch.Tensor] = OrderedDict((k, v) for k, v in full.items() if k.startswith(prefixes))
    state._metadata = copy.copy(getattr(full, "_metadata", OrderedDict()))  # type: ignore[attr-defined]
    return state


def load_observer_state(prepared: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = observer_state(prepared).keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"observer keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    prepared.load_state_dict(state, strict=False)


def _is_glue(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and "quantize" in str(node.target)


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


_WEIGHTED = ("aten.conv", "aten.linear", "aten.matmul", "aten.addmm")


def float_weighted_ops(program: GraphModule) -> list[str]:
    """conv / linear nodes of a converted program whose weight no dequantize feeds: they run in float (their
    input may still pass a quantize/dequantize pair: the quantizer shares the observer of the op before)."""
    found = []
    for node in program.graph.nodes:
        weighted = node.op == "call_function" and str(node.target).startswith(_WEIGHTED)
        weight = node.args[1] if weighted and len(node.args) > 1 else None
        if weighted and not (isinstance(weight, torch.fx.Node) and _is_glue(weight)):
            found.append(f"{_module_path(node) or node.name} ({node.name})")
    return found


def convert(prepared: GraphModule) -> GraphModule:
    """convert_pt2e on a copy, in eval mode (`.eval()` raises on exported models)."""
    pt2e, quantize_pt2e, _ = torchao_module()
    with quiet_import():
        converted = quantize_pt2e.convert_pt2e(copy.deepcopy(prepared))
    pt2e.move_exported_model_to_eval(converted)
    return converted


@dataclass
class Pt2eConvertState:
    """ReferenceConversion.engine_state of the pt2e engine: what the compiled form is checked with."""

    example: ModelInputs
    min_sqnr_db: float
    # Inductor turns x86 q/dq patterns into oneDNN int8 kernels, which need uint8 activations: the XNNPACK
    # quantizer's signed int8 activations fail there with or without freezing (quantized::packed_weights_conv2drelu,
    # aten::quantized_max_pool2d), and XNNPACK's own kernels run in ExecuTorch, not here. qnnpack: no compile.
    compile: bool = True


class CompiledMismatchError(RuntimeError):
    """A compiled form's outputs disagree with the q/dq program it was compiled from."""


class CompiledProgram(nn.Module):
    """torch.compile (inductor, freezing, static shapes) of a q/dq program: the pt2e "lowered" model. The
    first call at each input shape also runs the q/dq program and refuses (CompiledMismatchError) outputs
    below `min_sqnr_db` against it. Freezing is an inductor setting read while compiling, so every call
    runs under it."""

    def __init__(self, program: GraphModule, min_sqnr_db: float, compile: bool = True) -> None:
        super().__init__()
        self.program = program
        self.compile = compile
        self.min_sqnr_db = min_sqnr_db
        self.checked: dict[tuple, float] = {}
        # Not a submodule: the compiled wrapper shares the program's weights.
        self.__dict__["compiled"] = torch.compile(program, dynamic=False)

    @property
    def compiled_form(self) -> str:
        """The form's name in latency metrics; pipeline.measure times it as it is (no TorchScript forms)."""
        return "compiled" if self.compile else "qdq_eager"

    @property
    def code(self) -> str:
        return self.program.code

    def deployed_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors the q/dq program reads (what its .pt2 file carries): pipeline.measure.serialized_bytes
        sizes this, not state_dict(), which also holds the float weights convert_pt2e leaves on the module
        (the ResNet-18 shape measured 1.25x its float size that way, against 0.25x deployed)."""
        used = used_tensor_names(self.program)
        return {name: value for name, value in self.program.state_dict().items() if name in used}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            out = self.__dict__["compiled"](*args, **kwargs) if self.compile else self.program(*args, **kwargs)
        key = tuple(tuple(value.shape) for value in [*args, *kwargs.values()] if isinstance(value, torch.Tensor))
        if key not in self.checked:
            from pipeline.measure import sqnr_db

            with torch.no_grad():
                expected = self.program(*args, **kwargs)
            sqnr = sqnr_db(expected, out)
            if sqnr < self.min_sqnr_db:
                raise CompiledMismatchError(
                    f"torch.compile (inductor, freezing) of the pt2e q/dq program gives outputs {sqnr:.1f} dB from the "
                    f"q/dq program at input shapes {key} (engine.min_compiled_sqnr_db={self.min_sqnr_db:g}); the "
                    f"compiled form is refused. evaluate.models=[float,reference] evaluates the q/dq program alone."
                )
            self.checked[key] = sqnr
        return out


def lower(reference: GraphModule, state: Pt2eConvertState) -> CompiledProgram:
    if not state.compile:
        log.warning(
            "engine=pt2e, backend=qnnpack: inductor cannot compile the XNNPACK quantizer's signed int8 q/dq program "
            "(its kernels need uint8 activations) and XNNPACK's kernels run in ExecuTorch, so 'lowered' is the q/dq "
            "program run eagerly: its accuracy is what the XNNPACK kernels compute, its speed is not theirs."
        )
    compiled = CompiledProgram(reference, state.min_sqnr_db, state.compile)
    compiled(*state.example.positional(reference))  # compile now, at the example's shape, and check it
    return compiled


def program_of(model: nn.Module) -> GraphModule:
    """The q/dq program behind a pt2e model (the compiled wrapper's, or the model itself)."""
    return model.program if isinstance(model, CompiledProgram) else model  # type: ignore[return-value]


def node_kinds(model: nn.Module) -> dict[str, str]:
    """Each compute node of the q/dq program: quantized (an op a dequantize feeds), float, or
    quantize_dequantize glue."""
    kinds: dict[str, str] = {}
    for node in program_of(model).graph.nodes:
        if node.op != "call_function" or "getitem" in str(node.target):
            continue
        if _is_glue(node):
            kinds[node.name] = "quantize_dequantize"
        elif any(_is_glue(arg) for arg in node.all_input_nodes):
            kinds[node.name] = "quantized"
        else:
            kinds[node.name] = "float"
    return kinds


def count_nodes(model: nn.Module) -> dict[str, int]:
    """node_kinds counted: {'quantized': n, 'float': n, 'quantize_dequantize': n}."""
    counts = {"quantized": 0, "float": 0, "quantize_dequantize": 0}
    for kind in node_kinds(model).values():
        counts[kind] += 1
    return counts


def unmatched_skip_entries(prepared: GraphModule, skip: SkipSpec, prefix: str = "skip") -> list[str]:
    """Same lines as the FX engine's, against the float model's module names and types."""
    origin: Pt2eOrigin = prepared.meta["pt2e_origin"]
    names = origin.module_names
    type_paths = sorted(import_path(t) for t in origin.module_types)
    problems = []
    for i, path in enumerate(skip.object_type):
        if resolve_import(path, f"{prefix}.object_type[{i}]") not in origin.module_types:
            problems.append(
                f"{prefix}.object_type[{i}]='{path}' matches no op in the model.{closest(path, type_paths)}"
            )
    for i, name in enumerate(skip.module_name):
        if name not in names:
            problems.append(f"{prefix}.module_name[{i}]='{name}' is not a module of the model.{closest(name, names)}")
    for i, pattern in enumerate(skip.module_name_regex):
        if not any(re.match(pattern, name) for name in names):
            problems.append(
                f"{prefix}.module_name_regex[{i}]='{pattern}' matches no module name.{closest(pattern, names)}"
            )
    return problems


# --------------------------------------------------------------------------------------------------
# Deployable files


def used_tensor_names(program: GraphModule) -> set[str]:
    """The attributes the program's graph reads (get_attr targets): its int8 weights, scales, zero points and
    biases; convert_pt2e leaves the float weights on the module too, unread."""
    return {str(node.target) for node in program.graph.nodes if node.op == "get_attr"}


def save_program(program: GraphModule, example: ModelInputs, path: Any) -> None:
    """The q/dq program as a stripped `.pt2`: re-exported from the converted module (so only the weights it
    uses travel, not the float ones) with a dynamic batch, without its example inputs."""
    program = copy.deepcopy(program)
    used = used_tensor_names(program)
    # convert_pt2e leaves the float weights on the module; torch.export would lift every one of them.
    for name in [n for n, _ in [*program.named_parameters(), *program.named_buffers()] if n not in used]:
        owner, _, attribute = name.rpartition(".")
        delattr(program.get_submodule(owner), attribute)
    exported = export_program(program, example)
    with contextlib.suppress(AttributeError):
        exported._example_inputs = None  # type: ignore[attr-defined]
    torch.export.save(exported, str(path))


def save_aot_inductor(program: GraphModule, inputs: ModelInputs, path: Any) -> None:
    """An AOTInductor package of the q/dq program with a static batch (inputs' batch size) and freezing: it
    loads with plain torch (torch._inductor.aoti_load_package) and runs at that batch size only. A dynamic
    batch with freezing gave wrong outputs on the digits net (issue 16), so the batch is static."""
    import torch._inductor.config as inductor_config

    exported = torch.export.export(program, inputs.positional(program))
    with inductor_config.patch(freezing=True):
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path))


# --------------------------------------------------------------------------------------------------
# The Engine surface


class Pt2eEngine:
    """torch.export + torchao's PT2E quantization as an `Engine`."""

    name = "pt2e"
    skips_at_prepare = True  # steps.prepare folds the skip-list into the prepare-time mapping

    def __init__(self, spec: EngineSpec | None = None) -> None:
        self.spec = spec or EngineSpec(name="pt2e")

    def check(
        self, backend: BackendSpec, mapping: QConfigMappingSpec, skip: SkipSpec, custom: CustomConfigSpec
    ) -> None:
        check_specs(backend, mapping, skip, custom)

    def prepare(
        self,
        model: nn.Module,
        example_inputs: ModelInputs,
        backend: BackendSpec,
        mapping: QConfigMappingSpec,
        custom: CustomConfigSpec,
        recovery_spec: RecoverySpec | None = None,
    ) -> GraphModule:
        import pipeline.engine.recovery as recovery

        bits = recovery.activation_bits(recovery_spec, backend.engine) if recovery_spec is not None else None
        return prepare(model, example_inputs, backend, mapping, self.spec, bits)

    def smooth_quant(
        self, model: nn.Module, batches: list[Any], alpha: float, custom: CustomConfigSpec
    ) -> tuple[nn.Module, dict[str, float]]:
        # SmoothQuant rescales the float model's weights before capture: the same transform as for FX.
        from pipeline.engine.fx import FxEngine

        return FxEngine().smooth_quant(model, batches, alpha, custom)

    def correct_bias(
        self, conversion: ReferenceConversion, prepared: nn.Module, batches: list[Any], samples: int
    ) -> dict[str, float]:
        log.info(
            "recovery.bias_correction: not applied on engine=pt2e (it edits the biases of FX's reference modules; "
            "a q/dq program's conv bias is a graph constant)"
        )
        return {}

    def untraceable_module(self, error: BaseException) -> UntraceableModule | None:
        return None  # torch.export's own error names the line it could not capture

    def check_custom_modules(
        self, prepared: nn.Module, example_inputs: ModelInputs, custom: CustomConfigSpec, engine: str
    ) -> None:
        return None  # custom modules are refused by check()

    def clamp_bounded_activations(
        self, prepared: nn.Module, model: nn.Module, backend: BackendSpec, custom: CustomConfigSpec
    ) -> dict[str, tuple[float, float]]:
        return {}  # refused by check()

    def observer_state(self, prepared: nn.Module) -> dict[str, torch.Tensor]:
        return observer_state(prepared)

    def load_observer_state(self, prepared: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_observer_state(prepared, state)

    def convert_reference(
        self,
        prepared: nn.Module,
        backend: BackendSpec,
        mapping: QConfigMappingSpec,
        skip: SkipSpec,
        custom: CustomConfigSpec,
    ) -> ReferenceConversion:
        assert isinstance(prepared, GraphModule)
        origin: Pt2eOrigin = prepared.meta["pt2e_origin"]
        converted = convert(prepared)
        state = Pt2eConvertState(origin.example, self.spec.min_compiled_sqnr_db, compile=backend.engine == "x86")
        return ReferenceConversion(converted, state, float_weighted_ops(converted))

    def lower(self, reference: nn.Module, engine_state: object, engine: str) -> nn.Module:
        if not isinstance(reference, GraphModule) or not isinstance(engine_state, Pt2eConvertState):
            raise TypeError(f"the pt2e engine lowers its own conversions, not {type(engine_state).__name__}")
        return lower(reference, engine_state)

    def count_nodes(self, model: nn.Module, example_inputs: ModelInputs, engine: str) -> dict[str, int]:
        return count_nodes(model)

    def node_kinds(self, model: nn.Module, example_inputs: ModelInputs, engine: str) -> dict[str, str]:
        return node_kinds(model)

    def numerics_blocker(self, custom: CustomConfigSpec) -> str | None:
        return (
            "engine=pt2e: the per-layer report compares same-named modules of FX GraphModules by forward hooks; "
            "a pt2e program has no modules to hook (torchao's numeric debugger, per-node, is not wired in yet)"
        )

    def layer_sensitivity(
        self,
        prepared: nn.Module,
        lowered: nn.Module,
        inputs: ModelInputs,
        engine: str,
        bounds: dict[str, tuple[float, float]] | None = None,
    ) -> list:
        raise ConfigError(
            "per-layer sensitivity (search) needs engine=fx; " + (self.numerics_blocker(CustomConfigSpec()) or "")
        )

    def module_numerics(
        self,
        prepared: nn.Module,
        lowered: nn.Module,
        inputs: ModelInputs,
        engine: str,
        reference: nn.Module | None = None,
        bounds: dict[str, tuple[float, float]] | None = None,
    ) -> tuple:
        raise ConfigError(self.numerics_blocker(CustomConfigSpec()) or "")

    def bounded_producers(self, model: nn.Module, custom: CustomConfigSpec) -> dict[str, tuple[float, float]]:
        return {}

    def float_outputs(self, model: nn.Module, names: list[str], inputs: ModelInputs, engine: str) -> dict[str, bool]:
        return {}

    def observed_output_ranges(self, prepared: nn.Module, names: list[str]) -> dict[str, tuple[float, float]]:
        return {}

    def unmatched_skip_entries(self, prepared: nn.Module, skip: SkipSpec, prefix: str = "skip") -> list[str]:
        assert isinstance(prepared, GraphModule)
        return unmatched_skip_entries(prepared, skip, prefix)

    def model_nodes(self, prepared: nn.Module) -> list:
        raise ConfigError("inspect lists FX node names; run it with engine=fx (checks refuse it for pt2e)")

    def entry_matches(
        self, prepared: nn.Module, mapping: QConfigMappingSpec, skip: SkipSpec, backend: BackendSpec
    ) -> list:
        raise ConfigError("inspect lists FX node names; run it with engine=fx (checks refuse it for pt2e)")
