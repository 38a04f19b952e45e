"""What a prepared model's names are and what each skip / mapping entry matches: the inspect stage's
listing, and the per-entry "matches nothing" lines reference_convert warns with."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.fx.qconfig_mapping_utils import _generate_node_name_to_qconfig, _update_qconfig_for_fusion
from torch.fx import GraphModule

from pipeline.engine.qconfigs import QCONFIG_LIBRARY, import_path, resolve_import
from pipeline.errors import closest
from pipeline.schema import BackendSpec, QConfigMappingSpec, SkipSpec


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
    with contextlib.suppress(LookupError):  # an entry for a fusion partner alone (ReLU of LinearReLU)
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


def mapping_entry_nodes(
    prepared: GraphModule,
    mapping_spec: QConfigMappingSpec,
    backend: BackendSpec,
    node_name_to_qconfig: dict[str, Any],
) -> list[tuple[str, list[str]]]:
    """For each entry of the mapping (its own entries, not base or global) that names a qconfig: a readable
    description (key, value, qconfig, its family and the backend config) and the nodes it gives that
    qconfig at convert time. Nodes a skip-list returned to float, or that a more specific entry took
    over, do not count. steps.lower reports an entry none of whose nodes got quantized: the BackendConfig
    has no dtype config for that qconfig on those ops (dynamic int8 on a Conv2d, float16 on onednn)."""
    from torch.ao.quantization.qconfig import qconfig_equals

    from pipeline.engine.mappings import align_fusion_partners, fused_op_types
    from pipeline.engine.qconfigs import QCONFIG_FAMILY, named_qconfig

    fused = fused_op_types(prepared)
    entries: list[tuple[str, str, str, Callable[[QConfigMapping, Any], Any]]] = []
    for i, entry in enumerate(mapping_spec.object_type):
        target = resolve_import(entry.object_type, f"qconfig_mapping.object_type[{i}].object_type")
        entries.append(
            (f"object_type[{i}]", entry.object_type, entry.qconfig, lambda m, q, t=target: m.set_object_type(t, q))
        )
    for i, entry in enumerate(mapping_spec.module_name_regex):
        entries.append(
            (
                f"module_name_regex[{i}]",
                entry.regex,
                entry.qconfig,
                lambda m, q, r=entry.regex: m.set_module_name_regex(r, q),
            )
        )
    for i, entry in enumerate(mapping_spec.module_name):
        entries.append(
            (
                f"module_name[{i}]",
                entry.module_name,
                entry.qconfig,
                lambda m, q, n=entry.module_name: m.set_module_name(n, q),
            )
        )
    for i, entry in enumerate(mapping_spec.module_name_object_type_order):
        target = resolve_import(entry.object_type, f"qconfig_mapping.module_name_object_type_order[{i}].object_type")
        entries.append(
            (
                f"module_name_object_type_order[{i}]",
                f"{entry.module_name} / {entry.object_type} / {entry.index}",
                entry.qconfig,
                lambda m, q, e=entry, t=target: m.set_module_name_object_type_order(e.module_name, t, e.index, q),
            )
        )
    found: list[tuple[str, list[str]]] = []
    for key, value, name, add_entry in entries:
        if name is None:
            continue
        qconfig = named_qconfig(name, backend, f"qconfig_mapping.{key}.qconfig")
        mapping = QConfigMapping()
        add_entry(mapping, qconfig)
        if key.startswith("object_type"):  # as prepare did: the fusion partners (ReLU of LinearReLU) follow
            align_fusion_partners(mapping, fused, set(mapping.object_type_qconfigs))
        asked = [
            node
            for node in _nodes_configured_by(prepared, mapping)
            if node_name_to_qconfig.get(node) is not None and qconfig_equals(node_name_to_qconfig[node], qconfig)
        ]
        if asked:
            resolved = backend.default_qconfig if name == "default" else name
            found.append(
                (
                    f"qconfig_mapping.{key} ({value}: {name}) gives a "
                    f"{QCONFIG_FAMILY.get(resolved, 'static')} qconfig to {{nodes}}, and none was quantized: "
                    f"backend.backend_config='{backend.backend_config}' has no such dtype config for these ops "
                    f"(or the ops have no quantized form), so they run in float.",
                    asked,
                )
            )
    return found


def ignored_entries(entry_nodes: list[tuple[str, list[str]]], node_kinds: dict[str, str]) -> list[str]:
    """The entries of mapping_entry_nodes none of whose nodes is quantized in the lowered model (a node
    the lowering renamed counts as quantized: only what is known to be float is reported)."""
    lines = []
    for description, nodes in entry_nodes:
        if all(node_kinds.get(node, "quantized") == "float" for node in nodes):
            shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
            lines.append(description.replace("{nodes}", f"{len(nodes)} node(s) ({shown})"))
    return lines


def float_io_quantized_ops(model: GraphModule) -> list[str]:
    """The ops of a lowered model that are quantized but take and return float tensors: dynamic int8 and
    float16 Linear, weight-only Embedding (`name (type)`). torch's ONNX exporter has no form for them.
    Empty for a model that is no FX GraphModule (pt2e's compiled q/dq program: static int8 ops only)."""
    if not isinstance(model, GraphModule):
        return []
    modules = dict(model.named_modules())
    found = []
    for node in model.graph.nodes:
        if node.op == "call_module":
            module_type = type(modules[str(node.target)])
            if module_type.__module__.startswith(
                (
                    "torch.ao.nn.quantized.dynamic",
                    "torch.ao.nn.intrinsic.quantized.dynamic",
                    "torch.ao.nn.quantized.modules.embedding_ops",
                )
            ):
                found.append(f"{node.target} ({module_type.__module__}.{module_type.__name__})")
        elif node.op == "call_function":
            op_name = getattr(node.target, "_qualified_op_name", "")
            if op_name.startswith("quantized::") and ("dynamic" in op_name or "embedding" in op_name):
                found.append(f"{node.name} ({op_name})")
    return found
