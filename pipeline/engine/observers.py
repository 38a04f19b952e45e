"""Observers: the activation range each engine's int8 kernels take, and observers that record a
clamped range (for conv / linear outputs that feed only ReLU6 / hardtanh), with the pass that puts
them into a freshly prepared model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.ao.quantization import HistogramObserver, MinMaxObserver, QConfig
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.fx.tracer import QuantizationTracer
from torch.ao.quantization.fx.utils import get_skipped_module_name_and_classes
from torch.fx import GraphModule

# fbgemm and x86 kernels (without VNNI) can overflow on 8-bit activations, so their activations use
# 7 bits, as torch's own defaults do (reduce_range).


def activation_range(engine: str) -> dict[str, int]:
    return {"quant_min": 0, "quant_max": 127} if engine in ("fbgemm", "x86") else {"quant_min": 0, "quant_max": 255}


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
        clamped, keywords = ClampedMinMaxObserver, {"dtype": torch.quint8, **activation_range(engine)}
    return QConfig(
        activation=clamped.with_args(clamp_min=clamp_min, clamp_max=clamp_max, **keywords), weight=qconfig.weight
    )


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
