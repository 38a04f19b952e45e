"""A flat FX graph made nested again: each module call it recorded becomes a GraphModule at that module's
qualified name, so that tracing it again (prepare_fx's QuantizationTracer, the numeric suite) gives every
op the scope of the module it came from.

Hugging Face's FX tracer inlines everything into one graph: its call_module nodes keep their qualified
names (encoder.layer.3.output.dense), but every functional op (the attention matmuls, softmax, residual
adds, GELU) is recorded at the top module's scope. prepare_fx then resolves `module_name` and
`module_name_object_type_order` entries for those ops against the top module only, so an entry for one
layer (`encoder.layer.3`) cannot reach them. The tracer did record, per node, the stack of modules it was
called from (`node.meta["nn_module_stack"]`): `nest_by_module_stack` cuts the graph along that stack into
one GraphModule per module call, installed at the module's own path with its own children (same
parameters, same names), so the nested model computes exactly what the flat one does.

A module call whose nodes are not contiguous, that reads an attribute outside its own module, or whose
module is called more than once, stays inlined in its caller (its ops then have the caller's scope).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

from torch import nn
from torch.fx import Graph, GraphModule, Node


def _stack(node: Node) -> list[tuple[str, str]]:
    """(stack key, module qualified name) of the modules `node` was recorded in, outermost first. A
    call_module node's own module is not part of it: the call happens in its caller's scope."""
    entries = [(str(key), str(value[0])) for key, value in (node.meta.get("nn_module_stack") or {}).items()]
    if node.op == "call_module" and entries and entries[-1][1] == node.target:
        entries = entries[:-1]
    return entries


def _fetch(root: nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), root)


def _under(target: str, prefix: str) -> bool:
    return not prefix or target == prefix or target.startswith(prefix + ".")


def _relative(target: str, prefix: str) -> str:
    return target[len(prefix) + 1 :] if prefix else target


def _region_end(nodes: list[Node], start: int, depth: int, key: str) -> int:
    end = start
    while end < len(nodes) and len(_stack(nodes[end])) > depth and _stack(nodes[end])[depth][0] == key:
        end += 1
    return end


def _can_outline(nodes: list[Node], region: list[Node], depth: int, qualname: str, key: str, taken: set[str]) -> bool:
    """The region is all of the call's nodes, uses only its own module's attributes, and the module's
    path is not taken already (a second call of the same module)."""
    if key != qualname or qualname in taken:
        return False
    inside = set(map(id, region))
    rest = (node for node in nodes if id(node) not in inside)
    if any(len(_stack(node)) > depth and _stack(node)[depth][0] == key for node in rest):
        return False  # not contiguous
    return all(_under(str(node.target), qualname) for node in region if node.op in ("call_module", "get_attr"))


def _build(
    root: nn.Module,
    nodes: list[Node],
    inputs: list[Node],
    outputs: list[Any],
    prefix: str,
    depth: int,
    class_name: str,
    originals: nn.Module,
) -> GraphModule:
    """A GraphModule computing `nodes` (a slice of the flat graph) from `inputs`, returning `outputs`
    (one node, or the flat graph's output value at the top), with call_module/get_attr targets relative
    to `prefix` and each nested module call outlined into its own GraphModule."""
    graph = Graph()
    env: dict[Node, Node] = {node: graph.placeholder(node.name) for node in inputs}
    if depth == 0:  # the top: keep the placeholders' defaults and order
        for node, new in env.items():
            new.args = node.args
    attributes: dict[str, Any] = {}
    taken: set[str] = set()
    index = 0
    while index < len(nodes):
        node = nodes[index]
        stack = _stack(node)
        if len(stack) > depth:
            key, qualname = stack[depth]
            end = _region_end(nodes, index, depth, key)
            region = nodes[index:end]
            if _can_outline(nodes, region, depth, qualname, key, taken):
                members = set(region)
                child_inputs = list(
                    dict.fromkeys(arg for member in region for arg in member.all_input_nodes if arg not in members)
                )
                child_outputs = [member for member in region if any(user not in members for user in member.users)]
                owner = type(originals.get_submodule(qualname)).__name__
                child = _build(root, region, child_inputs, child_outputs, qualname, depth + 1, owner, originals)
                name = _relative(qualname, prefix)
                attributes[name] = child
                taken.add(qualname)
                # Named after the full path, like the leaf calls: a node named `self` (BERT's attention.self)
                # would shadow the generated forward's `self`.
                arguments = tuple(env[arg] for arg in child_inputs)
                call = graph.create_node("call_module", name, arguments, name=qualname.replace(".", "_"))
                if len(child_outputs) == 1:
                    env[child_outputs[0]] = call
                else:
                    for position, output in enumerate(child_outputs):
                        env[output] = graph.call_function(operator.getitem, (call, position))
                index = end
                continue
        copied = graph.node_copy(node, lambda arg: env[arg])
        if node.op in ("call_module", "get_attr"):
            copied.target = _relative(str(node.target), prefix)
            attributes[copied.target] = _fetch(root, str(node.target))
        env[node] = copied
        index += 1
    if depth == 0:
        graph.output(_map(outputs[0], env))
    else:
        values = [env[output] for output in outputs]
        graph.output(values[0] if len(values) == 1 else tuple(values))
    return GraphModule(attributes, graph, class_name)


def _map(value: Any, env: dict[Node, Node]) -> Any:
    from torch.fx.node import map_arg

    return map_arg(value, lambda node: env[node])


def nest_by_module_stack(
    root: nn.Module, graph: Graph, class_name: str, originals: nn.Module | None = None
) -> GraphModule:
    """`graph` (flat, with nn_module_stack recorded; its targets are attributes of `root`, e.g. the flat
    GraphModule the tracer made) as nested GraphModules: the top one holds the top-level ops and one
    submodule per top-level module call, and so on down to the leaf modules (nn.Linear, nn.LayerNorm...),
    which are `root`'s own objects at their own qualified names. Each nested GraphModule's class is named
    after the module it replaces, looked up in `originals` (the traced model; default `root`)."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    (output,) = [node for node in graph.nodes if node.op == "output"]
    body = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
    return _build(root, body, placeholders, [output.args[0]], "", 0, class_name, originals or root)
