"""The one module that calls torch.ao.quantization: named qconfigs, mappings, backend configs,
custom configs, prepare / reference-convert / lower, and node counts.

Keeping every call here means a second engine (torchao's pt2e flow, torch.ao's successor) can sit
beside it later without touching the stages.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import operator
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from pipeline.schema import (
    BackendSpec,
    ConfigError,
    CustomConfigSpec,
    QConfigMappingSpec,
    SkipSpec,
    closest,
)

# torch 2.13 deprecates torch.ao.quantization as a whole; this project is built on it knowingly.
# Filter exactly that warning, here where the calls are made, and nothing broader.
warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)

from torch.ao.quantization import (  # noqa: E402
    HistogramObserver,
    MinMaxObserver,
    QConfig,
    QConfigMapping,
    default_per_channel_weight_observer,
    default_weight_observer,
    get_default_qconfig,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.fx.custom_config import ConvertCustomConfig, PrepareCustomConfig  # noqa: E402
from torch.ao.quantization.fx.lower_to_fbgemm import lower_to_fbgemm  # noqa: E402
from torch.ao.quantization.fx.qconfig_mapping_utils import (  # noqa: E402
    _generate_node_name_to_qconfig,
    _update_qconfig_for_fusion,
)
from torch.ao.quantization.qconfig import qconfig_equals  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx  # noqa: E402

# --------------------------------------------------------------------------------------------------
# The named qconfig library. fbgemm and x86 kernels (without VNNI) can overflow on 8-bit activations,
# so their activations use 7 bits, as torch's own defaults do (reduce_range).


def _activation_range(engine: str) -> dict[str, int]:
    return {"quant_min": 0, "quant_max": 127} if engine in ("fbgemm", "x86") else {"quant_min": 0, "quant_max": 255}


QCONFIG_LIBRARY: dict[str, tuple[str, Callable[[str], QConfig]]] = {
    "backend_default": (
        "torch's get_default_qconfig(engine): histogram activations; per-channel weights except qnnpack",
        lambda engine: get_default_qconfig(engine),
    ),
    "minmax_per_tensor": (
        "min-max activations, per-tensor symmetric int8 weights: fastest calibration, most outlier-sensitive",
        lambda engine: QConfig(
            activation=MinMaxObserver.with_args(dtype=torch.quint8, **_activation_range(engine)),
            weight=default_weight_observer,
        ),
    ),
    "minmax_per_channel": (
        "min-max activations, per-channel symmetric int8 weights",
        lambda engine: QConfig(
            activation=MinMaxObserver.with_args(dtype=torch.quint8, **_activation_range(engine)),
            weight=default_per_channel_weight_observer,
        ),
    ),
    "histogram_per_tensor": (
        "histogram (L2-optimal range) activations, per-tensor symmetric int8 weights",
        lambda engine: QConfig(
            activation=HistogramObserver.with_args(dtype=torch.quint8, **_activation_range(engine)),
            weight=default_weight_observer,
        ),
    ),
    "histogram_per_channel": (
        "histogram activations, per-channel symmetric int8 weights: usually the most accurate",
        lambda engine: QConfig(
            activation=HistogramObserver.with_args(dtype=torch.quint8, **_activation_range(engine)),
            weight=default_per_channel_weight_observer,
        ),
    ),
}


def named_qconfig(name: str | None, backend: BackendSpec, key: str) -> QConfig | None:
    """Resolve a qconfig name from config ('default' = the backend's default_qconfig); None stays None."""
    if name is None:
        return None
    if name == "default":
        name = backend.default_qconfig
    if name not in QCONFIG_LIBRARY:
        valid = ["default", *QCONFIG_LIBRARY]
        raise ConfigError(
            f"{key}='{name}' is not a known qconfig; choose one of {valid} or null (stay float).{closest(name, valid)}"
        )
    return QCONFIG_LIBRARY[name][1](backend.engine)


def resolve_import(path: str, key: str) -> Any:
    """Import 'package.module.attr.attr' (classes, functions, operator.add ...) or raise ConfigError."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                target = getattr(target, attribute)
        except AttributeError:
            break
        return target
    raise ConfigError(
        f"{key}='{path}' is not an importable path; write a full dotted path to a class or function, "
        f"e.g. 'torch.nn.Conv2d', 'torch.nn.functional.linear' or 'operator.add'."
    )


def import_path(obj: Any) -> str:
    """The dotted path config uses for an object type (the inverse of resolve_import, for logs)."""
    if obj is operator.add:
        return "operator.add"
    name = getattr(obj, "__name__", "")
    for public in (nn, torch):  # prefer the documented spelling: torch.nn.Conv2d, torch.add
        if name and getattr(public, name, None) is obj:
            return f"{public.__name__}.{name}"
    module = getattr(obj, "__module__", None) or "builtins"
    return f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', str(obj)))}"


def get_backend_config(name: str) -> Any:
    try:
        module = importlib.import_module(f"torch.ao.quantization.backend_config.{name}")
        getter = getattr(module, f"get_{name}_backend_config")
    except (ImportError, AttributeError):
        raise ConfigError(f"backend.backend_config='{name}' has no torch getter get_{name}_backend_config.") from None
    return getter()


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Set torch.backends.quantized.engine for the block and restore it: packed weights are built
    for the engine active when they are created, and sweeps run many jobs in one process."""
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise ConfigError(
            f"backend.engine='{engine}' is not supported by this torch build on this CPU; "
            f"supported engines are {[e for e in supported if e != 'none']}."
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


# --------------------------------------------------------------------------------------------------
# Mappings


def _base_mapping(spec: QConfigMappingSpec, backend: BackendSpec) -> QConfigMapping:
    if spec.base == "backend_default":
        return get_default_qconfig_mapping(backend.engine)
    if spec.base == "empty":
        return QConfigMapping()
    raise ConfigError(
        f"qconfig_mapping.base='{spec.base}' is not valid; use 'backend_default' (torch's "
        f"get_default_qconfig_mapping for the engine) or 'empty'."
    )


def build_qconfig_mapping(spec: QConfigMappingSpec, backend: BackendSpec) -> QConfigMapping:
    """The prepare-time QConfigMapping from YAML: base, then global, then ordered entries."""
    mapping = _base_mapping(spec, backend)
    mapping.set_global(named_qconfig(spec.global_qconfig, backend, "qconfig_mapping.global_qconfig"))
    for i, entry in enumerate(spec.object_type):
        key = f"qconfig_mapping.object_type[{i}]"
        mapping.set_object_type(
            resolve_import(entry.object_type, f"{key}.object_type"),
            named_qconfig(entry.qconfig, backend, f"{key}.qconfig"),
        )
    for i, entry in enumerate(spec.module_name_regex):
        _check_regex(entry.regex, f"qconfig_mapping.module_name_regex[{i}].regex")
        mapping.set_module_name_regex(
            entry.regex, named_qconfig(entry.qconfig, backend, f"qconfig_mapping.module_name_regex[{i}].qconfig")
        )
    for i, entry in enumerate(spec.module_name):
        mapping.set_module_name(
            entry.module_name, named_qconfig(entry.qconfig, backend, f"qconfig_mapping.module_name[{i}].qconfig")
        )
    for i, entry in enumerate(spec.module_name_object_type_order):
        key = f"qconfig_mapping.module_name_object_type_order[{i}]"
        mapping.set_module_name_object_type_order(
            entry.module_name,
            resolve_import(entry.object_type, f"{key}.object_type"),
            entry.index,
            named_qconfig(entry.qconfig, backend, f"{key}.qconfig"),
        )
    return mapping


def _check_regex(pattern: str, key: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"{key}='{pattern}' is not a valid regular expression ({error}).") from None


def fused_types_of(model: nn.Module, object_types: list[type]) -> list[type]:
    """The fused module types in `model` whose first op is one of `object_types` (ConvReLU2d for Conv2d):
    torch copies an object_type qconfig onto fused types only when it is not None, so a skip of
    nn.Conv2d alone would leave every fused conv+relu quantized."""
    from torch.ao.nn.intrinsic import _FusedModule

    fused: list[type] = []
    for module in model.modules():
        if isinstance(module, _FusedModule):
            first = type(next(iter(module.children())))
            if first in object_types and type(module) not in fused:
                fused.append(type(module))
    return fused


def build_convert_mapping(
    spec: QConfigMappingSpec, skip: SkipSpec, backend: BackendSpec, prepared: nn.Module
) -> QConfigMapping:
    """The convert-time mapping: the prepare-time one with every skip entry set to None.

    convert_fx accepts only this shape of change (same keys, same value or None), which is why one
    calibrated model serves every skip-list. Skip regexes go first so that a broader regex of the
    base mapping cannot shadow them (the first matching regex wins)."""
    mapping = build_qconfig_mapping(spec, backend)
    skip_types = [resolve_import(path, f"skip.object_type[{i}]") for i, path in enumerate(skip.object_type)]
    for object_type in [*skip_types, *fused_types_of(prepared, skip_types)]:
        mapping.set_object_type(object_type, None)
    regexes: OrderedDict[str, Any] = OrderedDict((pattern, None) for pattern in skip.module_name_regex)
    for pattern, qconfig in mapping.module_name_regex_qconfigs.items():
        regexes.setdefault(pattern, qconfig)
    mapping.module_name_regex_qconfigs = regexes
    for name in skip.module_name:
        mapping.set_module_name(name, None)
    for i, entry in enumerate(skip.module_name_object_type_order):
        mapping.set_module_name_object_type_order(
            entry.module_name,
            resolve_import(entry.object_type, f"skip.module_name_object_type_order[{i}].object_type"),
            entry.index,
            None,
        )
    return mapping


def _describe(qconfig: QConfig | None) -> str:
    if qconfig is None:
        return "None"

    def observer(factory: Any) -> str:
        made = factory()  # with_args partials hide the class; an instance names it and its range
        return f"{type(made).__name__}({made.dtype}, {getattr(made, 'qscheme', '')})"

    return f"QConfig(activation={observer(qconfig.activation)}, weight={observer(qconfig.weight)})"


def check_convert_mapping(prepare_mapping: QConfigMapping, convert_mapping: QConfigMapping) -> None:
    """convert_fx's rule, checked before converting so a breach names the entry and both values (torch
    asserts mid-convert, tersely): the global qconfig is unchanged, and every object_type, module_name
    and module_name_regex key of the prepare mapping is in the convert mapping with an equal value or None."""
    rule = (
        "convert_fx accepts a convert-time mapping only if it keeps every prepare-time key with the same "
        "qconfig or None (a skip-list may only set entries to None; a different qconfig needs a new calibration)"
    )
    if not qconfig_equals(prepare_mapping.global_qconfig, convert_mapping.global_qconfig):
        raise ConfigError(
            f"the global qconfig differs between prepare ({_describe(prepare_mapping.global_qconfig)}) and convert "
            f"({_describe(convert_mapping.global_qconfig)}): {rule}."
        )
    for kind, before, after in (
        ("object_type", prepare_mapping.object_type_qconfigs, convert_mapping.object_type_qconfigs),
        ("module_name", prepare_mapping.module_name_qconfigs, convert_mapping.module_name_qconfigs),
        ("module_name_regex", prepare_mapping.module_name_regex_qconfigs, convert_mapping.module_name_regex_qconfigs),
    ):
        for key, prepared in before.items():
            shown = import_path(key) if kind == "object_type" else repr(key)
            if key not in after:
                raise ConfigError(f"{kind} entry {shown} is in the prepare mapping but not at convert time: {rule}.")
            if after[key] is not None and not qconfig_equals(prepared, after[key]):
                raise ConfigError(
                    f"{kind} entry {shown} has {_describe(prepared)} at prepare but {_describe(after[key])} at "
                    f"convert: {rule}."
                )
        for key, added in after.items():
            # torch lets a new key through its mapping check, then fails per node if it changes one.
            if key not in before and added is not None:
                shown = import_path(key) if kind == "object_type" else repr(key)
                raise ConfigError(
                    f"{kind} entry {shown} is new at convert time with {_describe(added)} (prepare had no such "
                    f"entry): {rule}."
                )


def check_specs(backend: BackendSpec, mapping: QConfigMappingSpec, skip: SkipSpec) -> None:
    """Resolve every name and import path of the mapping and skip-list (raises ConfigError)."""
    build_qconfig_mapping(mapping, backend)
    for i, path in enumerate(skip.object_type):
        resolve_import(path, f"skip.object_type[{i}]")
    for i, pattern in enumerate(skip.module_name_regex):
        _check_regex(pattern, f"skip.module_name_regex[{i}]")
    for i, entry in enumerate(skip.module_name_object_type_order):
        resolve_import(entry.object_type, f"skip.module_name_object_type_order[{i}].object_type")


def build_custom_configs(spec: CustomConfigSpec) -> tuple[PrepareCustomConfig, ConvertCustomConfig]:
    """PrepareCustomConfig / ConvertCustomConfig from their from_dict shapes (empty for `none`)."""
    return PrepareCustomConfig.from_dict(dict(spec.prepare)), ConvertCustomConfig.from_dict(dict(spec.convert))


# --------------------------------------------------------------------------------------------------
# prepare / reference-convert / lower


def prepare(
    model: nn.Module,
    mapping: QConfigMapping,
    example_inputs: tuple[torch.Tensor, ...],
    backend_config: Any,
    prepare_custom_config: PrepareCustomConfig,
) -> GraphModule:
    """prepare_fx on a deep copy, so the float model stays untouched for evaluation."""
    return prepare_fx(
        copy.deepcopy(model).eval(),
        mapping,
        example_inputs,
        prepare_custom_config=prepare_custom_config,
        backend_config=backend_config,
    )


@dataclass
class ReferenceConversion:
    model: GraphModule
    node_name_to_qconfig: dict[str, Any]
    node_name_to_scope: dict[str, tuple[str, type]]
    left_float: list[str]


def convert_reference(
    prepared: GraphModule,
    convert_mapping: QConfigMapping,
    backend_config: Any,
    convert_custom_config: ConvertCustomConfig,
) -> ReferenceConversion:
    """convert_to_reference_fx on a deep copy (a prepared model converts once), keeping the two maps
    the lowering pass needs: convert_fx computes them internally and drops them with the metadata."""
    prepared = copy.deepcopy(prepared)
    attrs = prepared.meta["_observed_graph_module_attrs"]
    node_name_to_scope = dict(attrs.node_name_to_scope)
    # The same computation convert() does before converting: fusion-adjusted convert mapping,
    # then the per-node qconfig on the not yet converted graph.
    mapping_for_nodes = copy.deepcopy(convert_mapping)
    _update_qconfig_for_fusion(prepared, mapping_for_nodes)
    check_convert_mapping(attrs.qconfig_mapping, mapping_for_nodes)
    node_name_to_qconfig = _generate_node_name_to_qconfig(
        prepared,
        copy.deepcopy(dict(prepared.named_modules(remove_duplicate=False))),
        prepared.graph,
        mapping_for_nodes,
        node_name_to_scope,
    )
    left_float = sorted(
        name
        for name, qconfig in attrs.node_name_to_qconfig.items()
        if qconfig is not None and node_name_to_qconfig.get(name) is None
    )
    reference = convert_to_reference_fx(
        prepared,
        convert_custom_config=convert_custom_config,
        qconfig_mapping=convert_mapping,
        backend_config=backend_config,
    )
    return ReferenceConversion(reference, node_name_to_qconfig, node_name_to_scope, left_float)


def lower(
    reference: GraphModule,
    node_name_to_qconfig: dict[str, Any],
    node_name_to_scope: dict[str, tuple[str, type]],
    engine: str,
) -> GraphModule:
    """The lowering pass convert_fx runs after its reference conversion (shared by all four engines),
    applied to a copy of the reference model; packed weights are built for `engine`."""
    with quantized_engine(engine):
        lowered = lower_to_fbgemm(copy.deepcopy(reference), node_name_to_qconfig, node_name_to_scope)
        lowered.delete_all_unused_submodules()
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
# What got quantized

_GLUE = {torch.quantize_per_tensor, torch.quantize_per_channel, torch.dequantize, "dequantize"}


def count_nodes(model: GraphModule, example_inputs: tuple[torch.Tensor, ...], engine: str) -> dict[str, int]:
    """Tensor-producing compute nodes by the dtype they produce on the example inputs: quantized
    (int8 kernels, or ops running on int8 tensors), float (left in float), and quantize/dequantize glue."""
    from torch.fx.passes.shape_prop import ShapeProp

    with quantized_engine(engine):
        ShapeProp(model).propagate(*example_inputs)
    counts = {"quantized": 0, "float": 0, "quantize_dequantize": 0}
    for node in model.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op not in ("call_module", "call_function", "call_method") or meta is None:
            continue
        is_glue_module = node.op == "call_module" and type(model.get_submodule(str(node.target))).__name__ in (
            "Quantize",
            "DeQuantize",
        )
        if node.target in _GLUE or is_glue_module:
            counts["quantize_dequantize"] += 1
        elif getattr(meta, "is_quantized", False):
            counts["quantized"] += 1
        else:
            counts["float"] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# Per-layer sensitivity


@dataclass
class LayerSensitivity:
    module_name: str  # a skip-list's module_name entry
    quantized_type: str
    sqnr_db: float  # of this layer's output, quantized alone on float inputs (no error from earlier layers)


def layer_sensitivity(
    prepared: GraphModule, lowered: GraphModule, inputs: torch.Tensor, engine: str
) -> list[LayerSensitivity]:
    """Each quantized layer's own error, worst first, from torch's FX numeric suite shadow loggers:
    the int8 layer runs on the float model's input to that layer, so one bad layer does not make
    every later one look bad (which is what a skip search needs to rank)."""
    import io
    from contextlib import redirect_stdout

    import torch.ao.ns._numeric_suite_fx as numeric_suite
    from torch.ao.ns.fx.utils import compute_sqnr

    with quantized_engine(engine), torch.no_grad(), redirect_stdout(io.StringIO()):  # the suite print()s
        shadowed = numeric_suite.add_shadow_loggers(
            "float", copy.deepcopy(prepared), "int8", copy.deepcopy(lowered), numeric_suite.OutputLogger
        )
        shadowed(inputs)
        results = numeric_suite.extract_shadow_logger_info(shadowed, numeric_suite.OutputLogger, "int8")
        numeric_suite.extend_logger_results_with_comparison(results, "float", "int8", compute_sqnr, "sqnr")
    layers = []
    for result in results.values():
        output = result["node_output"]["int8"][0]
        sqnr = float(torch.stack([torch.as_tensor(s) for s in output["sqnr"]]).mean())
        layers.append(LayerSensitivity(output["fqn"], output["ref_node_target_type"].rsplit(".", 1)[-1], sqnr))
    return sorted(layers, key=lambda layer: layer.sqnr_db)


# --------------------------------------------------------------------------------------------------
# Which skip entries match anything


def unmatched_skip_entries(prepared: GraphModule, skip: SkipSpec) -> list[str]:
    """One readable line per skip entry that matches nothing in the model, with the closest names
    that do exist (module names, object types as import paths)."""
    modules = dict(prepared.named_modules(remove_duplicate=False))
    names = [name for name in modules if name and "activation_post_process" not in name]
    scope = prepared.meta["_observed_graph_module_attrs"].node_name_to_scope
    types: set[Any] = set()
    calls: dict[tuple[str, Any], int] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module":
            module = modules[str(node.target)]
            types.add(type(module))
            children = list(module.children())
            if children and type(module).__module__.startswith("torch.ao.nn.intrinsic"):
                types.add(type(children[0]))
        elif node.op in ("call_function", "call_method"):
            types.add(node.target)
            parent = scope.get(node.name, ("", None))[0]
            calls[(parent, node.target)] = calls.get((parent, node.target), 0) + 1
    type_paths = sorted(import_path(t) for t in types if not isinstance(t, str))
    problems = []
    for i, path in enumerate(skip.object_type):
        if resolve_import(path, f"skip.object_type[{i}]") not in types:
            problems.append(f"skip.object_type[{i}]='{path}' matches no op in the model.{closest(path, type_paths)}")
    for i, name in enumerate(skip.module_name):
        if name not in modules:
            problems.append(f"skip.module_name[{i}]='{name}' is not a module of the model.{closest(name, names)}")
    for i, pattern in enumerate(skip.module_name_regex):
        if not any(re.match(pattern, name) for name in names):
            problems.append(f"skip.module_name_regex[{i}]='{pattern}' matches no module name.{closest(pattern, names)}")
    for i, entry in enumerate(skip.module_name_object_type_order):
        target = resolve_import(entry.object_type, f"skip.module_name_object_type_order[{i}].object_type")
        count = calls.get((entry.module_name, target), 0)
        if entry.index >= count:
            problems.append(
                f"skip.module_name_object_type_order[{i}]: module '{entry.module_name}' calls "
                f"{entry.object_type} {count} time(s), so index {entry.index} matches nothing."
            )
    return problems
