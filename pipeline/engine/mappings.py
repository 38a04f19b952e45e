"""QConfigMappings from config: the prepare-time mapping, the convert-time mapping (a skip-list sets
entries to None), convert_fx's rule on the two checked up front, and the fused types a skip covers."""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from typing import Any

from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig_mapping
from torch.ao.quantization.fx.qconfig_mapping_utils import _generate_node_name_to_qconfig, _update_qconfig_for_fusion
from torch.ao.quantization.qconfig import qconfig_equals

from pipeline.engine.qconfigs import import_path, named_qconfig, resolve_import
from pipeline.errors import ConfigError
from pipeline.schema import BackendSpec, QConfigMappingSpec, SkipSpec


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


def fused_op_types(model: nn.Module) -> list[tuple[type, list[type]]]:
    """(fused type, its op types in order) for every fused module in a fused or prepared model."""
    from torch.ao.nn.intrinsic import _FusedModule

    found: list[tuple[type, list[type]]] = []
    for module in model.modules():
        if isinstance(module, _FusedModule):
            entry = (type(module), [type(op) for op in module.children()])
            if entry not in found:
                found.append(entry)
    return found


def align_fusion_partners(
    mapping: QConfigMapping, fused: list[tuple[type, list[type]]], explicit: set[Any]
) -> dict[type, QConfig | None]:
    """torch's prepare_fx / convert_fx require every op type of a fused module (Linear + ReLU ->
    LinearReLU) to have the same object_type qconfig, so `{object_type: torch.nn.Linear, qconfig: dynamic}`
    alone fails on any model that fuses Linear+ReLU. Give each fusion partner the first op's qconfig
    unless the config names the partner itself (`explicit`); a partner that two fusions would need to set
    differently (Linear+ReLU dynamic, Conv2d+ReLU float) is a ConfigError. Returns what was set."""
    types = mapping.object_type_qconfigs
    added: dict[type, QConfig | None] = {}
    for fused_type, ops in fused:
        first = types.get(ops[0])
        for partner in ops[1:]:
            if qconfig_equals(types.get(partner), first) or partner in explicit:
                continue
            if partner in added:
                raise ConfigError(
                    f"qconfig_mapping: torch fuses {import_path(ops[0])} with {import_path(partner)} "
                    f"({fused_type.__name__}) and needs both to have one object_type qconfig, but another fusion "
                    f"of {import_path(partner)} needs a different one ({_describe(added[partner])} vs "
                    f"{_describe(first)}). Give these layers their qconfig by module_name or module_name_regex "
                    f"entries instead of object_type (module names: stages=[load,inspect])."
                )
            types[partner] = first
            added[partner] = first
    return added


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
    if spec.object_type:  # as prepare did (FxEngine.prepare), now with the skipped types' partners too
        explicit = {resolve_import(e.object_type, "qconfig_mapping.object_type") for e in spec.object_type}
        align_fusion_partners(mapping, fused_op_types(prepared), explicit | set(skip_types))
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


def convert_node_qconfigs(
    prepared: nn.Module, convert_mapping: QConfigMapping, attrs: Any, node_name_to_scope: dict[str, tuple[str, type]]
) -> dict[str, Any]:
    """Each node's convert-time qconfig, as convert_fx computes it when given a convert-time mapping (the
    mapping adjusted for fusion, checked against prepare's, the per-node qconfigs checked against the
    observed ones), without its deep copy of every module: the computation sets `qconfig` on the modules it
    visits, and the prepare-time values are put back instead. `attrs`: the prepared model's
    ObservedGraphModuleAttrs."""
    mapping = copy.deepcopy(convert_mapping)
    _update_qconfig_for_fusion(prepared, mapping)
    check_convert_mapping(attrs.qconfig_mapping, mapping)
    modules = dict(prepared.named_modules(remove_duplicate=False))
    missing = object()
    before = {name: module.__dict__.get("qconfig", missing) for name, module in modules.items()}
    try:
        found = _generate_node_name_to_qconfig(prepared, modules, prepared.graph, mapping, node_name_to_scope)
    finally:
        for name, module in modules.items():
            if before[name] is missing:
                module.__dict__.pop("qconfig", None)
            else:
                module.__dict__["qconfig"] = before[name]
    for name, observed in attrs.node_name_to_qconfig.items():  # convert_fx's per-node check
        if name not in found:
            raise RuntimeError(f"convert: node {name} of the prepared model has no convert-time qconfig")
        if found[name] is not None and not qconfig_equals(observed, found[name]):
            raise ConfigError(
                f"convert: node {name} was observed with {_describe(observed)} but the convert-time mapping gives "
                f"it {_describe(found[name])}; a skip-list may only set qconfigs to None (a different qconfig "
                f"needs a new calibration)."
            )
    return found


def check_specs(backend: BackendSpec, mapping: QConfigMappingSpec, skip: SkipSpec) -> None:
    """Resolve every name and import path of the mapping and skip-list (raises ConfigError)."""
    build_qconfig_mapping(mapping, backend)
    for i, path in enumerate(skip.object_type):
        resolve_import(path, f"skip.object_type[{i}]")
    for i, pattern in enumerate(skip.module_name_regex):
        _check_regex(pattern, f"skip.module_name_regex[{i}]")
    for i, entry in enumerate(skip.module_name_object_type_order):
        resolve_import(entry.object_type, f"skip.module_name_object_type_order[{i}].object_type")
