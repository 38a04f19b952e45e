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
    FakeQuantizeBase,
    HistogramObserver,
    MinMaxObserver,
    ObserverBase,
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
from torch.ao.quantization.fx.tracer import QuantizationTracer  # noqa: E402
from torch.ao.quantization.fx.utils import get_skipped_module_name_and_classes  # noqa: E402
from torch.ao.quantization.qconfig import qconfig_equals  # noqa: E402
from torch.ao.quantization.quantize_fx import (  # noqa: E402
    attach_preserved_attrs_to_model,
    convert_fx,
    convert_to_reference_fx,
    prepare_fx,
)

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


class _ObservesClamped:
    """Mixin for an observer that records what it sees clamped to [clamp_min, clamp_max] and passes the input
    on unchanged. For a conv whose output only feeds ReLU6 / hardtanh: the native backend does not fuse those,
    and they share their input's observer, so a plain observer spends the int8 levels on values the
    activation clips anyway. The bounds are constructor arguments (compared by convert_fx's qconfig check);
    the state is the base observer's buffers, so the calibration cache's observer state holds it."""

    def __init__(self, clamp_min: float, clamp_max: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clamp_min, self.clamp_max = clamp_min, clamp_max

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        super().forward(x_orig.clamp(self.clamp_min, self.clamp_max))  # type: ignore[misc]
        return x_orig

    def extra_repr(self) -> str:
        return f"clamp=[{self.clamp_min}, {self.clamp_max}], {super().extra_repr()}"  # type: ignore[misc]


class ClampedMinMaxObserver(_ObservesClamped, MinMaxObserver):
    """MinMaxObserver over the clamped range (state: min_val / max_val)."""


class ClampedHistogramObserver(_ObservesClamped, HistogramObserver):
    """HistogramObserver over the clamped range (state: the histogram buffers)."""


def clamped_qconfig(qconfig: QConfig, clamp_min: float, clamp_max: float, engine: str) -> QConfig:
    """`qconfig` with its activation observer clamping to [clamp_min, clamp_max]: same observer kind and
    arguments (histogram or min-max, 7-bit range...), same weight observer. Meant for output observers
    only (see clamp_bounded_activation_observers)."""
    activation = qconfig.activation
    kind = activation.p.func if hasattr(activation, "p") else activation
    keywords = dict(activation.p.keywords) if hasattr(activation, "p") else {}
    if kind is HistogramObserver:
        clamped: type = ClampedHistogramObserver
    elif kind is MinMaxObserver:
        clamped = ClampedMinMaxObserver
    else:  # another observer kind: min-max over the engine's activation range
        clamped, keywords = ClampedMinMaxObserver, {"dtype": torch.quint8, **_activation_range(engine)}
    return QConfig(
        activation=clamped.with_args(clamp_min=clamp_min, clamp_max=clamp_max, **keywords), weight=qconfig.weight
    )


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


# Ops that clip to a fixed range and share their input's observer in the native backend.
_BOUNDED_MODULES = (nn.Hardtanh,)  # nn.ReLU6 is a Hardtanh(0, 6)
_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _bounds(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[float, float] | None:
    """[min, max] a node clips its input to, if it is ReLU6 / hardtanh with constant bounds."""
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), _BOUNDED_MODULES):
        module = modules[str(node.target)]
        return float(module.min_val), float(module.max_val)
    if node.op == "call_function" and node.target is nn.functional.relu6:
        return 0.0, 6.0
    if node.op == "call_function" and node.target in (nn.functional.hardtanh, nn.functional.hardtanh_):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        if isinstance(low, (int, float)) and isinstance(high, (int, float)):
            return float(low), float(high)
    return None


def bounded_activation_producers(
    model: nn.Module, prepare_custom_config: PrepareCustomConfig
) -> dict[str, tuple[float, float]]:
    """Conv / linear modules whose output goes only into ReLU6 / hardtanh, with the range they clip to
    (the widest, if several). Traced the way prepare_fx traces, on the float model; a BatchNorm right
    after the conv is looked through, since prepare folds it into the conv under the conv's name."""
    tracer = QuantizationTracer(*get_skipped_module_name_and_classes(prepare_custom_config, False))
    graph = tracer.trace(model)
    modules = dict(model.named_modules())
    found: dict[str, tuple[float, float]] = {}
    rejected: set[str] = set()  # a module called twice qualifies only if every call does
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), _PRODUCERS):
            continue
        name, output = str(node.target), node
        if len(output.users) == 1:
            (user,) = output.users
            if user.op == "call_module" and isinstance(modules.get(str(user.target)), nn.modules.batchnorm._BatchNorm):
                output = user
        bounds = [_bounds(user, modules) for user in output.users]
        if not bounds or any(b is None for b in bounds):
            rejected.add(name)
            continue
        lows, highs = zip(*bounds, *([found[name]] if name in found else []), strict=True)
        found[name] = (min(lows), max(highs))
    return {name: bounds for name, bounds in found.items() if name not in rejected}


def clamp_bounded_activation_observers(
    prepared: GraphModule, model: nn.Module, prepare_custom_config: PrepareCustomConfig, engine: str
) -> dict[str, tuple[float, float]]:
    """Make the output observer of each conv / linear that feeds only ReLU6 / hardtanh record the clipped
    range, in a freshly prepared (not yet calibrated) model. Returns the modules changed and their ranges.

    Done on the observers, not through a qconfig: a module's qconfig activation observer also observes its
    input when that is not observed yet (the graph input for a stem conv), which clamping would destroy.
    The mapping is untouched, so convert-time mappings and skip-lists work as before; a clamped observer
    keeps its kind and arguments (calibration cache state_dicts load into it), and the calibration cache
    rebuilds a hit with the same prepare, so with this same call."""
    bounds = bounded_activation_producers(model, prepare_custom_config)
    node_name_to_qconfig = prepared.meta["_observed_graph_module_attrs"].node_name_to_qconfig
    modules = dict(prepared.named_modules(remove_duplicate=False))
    picked: dict[str, tuple[float, float]] = {}
    for node in prepared.graph.nodes:
        name = str(node.target)
        qconfig = node_name_to_qconfig.get(node.name)
        if node.op != "call_module" or name not in bounds or qconfig is None:
            continue
        observers = [
            user for user in node.users if user.op == "call_module" and "activation_post_process" in str(user.target)
        ]
        if len(observers) != 1:
            continue
        low, high = bounds[name]
        observer = modules[str(observers[0].target)]
        clamped = clamped_qconfig(qconfig, low, high, engine).activation()
        # ReLU6 shares this observer instance under a second name: replace it under every name.
        for path, module in modules.items():
            if module is observer:
                prepared.add_submodule(path, clamped)
        picked[name] = (low, high)
    return picked


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


# --------------------------------------------------------------------------------------------------
# Custom modules: PrepareCustomConfig / ConvertCustomConfig from YAML, classes written as import paths

QUANT_MODES: tuple[str, ...] = ("static", "dynamic", "weight_only")  # post-training modes (no qat here)
_FLOAT_TO_OBSERVED = "float_to_observed_custom_module_class"
_OBSERVED_TO_QUANTIZED = "observed_to_quantized_custom_module_class"
PREPARE_KEYS: tuple[str, ...] = (
    _FLOAT_TO_OBSERVED,
    "non_traceable_module_name",
    "non_traceable_module_class",
    "preserved_attributes",
)
CONVERT_KEYS: tuple[str, ...] = (_OBSERVED_TO_QUANTIZED, "preserved_attributes")


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _check_keys(side: dict[str, Any], valid: tuple[str, ...], key: str) -> None:
    for name in side:
        if name not in valid:
            raise ConfigError(
                f"{key}.{name} is not a key this pipeline passes to torch; valid keys are {list(valid)}."
                f"{closest(str(name), valid)}"
            )


def _check_string_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key}={value!r} must be a list of strings.")
    return value


def _class_mapping(side: dict[str, Any], name: str, key: str, method: str) -> dict[str, dict[type, type]]:
    """{mode: {class: class}} from {mode: {'import.path': 'import.path'}}, checking modes, paths and that
    every target class has the classmethod torch will call on it (from_float / from_observed)."""
    resolved: dict[str, dict[type, type]] = {}
    modes = side.get(name, {})
    if not isinstance(modes, dict):
        raise ConfigError(f"{key}.{name}={modes!r} must map a quant mode ({list(QUANT_MODES)}) to {{class: class}}.")
    for mode, classes in modes.items():
        if mode not in QUANT_MODES:
            raise ConfigError(
                f"{key}.{name} has quant mode '{mode}', which is not valid; key the class mappings by one of "
                f"{list(QUANT_MODES)}.{closest(str(mode), QUANT_MODES)}"
            )
        if not isinstance(classes, dict):
            raise ConfigError(f"{key}.{name}.{mode}={classes!r} must map an import path to an import path.")
        resolved[mode] = {}
        for source_path, target_path in classes.items():
            entry = f"{key}.{name}.{mode}['{source_path}']"
            source = resolve_import(str(source_path), entry)
            target = resolve_import(str(target_path), entry)
            if not callable(getattr(target, method, None)):
                raise ConfigError(
                    f"{entry}='{target_path}' has no classmethod {method}(), which torch calls to build it from "
                    f"the {'float' if method == 'from_float' else 'observed'} module; map to a class that defines "
                    f"{method}."
                )
            resolved[mode][source] = target
    return resolved


def _resolved_custom_dicts(spec: CustomConfigSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The from_dict dicts with classes resolved, after every check that needs no model."""
    prepare_side, convert_side = _plain(spec.prepare) or {}, _plain(spec.convert) or {}
    _check_keys(prepare_side, PREPARE_KEYS, "custom_config.prepare")
    _check_keys(convert_side, CONVERT_KEYS, "custom_config.convert")
    prepare_dict: dict[str, Any] = {}
    convert_dict: dict[str, Any] = {}
    float_to_observed = _class_mapping(prepare_side, _FLOAT_TO_OBSERVED, "custom_config.prepare", "from_float")
    observed_to_quantized = _class_mapping(
        convert_side, _OBSERVED_TO_QUANTIZED, "custom_config.convert", "from_observed"
    )
    for mode, classes in observed_to_quantized.items():
        for observed in classes:
            if observed not in float_to_observed.get(mode, {}).values():
                entry = f"custom_config.convert.{_OBSERVED_TO_QUANTIZED}.{mode}['{import_path(observed)}']"
                produced = [import_path(c) for c in float_to_observed.get(mode, {}).values()]
                raise ConfigError(
                    f"{entry}: no custom_config.prepare.{_FLOAT_TO_OBSERVED}.{mode} entry maps a float class to "
                    f"'{import_path(observed)}', so no module of that class exists at convert time. Map a float class "
                    f"to it on the prepare side, or key this entry by an observed class the prepare side produces "
                    f"for {mode}: {produced or 'none'}."
                )
    if float_to_observed:
        prepare_dict[_FLOAT_TO_OBSERVED] = float_to_observed
    if observed_to_quantized:
        convert_dict[_OBSERVED_TO_QUANTIZED] = observed_to_quantized
    if "non_traceable_module_name" in prepare_side:
        prepare_dict["non_traceable_module_name"] = _check_string_list(
            prepare_side["non_traceable_module_name"], "custom_config.prepare.non_traceable_module_name"
        )
    if "non_traceable_module_class" in prepare_side:
        paths = _check_string_list(
            prepare_side["non_traceable_module_class"], "custom_config.prepare.non_traceable_module_class"
        )
        prepare_dict["non_traceable_module_class"] = [
            resolve_import(path, f"custom_config.prepare.non_traceable_module_class[{i}]")
            for i, path in enumerate(paths)
        ]
    for side, out, key in ((prepare_side, prepare_dict, "prepare"), (convert_side, convert_dict, "convert")):
        if "preserved_attributes" in side:
            out["preserved_attributes"] = _check_string_list(
                side["preserved_attributes"], f"custom_config.{key}.preserved_attributes"
            )
    return prepare_dict, convert_dict


def check_custom_config(spec: CustomConfigSpec) -> None:
    """Every import path, quant mode and class pairing of custom_config (raises ConfigError)."""
    _resolved_custom_dicts(spec)


def build_custom_configs(spec: CustomConfigSpec) -> tuple[PrepareCustomConfig, ConvertCustomConfig]:
    """PrepareCustomConfig / ConvertCustomConfig from their from_dict shapes (empty for `none`)."""
    prepare_dict, convert_dict = _resolved_custom_dicts(spec)
    return PrepareCustomConfig.from_dict(prepare_dict), ConvertCustomConfig.from_dict(convert_dict)


def _with_import_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {_with_import_paths(k): _with_import_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_with_import_paths(item) for item in value]
    return import_path(value) if isinstance(value, type) else value


def custom_config_yaml(config: PrepareCustomConfig | ConvertCustomConfig) -> str:
    """The config's to_dict() as YAML with classes written back as import paths (what custom_config takes)."""
    import yaml

    kind = type(config).__name__
    header = f"# {kind}.to_dict() of this run, classes as import paths (the shape custom_config takes).\n"
    return header + yaml.safe_dump(_with_import_paths(config.to_dict()), sort_keys=False)


def preserved_attributes(model: nn.Module) -> dict[str, Any]:
    """The attributes prepare/convert kept on a model because custom_config listed them."""
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

    meta = getattr(model, "meta", {})
    return dict(meta.get(_USER_PRESERVED_ATTRIBUTES_KEY, {}))


# --------------------------------------------------------------------------------------------------
# Models FX cannot trace


@dataclass
class UntraceableModule:
    name: str  # qualified name in the model ("" = the top-level model's own forward)
    cls: type
    error: BaseException


def untraceable_module(error: BaseException) -> UntraceableModule | None:
    """The innermost module whose forward raised while FX traced the model, from the traceback: the
    tracer's frame holds the root module, the frames after it the modules being traced. None when the
    error was not raised during symbolic tracing."""
    import traceback

    root: nn.Module | None = None
    innermost: nn.Module | None = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if root is None:
            if isinstance(owner, torch.fx.Tracer) and frame.f_code.co_name == "trace":
                root = owner.root
        elif isinstance(owner, nn.Module):
            innermost = owner
    if root is None:
        return None
    names = {id(module): name for name, module in root.named_modules(remove_duplicate=False)}
    module = innermost if innermost is not None and id(innermost) in names else root
    return UntraceableModule(names[id(module)], type(module), error)


# --------------------------------------------------------------------------------------------------
# What calibration produced


def observer_state_dict(prepared: GraphModule) -> dict[str, torch.Tensor]:
    """The calibration result alone: every observer's buffers (min/max, histograms). Not the weights:
    prepare_fx rebuilds them from the float model (for ResNet-18, 47 MB against 0.2 MB of observers)."""
    prefixes = tuple(
        f"{name}." for name, module in prepared.named_modules() if isinstance(module, ObserverBase | FakeQuantizeBase)
    )
    return {key: value for key, value in prepared.state_dict().items() if key.startswith(prefixes)}


def load_observer_state(prepared: GraphModule, state: dict[str, torch.Tensor]) -> None:
    """Load observer_state_dict's output into a freshly prepared model; the keys must match exactly."""
    expected = observer_state_dict(prepared).keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"observer keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    prepared.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------------
# prepare / reference-convert / lower


def prepare(
    model: nn.Module,
    mapping: QConfigMapping,
    example_inputs: tuple[torch.Tensor, ...],
    backend_config: Any,
    prepare_custom_config: PrepareCustomConfig,
) -> GraphModule:
    """prepare_fx on a deep copy, so the float model stays untouched for evaluation; shared stateless
    children then get their own copies (see unshare_stateless_modules)."""
    prepared = prepare_fx(
        copy.deepcopy(model).eval(),
        mapping,
        example_inputs,
        prepare_custom_config=prepare_custom_config,
        backend_config=backend_config,
    )
    unshare_stateless_modules(prepared)
    return prepared


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
    key: str = ""  # the numeric suite's name for the layer (joins it with the suite's other results)


def numeric_suite_blocker(custom: CustomConfigSpec) -> str | None:
    """Why torch's FX numeric suite cannot run on this model, or None. The suite re-traces both models
    with a tracer whose skipped module names and classes torch 2.13 hard-codes empty (a TODO in
    torch/ao/ns/_numeric_suite_fx.py), so it cannot step around custom or non-traceable modules."""
    keys = [
        key
        for key in ("float_to_observed_custom_module_class", "non_traceable_module_name", "non_traceable_module_class")
        if custom.prepare.get(key)
    ]
    if not keys:
        return None
    return (
        f"custom_config={custom.name} sets custom_config.prepare.{' and '.join(keys)}, and torch 2.13's FX numeric "
        f"suite re-traces the model with no way to leave those modules untraced, so per-layer SQNR cannot be "
        f"measured for this model"
    )


def layer_sensitivity(
    prepared: GraphModule, lowered: GraphModule, inputs: torch.Tensor, engine: str
) -> list[LayerSensitivity]:
    """Each quantized layer's own error, worst first, from torch's FX numeric suite shadow loggers:
    the int8 layer runs on the float model's input to that layer, so one bad layer does not make
    every later one look bad (which is what a skip search needs to rank)."""
    from torch.ao.ns.fx.utils import compute_sqnr

    with _numeric_suite(engine) as numeric_suite:
        shadowed = numeric_suite.add_shadow_loggers(
            "float", copy.deepcopy(prepared), "int8", copy.deepcopy(lowered), numeric_suite.OutputLogger
        )
        shadowed(inputs)
        results = numeric_suite.extract_shadow_logger_info(shadowed, numeric_suite.OutputLogger, "int8")
        numeric_suite.extend_logger_results_with_comparison(results, "float", "int8", compute_sqnr, "sqnr")
    layers = []
    for result_key, result in results.items():
        output = result["node_output"]["int8"][0]
        sqnr = _mean_sqnr(output)
        layers.append(
            LayerSensitivity(output["fqn"], output["ref_node_target_type"].rsplit(".", 1)[-1], sqnr, result_key)
        )
    return sorted(layers, key=lambda layer: layer.sqnr_db)


@contextlib.contextmanager
def _numeric_suite(engine: str) -> Iterator[Any]:
    """torch's FX numeric suite, run under `engine` without autograd and with its print()s swallowed."""
    import io
    from contextlib import redirect_stdout

    import torch.ao.ns._numeric_suite_fx as numeric_suite

    with quantized_engine(engine), torch.no_grad(), redirect_stdout(io.StringIO()):
        yield numeric_suite


def _mean_sqnr(output: dict[str, Any]) -> float:
    return float(torch.stack([torch.as_tensor(s) for s in output["sqnr"]]).mean())


@dataclass
class LoggedOutput:
    """One op's output through the whole quantized network so far (numeric suite add_loggers)."""

    key: str  # the numeric suite's name for the op, shared by its loggers and shadows
    module_name: str
    quantized_type: str
    sqnr_db: float  # int8 network vs float network at this op's output: earlier layers' error included
    has_weight: bool


@dataclass
class LayerDiagnostics:
    module_name: str
    quantized_type: str
    own_sqnr_db: float  # quantized alone on float inputs (layer_sensitivity)
    cumulative_sqnr_db: float | None  # its output through the whole quantized network so far
    weight_sqnr_db: float | None  # int8 weight vs float weight; None for layers without weights


def layer_diagnostics(
    prepared: GraphModule, lowered: GraphModule, inputs: torch.Tensor, engine: str
) -> tuple[list[LayerDiagnostics], list[LoggedOutput]]:
    """Per quantized layer (worst own SQNR first): own SQNR (layer_sensitivity's shadow loggers),
    cumulative SQNR (add_loggers / extract_logger_info) and weight SQNR (extract_weights). Also every
    logged op's cumulative SQNR in execution order, which shows where an error starts."""
    from torch.ao.ns.fx.utils import compute_sqnr

    with _numeric_suite(engine) as numeric_suite:
        float_logged, int8_logged = numeric_suite.add_loggers(
            "float", copy.deepcopy(prepared), "int8", copy.deepcopy(lowered), numeric_suite.OutputLogger
        )
        float_logged(inputs)
        int8_logged(inputs)
        activations = numeric_suite.extract_logger_info(float_logged, int8_logged, numeric_suite.OutputLogger, "int8")
        numeric_suite.extend_logger_results_with_comparison(activations, "float", "int8", compute_sqnr, "sqnr")
        weights = numeric_suite.extract_weights("float", prepared, "int8", lowered)  # reads only: no copies
        numeric_suite.extend_logger_results_with_comparison(weights, "float", "int8", compute_sqnr, "sqnr")
        # The results dict is in attribute order; the int8 graph's node order is execution order.
        position = {node.name: i for i, node in enumerate(int8_logged.graph.nodes)}
    weight_sqnr = {key: _mean_sqnr(result["weight"]["int8"][0]) for key, result in weights.items()}
    outputs = {key: result["node_output"]["int8"][0] for key, result in activations.items()}
    logged = [
        LoggedOutput(
            key,
            output["fqn"],
            output["ref_node_target_type"].rsplit(".", 1)[-1],
            _mean_sqnr(output),
            key in weight_sqnr,
        )
        for key, output in sorted(
            outputs.items(), key=lambda item: position.get(item[1]["ref_node_name"], len(position))
        )
    ]
    cumulative = {output.key: output.sqnr_db for output in logged}
    layers = [
        LayerDiagnostics(
            layer.module_name,
            layer.quantized_type,
            layer.sqnr_db,
            cumulative.get(layer.key),
            weight_sqnr.get(layer.key),
        )
        for layer in layer_sensitivity(prepared, lowered, inputs, engine)
    ]
    return layers, logged


# --------------------------------------------------------------------------------------------------
# Which skip entries match anything


def unmatched_skip_entries(prepared: GraphModule, skip: SkipSpec, prefix: str = "skip") -> list[str]:
    """One readable line per skip entry that matches nothing in the model, with the closest names
    that do exist (module names, object types as import paths); `prefix` names the config key."""
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
        if resolve_import(path, f"{prefix}.object_type[{i}]") not in types:
            problems.append(
                f"{prefix}.object_type[{i}]='{path}' matches no op in the model.{closest(path, type_paths)}"
            )
    for i, name in enumerate(skip.module_name):
        if name not in modules:
            problems.append(f"{prefix}.module_name[{i}]='{name}' is not a module of the model.{closest(name, names)}")
    for i, pattern in enumerate(skip.module_name_regex):
        if not any(re.match(pattern, name) for name in names):
            problems.append(
                f"{prefix}.module_name_regex[{i}]='{pattern}' matches no module name.{closest(pattern, names)}"
            )
    for i, entry in enumerate(skip.module_name_object_type_order):
        target = resolve_import(entry.object_type, f"{prefix}.module_name_object_type_order[{i}].object_type")
        count = calls.get((entry.module_name, target), 0)
        if entry.index >= count:
            problems.append(
                f"{prefix}.module_name_object_type_order[{i}]: module '{entry.module_name}' calls "
                f"{entry.object_type} {count} time(s), so index {entry.index} matches nothing."
            )
    return problems


# --------------------------------------------------------------------------------------------------
# What a model's names are and what each mapping entry matches (the inspect stage)


@dataclass
class NodeInfo:
    name: str
    op: str  # call_module | call_function | call_method
    target: str  # module path, or the function / method as config writes it (import path)
    scope: str  # the module the op runs in (call_module: the module itself)
    quantized: bool  # the prepare-time mapping gives it a qconfig


@dataclass
class EntryMatch:
    key: str  # the config key, e.g. skip.module_name[1]
    value: str
    nodes: list[str]  # FX nodes the entry alone would configure
    note: str = ""  # for an entry that matches nothing: why, with the closest names


def model_nodes(prepared: GraphModule) -> list[NodeInfo]:
    """Every op node of a prepared model (observers left out), in graph order."""
    attrs = prepared.meta["_observed_graph_module_attrs"]
    modules = dict(prepared.named_modules(remove_duplicate=False))
    nodes = []
    for node in prepared.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if node.op == "call_module" and "activation_post_process" in str(node.target):
            continue
        if node.op == "call_module":
            target = f"{node.target} ({import_path(type(modules[str(node.target)]))})"
        elif node.op == "call_function":
            target = import_path(node.target)
        else:
            target = str(node.target)  # a method name, as object_type entries write it ("reshape")
        scope = attrs.node_name_to_scope.get(node.name, ("", None))[0]
        nodes.append(NodeInfo(node.name, node.op, target, scope, attrs.node_name_to_qconfig.get(node.name) is not None))
    return nodes


def _nodes_configured_by(prepared: GraphModule, mapping: QConfigMapping) -> list[str]:
    """The op nodes `mapping` gives a qconfig, computed by torch's own per-node resolution (the one
    prepare and convert use), so module-name prefixes, regexes, fused types and call order all count."""
    attrs = prepared.meta["_observed_graph_module_attrs"]
    _update_qconfig_for_fusion(prepared, mapping)
    per_node = _generate_node_name_to_qconfig(
        prepared,
        copy.deepcopy(dict(prepared.named_modules(remove_duplicate=False))),
        prepared.graph,
        mapping,
        attrs.node_name_to_scope,
    )
    ops = {node.name for node in model_nodes(prepared)}
    return [name for name, qconfig in per_node.items() if qconfig is not None and name in ops]


def entry_matches(
    prepared: GraphModule, mapping_spec: QConfigMappingSpec, skip: SkipSpec, backend: BackendSpec
) -> list[EntryMatch]:
    """For each entry of the skip-list and of the configured mapping (its own entries, not the base's):
    the nodes it matches, or why it matches nothing and the closest names that exist."""
    probe = QCONFIG_LIBRARY["minmax_per_tensor"][1](backend.engine)  # any qconfig: only None vs not counts
    as_skip = SkipSpec(
        name=mapping_spec.name,
        object_type=[entry.object_type for entry in mapping_spec.object_type],
        module_name_regex=[entry.regex for entry in mapping_spec.module_name_regex],
        module_name=[entry.module_name for entry in mapping_spec.module_name],
        module_name_object_type_order=list(mapping_spec.module_name_object_type_order),
    )
    matches = []
    for prefix, spec in (("skip", skip), ("qconfig_mapping", as_skip)):
        problems = unmatched_skip_entries(prepared, spec, prefix)
        entries: list[tuple[str, str, Callable[[QConfigMapping], Any]]] = []
        for i, path in enumerate(spec.object_type):
            target = resolve_import(path, f"{prefix}.object_type[{i}]")
            entries.append((f"{prefix}.object_type[{i}]", path, lambda m, t=target: m.set_object_type(t, probe)))
        for i, pattern in enumerate(spec.module_name_regex):
            entries.append(
                (f"{prefix}.module_name_regex[{i}]", pattern, lambda m, r=pattern: m.set_module_name_regex(r, probe))
            )
        for i, name in enumerate(spec.module_name):
            entries.append((f"{prefix}.module_name[{i}]", name, lambda m, n=name: m.set_module_name(n, probe)))
        for i, entry in enumerate(spec.module_name_object_type_order):
            target = resolve_import(entry.object_type, f"{prefix}.module_name_object_type_order[{i}].object_type")
            entries.append(
                (
                    f"{prefix}.module_name_object_type_order[{i}]",
                    f"{entry.module_name} / {entry.object_type} / {entry.index}",
                    lambda m, e=entry, t=target: m.set_module_name_object_type_order(e.module_name, t, e.index, probe),
                )
            )
        for key, value, add_entry in entries:
            mapping = QConfigMapping()
            add_entry(mapping)
            nodes = _nodes_configured_by(prepared, mapping)
            note = ""
            if not nodes:
                note = next((line for line in problems if line.startswith((f"{key}=", f"{key}:"))), "")
                # The reason without the key and value the caller shows anyway.
                note = note.removeprefix(f"{key}='{value}' ").removeprefix(f"{key}: ")
                note = note or "it names modules or ops that have no quantizable node."
            matches.append(EntryMatch(key, value, nodes, note))
    return matches
