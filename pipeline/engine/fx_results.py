"""What the FX engine reads off its models: which module FX could not trace (from the traceback), the
observer state calibration left in a prepared model (what the calibration cache saves and loads), and
what each node of a converted model became (quantized, float or quantize/dequantize glue). engine/fx.py's
`FxEngine` calls these; nothing here imports quantize_fx.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, ObserverBase
from torch.fx import GraphModule
from torch.fx.node import map_aggregate

from pipeline.batch import ModelInputs
from pipeline.engine.base import UntraceableModule
from pipeline.engine.qconfigs import quantized_engine

# --------------------------------------------------------------------------------------------------
# Models FX cannot trace


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


def observer_state_dict(prepared: GraphModule) -> OrderedDict[str, torch.Tensor]:
    """The calibration result alone: every observer's buffers (min/max, histograms), as the state_dict's
    OrderedDict with its `_metadata` (module versions). Not the weights: prepare_fx rebuilds them from the
    float model (for ResNet-18, 47 MB against 0.2 MB of observers)."""
    prefixes = tuple(
        f"{name}." for name, module in prepared.named_modules() if isinstance(module, ObserverBase | FakeQuantizeBase)
    )
    full = prepared.state_dict()
    state: OrderedDict[str, torch.Tensor] = OrderedDict(
        (key, value) for key, value in full.items() if key.startswith(prefixes)
    )
    # Each module's state_dict version travels in _metadata; load_state_dict hands it to the module's
    # _load_from_state_dict, and observers that see no version assume an old layout (torchao's reset eps).
    state._metadata = copy.copy(getattr(full, "_metadata", OrderedDict()))  # type: ignore[attr-defined]
    return state


def load_observer_state(prepared: GraphModule, state: dict[str, torch.Tensor]) -> None:
    """Load observer_state_dict's output into a freshly prepared model; the keys must match exactly."""
    expected = observer_state_dict(prepared).keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"observer keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    prepared.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------------
# What got quantized

_GLUE = {torch.quantize_per_tensor, torch.quantize_per_channel, torch.dequantize, "dequantize"}


def _float_out_quantized_op(model: GraphModule, node: torch.fx.Node) -> bool:
    """A quantized op with float input and output: dynamic int8 / fp16 Linear (torch.ao.nn.quantized.dynamic,
    or quantized::linear_dynamic for functional linear) and weight-only Embedding (quantized::embedding_byte)."""
    if node.op == "call_module":
        return type(model.get_submodule(str(node.target))).__module__.startswith(
            ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
        )
    return node.op == "call_function" and getattr(node.target, "_qualified_op_name", "").startswith("quantized::")


class _OutputKinds(torch.fx.Interpreter):
    """Runs the graph and records, per node, whether it produced a tensor and whether that is one
    quantized tensor: what node_kinds needs from torch.fx.passes.shape_prop.ShapeProp, without its import
    of torch.fx.experimental.symbolic_shapes (sympy: about 1 s, in every run's lower stage)."""

    def __init__(self, module: GraphModule) -> None:
        super().__init__(module)
        self.outputs: dict[str, tuple[bool, bool]] = {}  # node name -> (produced a tensor, a quantized one)

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        found = []  # as ShapeProp: a tensor anywhere in a (nested) tuple, list or dict output counts
        map_aggregate(result, lambda value: found.append(value) if isinstance(value, torch.Tensor) else None)
        self.outputs[n.name] = (bool(found), isinstance(result, torch.Tensor) and result.is_quantized)
        return result


def node_kinds(model: GraphModule, example_inputs: ModelInputs, engine: str) -> dict[str, str]:
    """Each tensor-producing compute node's kind, by what it produces on the example inputs: quantized
    (int8 kernels, ops running on int8 tensors, and dynamic / fp16 / weight-only quantized ops, whose
    input and output are float), float (left in float), or quantize_dequantize glue."""
    interpreter = _OutputKinds(model)
    with quantized_engine(engine), torch.no_grad():
        interpreter.run(*example_inputs.positional(model))
    kinds: dict[str, str] = {}
    for node in model.graph.nodes:
        produced, quantized = interpreter.outputs.get(node.name, (False, False))
        if node.op not in ("call_module", "call_function", "call_method") or not produced:
            continue
        is_glue_module = node.op == "call_module" and type(model.get_submodule(str(node.target))).__name__ in (
            "Quantize",
            "DeQuantize",
        )
        if node.target in _GLUE or is_glue_module:
            kinds[node.name] = "quantize_dequantize"
        elif quantized or _float_out_quantized_op(model, node):
            kinds[node.name] = "quantized"
        else:
            kinds[node.name] = "float"
    return kinds


def count_nodes(model: GraphModule, example_inputs: ModelInputs, engine: str) -> dict[str, int]:
    """node_kinds counted: {'quantized': n, 'float': n, 'quantize_dequantize': n}."""
    counts = {"quantized": 0, "float": 0, "quantize_dequantize": 0}
    for kind in node_kinds(model, example_inputs, engine).values():
        counts[kind] += 1
    return counts
