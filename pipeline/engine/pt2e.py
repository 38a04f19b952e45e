"""The PT2E engine: torch.export, torchao's prepare_pt2e / convert_pt2e with a Quantizer, and torch.compile
(inductor, freezing) of the quantize-dequantize program as the lowered form. With pt2e_quantizers.py (the
Quantizer and its checks), the only module importing torchao; `Pt2eEngine` is its `Engine` (engine/base.py).

What differs from FX, and why (measured with torch 2.13.0 and torchao 0.18.0, see issue 16):
- torch.export captures the model with a batch of at least 2 and a dynamic batch `Dim`: the project's
  batch-1 example specializes the batch (calibration at 32 then fails `x.size()[0] == 1`), and a dynamic Dim
  with a batch-1 example fails too. The example is repeated to 2 samples.
- A Quantizer has no convert-time mapping: skip-lists apply at prepare time (`set_module_name_qconfig(name,
  None)`, `set_module_type_qconfig(type, None)`), so pipeline/engine/steps.prepare folds the skip-list into the
  prepare-time mapping for this engine. Observer state is keyed by the graph nodes each observer observes, so
  the model calibrated without the skip-list can fill a skip-list's model (stages/calibrate.py) when every one
  of its observers observed exactly what one of the model without it did.
- What a Quantizer cannot express is refused at start-up with the reason (`check`): call-order entries,
  qconfig names of the FX library, op types the quantizer has no entry for (x86 fuses `add` into the conv
  before it, so there is no add to leave float). Custom modules (custom_config's float classes) stay float as
  one `torch.library.custom_op` node each (pt2e_custom.py): torch.export cannot capture a block FX could not
  trace either, and a Quantizer has no observed / quantized classes.
- The compiled model (torch.compile of the q/dq program, pt2e_compiled.py) is checked against the q/dq
  program on the first call at every input shape: a compiled artifact was seen to give wrong outputs (issue
  16, AOTInductor with freezing and a dynamic batch on the digits net).
- Per-layer numerics (diagnose) come from torchao's numeric debugger, node by node against the calibrated
  prepared model: cumulative figures only (`node_numerics`).
"""

from __future__ import annotations

import copy
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

import pipeline.engine.pt2e_custom as pt2e_custom
from pipeline.batch import ModelInputs
from pipeline.engine.base import MissingObserverSource, ReferenceConversion, UntraceableModule
from pipeline.engine.numerics import LayerDiagnostics, LoggedOutput, Power, as_batches, first_tensor
from pipeline.engine.pt2e_compiled import Pt2eConvertState, lower, program_of
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
    custom: CustomConfigSpec | None = None,
) -> GraphModule:
    _, quantize_pt2e, _ = torchao_module()
    example = export_example(example_inputs)
    float_model = copy.deepcopy(model).eval()
    quantizer = build_quantizer(float_model, backend, mapping, engine, bits)
    blocks = pt2e_custom.custom_block_names(float_model, custom) if custom is not None else []
    if blocks:
        ops = pt2e_custom.wrap_blocks(float_model, blocks, example.call, f"custom_config={custom.name}")
        log.info("engine=pt2e: custom blocks kept float as custom ops: %s", ops)
    exported = export_program(float_model, example).module()
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


@dataclass
class ObservedTensors:
    """One observer of a prepared program: its (first) module name and the graph nodes whose outputs it
    observes, in graph order. x86 shares one observer across relu -> avgpool -> flatten: one module called
    three times under three names, so one entry observing three nodes."""

    name: str
    module: nn.Module
    nodes: list[str]

    @property
    def key(self) -> str:
        # Export names the float graph's nodes the same way for every skip-list (same model, same export);
        # node names are identifiers, so '+' and '.' cannot occur in them.
        return "+".join(self.nodes)


def observed_tensors(prepared: nn.Module) -> list[ObservedTensors]:
    """Every observer the program calls, once each, in graph order (an observer never called is left out:
    convert_pt2e reads only the ones the graph calls)."""
    pt2e, _, _ = torchao_module()
    kinds = (pt2e.ObserverBase, pt2e.FakeQuantizeBase)
    modules = dict(prepared.named_modules(remove_duplicate=False))
    found: dict[int, ObservedTensors] = {}
    for node in prepared.graph.nodes:  # type: ignore[union-attr]
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, kinds):
            entry = found.setdefault(id(module), ObservedTensors(str(node.target), module, []))
            entry.nodes.append(node.args[0].name)
    return list(found.values())


def observer_kind(module: nn.Module) -> str:
    """What must agree for one observer's state to stand for another's: the class and its quantization range."""
    settings = ("dtype", "qscheme", "quant_min", "quant_max", "ch_axis", "reduce_range", "bins")
    return f"{type(module).__name__}({', '.join(f'{s}={getattr(module, s)}' for s in settings if hasattr(module, s))})"


def observer_state(prepared: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Every observer's buffers keyed by the tensors it observes (`relu_5+adaptive_avg_pool2d+flatten.min_val`),
    not by its module name, which shifts between skip-lists (activation_post_process_13 is another tensor's
    observer once a layer stays float). `_metadata` keeps each observer's state_dict version, its kind and
    module name: without the version torchao's observers take the state for an old checkpoint and reset eps
    (2**-12 -> 1.19e-7), and loaded outputs differ."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    metadata: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for observer in observed_tensors(prepared):
        own = observer.module.state_dict()
        state.update((f"{observer.key}.{buffer}", value) for buffer, value in own.items())
        version = getattr(own, "_metadata", {}).get("", {})
        metadata[observer.key] = {**version, "observer": observer_kind(observer.module), "module": observer.name}
    state._metadata = metadata  # type: ignore[attr-defined]
    return state


_OWN_METADATA = ("observer", "module")  # what observer_state adds to each module's state_dict metadata


def missing_observer_sources(prepared: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """One line per observer of `prepared` that `state` has no source for: no saved observer observed exactly
    the same tensors, or it was of another kind. Empty when every observer can be filled from `state`."""
    saved: dict[str, dict[str, Any]] | None = getattr(state, "_metadata", None)
    if saved is None:
        raise ValueError("the observer state has no _metadata (saved by another version of the pipeline)")
    lines = []
    for observer in observed_tensors(prepared):
        tensors = ", ".join(observer.nodes)
        source = saved.get(observer.key)
        if source is None:
            overlapping = [
                f"{meta.get('module')} observed ({key.replace('+', ', ')})"
                for key, meta in saved.items()
                if set(key.split("+")) & set(observer.nodes)
            ]
            lines.append(
                f"{observer.name} observes ({tensors}), which no calibrated observer observed alone"
                + (f" (there, {'; '.join(overlapping)})" if overlapping else "")
            )
        elif source.get("observer") != observer_kind(observer.module):
            lines.append(
                f"{observer.name} observes ({tensors}) as {observer_kind(observer.module)}, the calibrated "
                f"observer was {source.get('observer')}"
            )
    return lines


def load_observer_state(prepared: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Fill every observer of `prepared` from `state` (observer_state's output) by the tensors it observes.
    `state` may hold more observers than `prepared` (the model calibrated without the skip-list serving one
    with it); MissingObserverSource when an observer of `prepared` has no source."""
    missing = missing_observer_sources(prepared, state)
    if missing:
        raise MissingObserverSource(missing)
    saved: dict[str, dict[str, Any]] = state._metadata  # type: ignore[attr-defined]
    for observer in observed_tensors(prepared):
        prefix = f"{observer.key}."
        own: OrderedDict[str, torch.Tensor] = OrderedDict(
            (key[len(prefix) :], value) for key, value in state.items() if key.startswith(prefix)
        )
        version = {k: v for k, v in saved[observer.key].items() if k not in _OWN_METADATA}
        own._metadata = OrderedDict({"": version})  # type: ignore[attr-defined]
        observer.module.load_state_dict(own)  # strict: every buffer of the observer, nothing else


def _is_glue(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and "quantize" in str(node.target)


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


_WEIGHTED = ("aten.conv", "aten.linear", "aten.matmul", "aten.addmm")


def _int8_weight(node: torch.fx.Node) -> bool | None:
    """For a conv / linear node: whether a dequantize feeds its weight (None: not a conv / linear)."""
    if node.op != "call_function" or not str(node.target).startswith(_WEIGHTED):
        return None
    weight = node.args[1] if len(node.args) > 1 else None
    return isinstance(weight, torch.fx.Node) and _is_glue(weight)


def float_weighted_ops(program: GraphModule) -> list[str]:
    """conv / linear nodes of a converted program whose weight no dequantize feeds: they run in float (their
    input may still pass a quantize/dequantize pair: the quantizer shares the observer of the op before)."""
    return [f"{_module_path(n) or n.name} ({n.name})" for n in program.graph.nodes if _int8_weight(n) is False]


def convert(prepared: GraphModule) -> GraphModule:
    """convert_pt2e on a copy, in eval mode (`.eval()` raises on exported models)."""
    pt2e, quantize_pt2e, _ = torchao_module()
    with quiet_import():
        converted = quantize_pt2e.convert_pt2e(copy.deepcopy(prepared))
    pt2e.move_exported_model_to_eval(converted)
    return converted


def node_kinds(model: nn.Module) -> dict[str, str]:
    """Each compute node of the q/dq program: quantized (an op a dequantize feeds), float, or
    quantize_dequantize glue."""
    kinds: dict[str, str] = {}
    for node in program_of(model).graph.nodes:
        if node.op != "call_function" or "getitem" in str(node.target):
            continue
        if _is_glue(node):
            kinds[node.name] = "quantize_dequantize"
        elif str(node.target).startswith(f"{pt2e_custom.NAMESPACE}."):
            kinds[node.name] = "float"  # a custom block: float inside, whatever feeds it
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
# Per-node numerics (diagnose)


def _op_name(node: torch.fx.Node) -> str:
    """`aten.conv2d.default` -> `conv2d`."""
    return str(node.target).split(".")[1] if str(node.target).startswith("aten.") else node.name


def node_numerics(
    prepared: GraphModule, program: GraphModule, inputs: ModelInputs | Iterable[ModelInputs]
) -> tuple[list[LayerDiagnostics], list[LoggedOutput]]:
    """torchao's numeric debugger: every node's output in the q/dq program against the same node (by its
    torch.export origin) of the calibrated prepared model. The prepared model is the reference, not the float
    one: prepare_pt2e folds batch norm into the convs, so against the float model a conv differs by the fold,
    not by quantization (issue 16: -1 to 8 dB per conv, against 37-44 dB). The figures are cumulative (a
    node's output carries every earlier node's error); own, weight and kernel SQNR are not measured. The
    debugger runs copies, whose observers pass values through: the calibration learns nothing here.
    `inputs`: one batch or batches, compared batch by batch (the loggers emptied after each) with signal and
    noise power summed per node. Layers: the conv/linear nodes whose weight is int8, worst first."""
    pt2e, _, _ = torchao_module()
    reference = pt2e.prepare_for_propagation_comparison(prepared)
    actual = pt2e.prepare_for_propagation_comparison(program)
    powers: dict[Any, tuple[str, Power]] = {}  # graph order (of the first batch)
    for batch in map(ModelInputs.wrap, as_batches(inputs)):
        with torch.no_grad():
            batch.call(reference)
            batch.call(actual)
        results = [pt2e.extract_results_from_loggers(model) for model in (reference, actual)]
        for info, summary in pt2e.compare_results(*results).items():
            found = [first_tensor(value) for value in (summary.results[0].ref, summary.results[0].actual)]
            if found[0] is not None and found[1] is not None and found[0].shape == found[1].shape:
                powers.setdefault(info, (info.name, Power()))[1].add(found[0], found[1])
        for model in (reference, actual):  # this batch's logged outputs, before the next batch's
            for logger in model.children():
                getattr(logger, "stats", []).clear()
    nodes = {node.name: node for node in program.graph.nodes}
    kinds = node_kinds(program)
    logged: list[LoggedOutput] = []
    layers: list[LayerDiagnostics] = []
    for node_name, power in powers.values():
        if (node := nodes.get(node_name)) is None:
            continue
        sqnr, name, op, weighted = power.db, _module_path(node) or node.name, _op_name(node), bool(_int8_weight(node))
        logged.append(LoggedOutput(node.name, name, op, sqnr, weighted, None, kinds.get(node.name) == "quantized"))
        if weighted:
            layers.append(LayerDiagnostics(name, op, sqnr, sqnr, None, None, None, True, cumulative_only=True))
    return sorted(layers, key=lambda layer: layer.own_sqnr_db), logged


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
        return prepare(model, example_inputs, backend, mapping, self.spec, bits, custom)

    def smooth_quant(
        self, model: nn.Module, batches: list[Any], alpha: float, custom: CustomConfigSpec
    ) -> tuple[nn.Module, dict[str, float]]:
        # SmoothQuant rescales the float model's weights before capture: the same transform as for FX.
        from pipeline.engine.fx import FxEngine

        return FxEngine().smooth_quant(model, batches, alpha, custom)

    def correct_bias(
        self, conversion: ReferenceConversion, prepared: nn.Module, batches: list[Any], samples: int, method: str
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
        return None  # no observed / quantized classes on pt2e: a custom block is one float custom op

    def clamp_bounded_activations(
        self, prepared: nn.Module, model: nn.Module, backend: BackendSpec, custom: CustomConfigSpec
    ) -> dict[str, tuple[float, float]]:
        return {}  # refused by check()

    def observer_state(self, prepared: nn.Module) -> dict[str, torch.Tensor]:
        return observer_state(prepared)

    def load_observer_state(self, prepared: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_observer_state(prepared, state)

    def missing_observer_sources(self, prepared: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
        return missing_observer_sources(prepared, state)

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
        return None  # torchao's numeric debugger, per node (a custom block is one float node)

    def layer_sensitivity(
        self,
        prepared: nn.Module,
        lowered: nn.Module,
        inputs: ModelInputs | Iterable[ModelInputs],
        engine: str,
        bounds: dict[str, tuple[float, float]] | None = None,
    ) -> list:
        raise ConfigError(
            "per-layer sensitivity (search) needs engine=fx: torchao's numeric debugger gives each node's "
            "cumulative SQNR, not a layer's own error on float inputs, which the search ranks by"
        )

    def module_numerics(
        self,
        prepared: nn.Module,
        lowered: nn.Module,
        inputs: ModelInputs | Iterable[ModelInputs],
        engine: str,
        reference: nn.Module | None = None,
        bounds: dict[str, tuple[float, float]] | None = None,
    ) -> tuple[list[LayerDiagnostics], list[LoggedOutput]]:
        """Cumulative per-node SQNR of the q/dq program (the compiled form is checked against it) against
        the calibrated prepared model: `node_numerics`. No bounded-activation clips on pt2e."""
        assert isinstance(prepared, GraphModule)
        return node_numerics(prepared, program_of(lowered), inputs)

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
