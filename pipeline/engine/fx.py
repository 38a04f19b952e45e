"""The FX engine: prepare_fx, the reference convert and the lowering pass; the observer state a
calibration cache saves and loads, node counts and which module FX could not trace are in
engine/fx_results.py. The only module of the project that imports torch.ao.quantization.quantize_fx;
`FxEngine` is its `Engine` (engine/base.py).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.config
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, ObserverBase, QConfigMapping
from torch.ao.quantization.fx.custom_config import ConvertCustomConfig, PrepareCustomConfig
from torch.ao.quantization.fx.lower_to_fbgemm import lower_to_fbgemm
from torch.ao.quantization.quantize_fx import (
    attach_preserved_attrs_to_model,
    convert_fx,
    convert_to_reference_fx,
    prepare_fx,
)
from torch.fx import GraphModule

import pipeline.engine.bias_correction as bias_correction
import pipeline.engine.custom_modules as custom_modules
import pipeline.engine.fx_results as fx_results
import pipeline.engine.introspect as introspect
import pipeline.engine.mappings as mappings
import pipeline.engine.numerics as numerics
import pipeline.engine.observers as observers
import pipeline.engine.recovery as recovery
from pipeline.batch import ModelInputs
from pipeline.engine.base import ReferenceConversion, UntraceableModule
from pipeline.engine.custom_modules import preserved_attributes
from pipeline.engine.mappings import convert_node_qconfigs
from pipeline.engine.qconfigs import get_backend_config, quantized_engine, resolve_import
from pipeline.schema import BackendSpec, CustomConfigSpec, QConfigMappingSpec, RecoverySpec, SkipSpec

# QuantizationTracer records each FX node's Python stack trace unless torch.fx.config says not to: a
# traceback per node and, the first time in a process, symbolizing them imports torch._inductor and
# torch.export (measured: 2.3 s + 1.0 s of imports inside the first prepare_fx, the "first calibrate in a
# fresh process" cost of issue 15). The traces only enrich debugging messages; set
# PIPELINE_FX_STACK_TRACES=1 to keep them.
if os.environ.get("PIPELINE_FX_STACK_TRACES", "") != "1":
    torch.fx.config.do_not_emit_stack_traces = True

# prepared.meta key: the activation bit width the prepare-time mapping was built with (None: the library's
# own), so every convert-time mapping of that model is built the same way (convert_fx compares them).
ACTIVATION_BITS_META = "pipeline_activation_bits"

# --------------------------------------------------------------------------------------------------
# prepare / reference-convert / lower


def prepare(
    model: nn.Module,
    mapping: QConfigMapping,
    example_inputs: ModelInputs,
    backend_config: Any,
    prepare_custom_config: PrepareCustomConfig,
) -> GraphModule:
    """prepare_fx on a deep copy, so the float model stays untouched for evaluation; shared stateless
    children then get their own copies (see unshare_stateless_modules). With integer or bool inputs, the
    observers prepare_fx put on integer values are removed (see drop_non_float_observers)."""
    prepared = prepare_fx(
        copy.deepcopy(model).eval(),
        mapping,
        example_inputs.positional(model),
        prepare_custom_config=prepare_custom_config,
        backend_config=backend_config,
    )
    unshare_stateless_modules(prepared)
    if example_inputs.integer_names():
        drop_non_float_observers(prepared, example_inputs)
    return prepared


def fused_model(model: nn.Module, prepare_custom_config: PrepareCustomConfig, backend_config: Any) -> GraphModule:
    """A copy of `model` traced and fused as prepare_fx does it (same tracer, same skipped modules), to see
    which fused modules (LinearReLU, ConvReLU2d ...) prepare will build."""
    from torch.ao.quantization.fx.tracer import QuantizationTracer
    from torch.ao.quantization.fx.utils import get_skipped_module_name_and_classes
    from torch.ao.quantization.quantize_fx import _fuse_fx

    copied = copy.deepcopy(model).eval()
    names, classes = get_skipped_module_name_and_classes(prepare_custom_config, False)
    graph_module = GraphModule(copied, QuantizationTracer(names, classes).trace(copied))  # type: ignore[arg-type]
    return _fuse_fx(graph_module, False, None, backend_config)


def drop_non_float_observers(prepared: GraphModule, example_inputs: ModelInputs) -> list[str]:
    """Remove the graph's observers that see integer or bool values (or no tensor at all: a traced
    Hugging Face encoder's `size()[:-2] + (all_head_size,)` is an operator.add on shape tuples, which the
    default mapping observes like a tensor add), and return their names.

    prepare_fx decides where observers go from the qconfigs alone, never from dtypes: an int64 token-id
    or mask input that feeds a quantizable op (unsqueeze, mul, a general tensor op sharing its input's
    observer) gets an input observer, which fails at calibration (`"histogram_cpu" not implemented for
    'Long'`) or, with min-max observers, makes convert quantize_per_tensor an integer tensor. Which values
    are integer is found by one run of the example inputs with every observer passing its input through
    untouched (no statistics recorded); an observer node on an integer value is then replaced by its input,
    so convert leaves that value, and the ops that only see it, float."""
    # Ops that share their input's observer (unsqueeze, reshape...) get the same observer object under
    # a second name: an observer module seen on an integer value marks every node that calls it.
    names: dict[int, list[str]] = {}
    observers: dict[int, nn.Module] = {}
    for name, module in prepared.named_modules(remove_duplicate=False):
        if isinstance(module, ObserverBase | FakeQuantizeBase):
            names.setdefault(id(module), []).append(name)
            observers[id(module)] = module
    non_float: set[str] = set()
    patched: list[nn.Module] = []

    def passthrough(module_names: list[str]) -> Any:
        def forward(value: Any) -> Any:
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                non_float.update(module_names)
            return value

        return forward

    try:
        for key, module in observers.items():
            module.forward = passthrough(names[key])  # type: ignore[method-assign]
            patched.append(module)
        with torch.no_grad():
            example_inputs.call(prepared)
    finally:
        for module in patched:
            del module.forward
    removed = []
    for node in list(prepared.graph.nodes):
        if node.op == "call_module" and node.target in non_float:
            node.replace_all_uses_with(node.args[0])
            prepared.graph.erase_node(node)
            removed.append(str(node.target))
    if removed:
        prepared.graph.lint()
        prepared.delete_all_unused_submodules()
        prepared.recompile()
    return removed


def unshare_stateless_modules(model: nn.Module) -> list[str]:
    """Give every module object reachable under several names (torchvision's BasicBlock calls self.relu
    twice; after fusion that ReLU sits inside a fused ConvReLU2d and at its own path) its own copy at
    each extra name, and return those names. Re-tracing (the numeric suite, pickling) names a module by
    its first path only, which renames nodes and breaks lowering and the numeric suite with KeyErrors.
    Only modules without parameters or buffers are copied, so the state_dict (and the calibration
    cache) is unchanged; a shared module with state is left as it is."""
    first_path: dict[int, str] = {}
    copied = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) not in first_path:
            first_path[id(module)] = name
            continue
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            continue
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, copy.deepcopy(module))
        copied.append(name)
    return copied


@dataclass
class FxConvertState:
    """What lowering needs from the reference convert: convert_fx computes these two maps internally
    and drops them with the metadata. ReferenceConversion.engine_state of the FX engine."""

    node_name_to_qconfig: dict[str, Any]
    node_name_to_scope: dict[str, tuple[str, type]]


def convert_reference(
    prepared: GraphModule,
    convert_mapping: QConfigMapping,
    backend_config: Any,
    convert_custom_config: ConvertCustomConfig,
) -> ReferenceConversion:
    """convert_to_reference_fx on a deep copy (a prepared model converts once, and every caller reuses its
    calibrated model: bias correction, diagnose, the search's trials), keeping the two maps the lowering
    pass needs: convert_fx computes them internally and drops them with the metadata.

    convert_fx given a convert-time mapping deep-copies every module to compute the per-node qconfigs
    (the computation sets each module's `qconfig`) and checks them against prepare's; we need those
    qconfigs anyway, so they are computed here once, on the copy with its modules' `qconfig` restored
    afterwards, checked as convert_fx checks them, and handed to convert_to_reference_fx as the observed
    model's own (mappings.convert_node_qconfigs): one model copy per conversion instead of three, the same
    converted model."""
    prepared = copy.deepcopy(prepared)
    attrs = prepared.meta["_observed_graph_module_attrs"]
    node_name_to_scope = dict(attrs.node_name_to_scope)
    # The same computation convert() does before converting, on the copy's own modules.
    node_name_to_qconfig = convert_node_qconfigs(prepared, convert_mapping, attrs, node_name_to_scope)
    left_float = sorted(
        name
        for name, qconfig in attrs.node_name_to_qconfig.items()
        if qconfig is not None and node_name_to_qconfig.get(name) is None
    )
    attrs.node_name_to_qconfig = node_name_to_qconfig  # convert_fx's own choice when given the mapping
    reference = convert_to_reference_fx(
        prepared,
        convert_custom_config=convert_custom_config,
        qconfig_mapping=None,
        backend_config=backend_config,
    )
    return ReferenceConversion(reference, FxConvertState(node_name_to_qconfig, node_name_to_scope), left_float)


def lower(reference: GraphModule, state: FxConvertState, engine: str) -> GraphModule:
    """The lowering pass convert_fx runs after its reference conversion (shared by all four engines),
    applied to a copy of the reference model; packed weights are built for `engine`."""
    with quantized_engine(engine):
        lowered = lower_to_fbgemm(copy.deepcopy(reference), state.node_name_to_qconfig, state.node_name_to_scope)
        lowered.delete_all_unused_submodules()
    # The lowering rebuilds the GraphModule and drops preserved attributes; convert_fx re-attaches
    # them after it, and so do we.
    attach_preserved_attrs_to_model(lowered, preserved_attributes(reference))
    return lowered


def convert_in_one_step(
    prepared: GraphModule,
    convert_mapping: QConfigMapping,
    backend_config: Any,
    convert_custom_config: ConvertCustomConfig,
    engine: str,
) -> GraphModule:
    """torch's own convert_fx on a copy: the yardstick the two-stage reference+lower is tested against."""
    with quantized_engine(engine):
        return convert_fx(
            copy.deepcopy(prepared),
            convert_custom_config=convert_custom_config,
            qconfig_mapping=convert_mapping,
            backend_config=backend_config,
        )


# --------------------------------------------------------------------------------------------------
# The Engine surface over the functions above (configs in as specs, torch objects built here)


class FxEngine:
    """torch.ao's FX graph mode quantization as an `Engine`."""

    name = "fx"

    def check(
        self, backend: BackendSpec, mapping: QConfigMappingSpec, skip: SkipSpec, custom: CustomConfigSpec
    ) -> None:
        mappings.check_specs(backend, mapping, skip)
        custom_modules.check_custom_config(custom)

    def prepare(
        self,
        model: nn.Module,
        example_inputs: ModelInputs,
        backend: BackendSpec,
        mapping: QConfigMappingSpec,
        custom: CustomConfigSpec,
        recovery_spec: RecoverySpec | None = None,
    ) -> GraphModule:
        prepare_custom_config, _ = custom_modules.build_custom_configs(custom)
        bits = recovery.activation_bits(recovery_spec, backend.engine)
        backend_config = get_backend_config(backend.backend_config)
        qconfig_mapping = mappings.build_qconfig_mapping(mapping, backend)
        if mapping.object_type:  # torch needs one qconfig for every op type of a fused module
            explicit = {
                resolve_import(entry.object_type, "qconfig_mapping.object_type") for entry in mapping.object_type
            }
            fused = mappings.fused_op_types(fused_model(model, prepare_custom_config, backend_config))
            mappings.align_fusion_partners(qconfig_mapping, fused, explicit)
        if bits is not None:  # after the alignment, as convert_reference does it
            recovery.set_activation_bits(qconfig_mapping, bits)
        with quantized_engine(backend.engine):
            prepared = prepare(model, qconfig_mapping, example_inputs, backend_config, prepare_custom_config)
        prepared.meta[ACTIVATION_BITS_META] = bits
        return prepared

    def smooth_quant(
        self, model: nn.Module, batches: list[Any], alpha: float, custom: CustomConfigSpec
    ) -> tuple[nn.Module, dict[str, float]]:
        from torch.ao.quantization.fx.tracer import QuantizationTracer
        from torch.ao.quantization.fx.utils import get_skipped_module_name_and_classes

        prepare_custom_config, _ = custom_modules.build_custom_configs(custom)
        tracer = QuantizationTracer(*get_skipped_module_name_and_classes(prepare_custom_config, False))
        return recovery.smooth_quant(model, batches, alpha, tracer)

    def correct_bias(
        self, conversion: ReferenceConversion, prepared: nn.Module, batches: list[Any], samples: int, method: str
    ) -> dict[str, float]:
        return bias_correction.correct_bias(conversion.model, prepared, batches, samples, method)

    def untraceable_module(self, error: BaseException) -> UntraceableModule | None:
        return fx_results.untraceable_module(error)

    def clamp_bounded_activations(
        self, prepared: nn.Module, model: nn.Module, backend: BackendSpec, custom: CustomConfigSpec
    ) -> dict[str, tuple[float, float]]:
        prepare_custom_config, _ = custom_modules.build_custom_configs(custom)
        assert isinstance(prepared, GraphModule)
        return observers.clamp_bounded_activation_observers(prepared, model, prepare_custom_config, backend.engine)

    def observer_state(self, prepared: nn.Module) -> dict[str, torch.Tensor]:
        assert isinstance(prepared, GraphModule)
        return fx_results.observer_state_dict(prepared)

    def load_observer_state(self, prepared: nn.Module, state: dict[str, torch.Tensor]) -> None:
        assert isinstance(prepared, GraphModule)
        fx_results.load_observer_state(prepared, state)

    def missing_observer_sources(self, prepared: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
        assert isinstance(prepared, GraphModule)
        return [
            f"{key} is not in the observer state"
            for key in fx_results.observer_state_dict(prepared)
            if key not in state
        ]

    def convert_reference(
        self,
        prepared: nn.Module,
        backend: BackendSpec,
        mapping: QConfigMappingSpec,
        skip: SkipSpec,
        custom: CustomConfigSpec,
    ) -> ReferenceConversion:
        assert isinstance(prepared, GraphModule)
        _, convert_custom_config = custom_modules.build_custom_configs(custom)
        convert_mapping = mappings.build_convert_mapping(mapping, skip, backend, prepared)
        bits = prepared.meta.get(ACTIVATION_BITS_META)
        if bits is not None:
            recovery.set_activation_bits(convert_mapping, bits)
        with quantized_engine(backend.engine):
            conversion = convert_reference(
                prepared,
                convert_mapping,
                get_backend_config(backend.backend_config),
                convert_custom_config,
            )
        assert isinstance(conversion.model, GraphModule) and isinstance(conversion.engine_state, FxConvertState)
        conversion.mapping_entry_nodes = introspect.mapping_entry_nodes(
            prepared, mapping, backend, conversion.engine_state.node_name_to_qconfig
        )
        return conversion

    def lower(self, reference: nn.Module, engine_state: object, engine: str) -> GraphModule:
        if not isinstance(reference, GraphModule) or not isinstance(engine_state, FxConvertState):
            raise TypeError(f"the FX engine lowers its own reference conversions, not {type(engine_state).__name__}")
        return lower(reference, engine_state, engine)

    def count_nodes(self, model: nn.Module, example_inputs: ModelInputs, engine: str) -> dict[str, int]:
        assert isinstance(model, GraphModule)
        return fx_results.count_nodes(model, example_inputs, engine)

    def node_kinds(self, model: nn.Module, example_inputs: ModelInputs, engine: str) -> dict[str, str]:
        assert isinstance(model, GraphModule)
        return fx_results.node_kinds(model, example_inputs, engine)

    def check_custom_modules(
        self, prepared: nn.Module, example_inputs: ModelInputs, custom: CustomConfigSpec, engine: str
    ) -> None:
        custom_modules.check_contract(prepared, example_inputs, custom, engine)

    def numerics_blocker(self, custom: CustomConfigSpec) -> str | None:
        return None  # forward hooks on same-named modules: custom and non-traceable modules included

    def module_numerics(
        self,
        prepared: nn.Module,
        lowered: nn.Module,
        inputs: ModelInputs | Iterable[ModelInputs],
        engine: str,
        reference: nn.Module | None = None,
        bounds: dict[str, tuple[float, float]] | None = None,
    ) -> tuple[list[numerics.LayerDiagnostics], list[numerics.LoggedOutput]]:
        assert isinstance(prepared, GraphModule) and isinstance(lowered, GraphModule)
        return numerics.module_numerics(prepared, lowered, inputs, engine, reference, bounds)

    def layer_sensitivity(
        self,
        prepared: nn.Module,
        lowered: nn.Module,
        inputs: ModelInputs | Iterable[ModelInputs],
        engine: str,
        bounds: dict[str, tuple[float, float]] | None = None,
    ) -> list[numerics.LayerSensitivity]:
        assert isinstance(prepared, GraphModule) and isinstance(lowered, GraphModule)
        return numerics.layer_sensitivity(prepared, lowered, inputs, engine, bounds)

    def bounded_producers(self, model: nn.Module, custom: CustomConfigSpec) -> dict[str, tuple[float, float]]:
        prepare_custom_config, _ = custom_modules.build_custom_configs(custom)
        return observers.bounded_activation_producers(model, prepare_custom_config)

    def float_outputs(self, model: nn.Module, names: list[str], inputs: ModelInputs, engine: str) -> dict[str, bool]:
        assert isinstance(model, GraphModule)
        return numerics.float_outputs(model, names, inputs, engine)

    def observed_output_ranges(self, prepared: nn.Module, names: list[str]) -> dict[str, tuple[float, float]]:
        assert isinstance(prepared, GraphModule)
        return numerics.observed_output_ranges(prepared, names)

    def unmatched_skip_entries(self, prepared: nn.Module, skip: SkipSpec, prefix: str = "skip") -> list[str]:
        assert isinstance(prepared, GraphModule)
        return introspect.unmatched_skip_entries(prepared, skip, prefix)

    def model_nodes(self, prepared: nn.Module) -> list[introspect.NodeInfo]:
        assert isinstance(prepared, GraphModule)
        return introspect.model_nodes(prepared)

    def entry_matches(
        self, prepared: nn.Module, mapping: QConfigMappingSpec, skip: SkipSpec, backend: BackendSpec
    ) -> list[introspect.EntryMatch]:
        assert isinstance(prepared, GraphModule)
        return introspect.entry_matches(prepared, mapping, skip, backend)
