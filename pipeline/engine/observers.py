"""Observers: the activation range each engine's int8 kernels take, range-choosing activation observers
beyond torch's (percentile, MSE-minimising), and observers that record a clamped range (for conv /
linear outputs that feed only ReLU6 / hardtanh), with the pass that puts them into a freshly prepared
model."""

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


class PercentileObserver(HistogramObserver):
    """A histogram observer whose range is the [100 - p, p] percentile interval of what it saw (p =
    `percentile`, e.g. 99.99), instead of the histogram's L2 search: drops rare outliers outright. The
    lower end stays the minimum when that is >= 0 (after ReLU). State: the histogram buffers."""

    def __init__(self, percentile: float = 99.99, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        histogram = self.histogram.double()
        total = histogram.sum()
        if total <= 0:
            return self.min_val, self.max_val
        width = (self.max_val - self.min_val) / self.bins
        cdf = histogram.cumsum(0) / total
        target = torch.tensor(self.percentile / 100.0, dtype=cdf.dtype)
        upper = min(int(torch.searchsorted(cdf, target)), self.bins - 1)
        new_max = self.min_val + width * (upper + 1)
        new_min = self.min_val
        if self.min_val < 0:
            lower = int(torch.searchsorted(cdf, torch.tensor(1.0 - self.percentile / 100.0, dtype=cdf.dtype)))
            new_min = self.min_val + width * min(lower, upper)
        return new_min, torch.maximum(new_max, new_min + width)

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, {super().extra_repr()}"


class MSEObserver(HistogramObserver):
    """A histogram observer whose range minimises the expected squared quantization error over the recorded
    histogram (uniform rounding error inside the range, clipping error outside it), by a grid search over
    `grid` candidate ends per side, each a fraction of the observed minimum / maximum. The histogram is
    pooled to 256 bins for the search. State: the histogram buffers."""

    def __init__(self, grid: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.grid = grid

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        histogram = self.histogram.double()
        if histogram.sum() <= 0 or self.max_val <= self.min_val:
            return self.min_val, self.max_val
        pooled = 256 if self.bins % 256 == 0 else self.bins
        histogram = histogram.reshape(pooled, -1).sum(1)
        low, high = float(self.min_val), float(self.max_val)
        width = (high - low) / pooled
        centers = low + width * (torch.arange(pooled, dtype=torch.float64) + 0.5)
        fractions = torch.linspace(1.0 / self.grid, 1.0, self.grid, dtype=torch.float64)
        highs = fractions * high if high > 0 else torch.tensor([high], dtype=torch.float64)
        lows = fractions * low if low < 0 else torch.tensor([low], dtype=torch.float64)
        a = lows.clamp(max=0.0)[:, None, None]  # [L, 1, 1]: the range always holds 0
        b = highs.clamp(min=0.0)[None, :, None]  # [1, H, 1]
        step = (b - a) / float(self.quant_max - self.quant_min)
        clipped = (centers - torch.minimum(torch.maximum(centers, a), b)) ** 2  # [L, H, bins]
        error = ((clipped + (clipped == 0) * step**2 / 12.0) * histogram).sum(-1)  # [L, H]
        i, j = divmod(int(error.argmin()), error.shape[1])
        return (
            torch.tensor(float(lows[i]), dtype=self.min_val.dtype),
            torch.tensor(float(highs[j]), dtype=self.max_val.dtype),
        )

    def extra_repr(self) -> str:
        return f"grid={self.grid}, {super().extra_repr()}"


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


class ClampedPercentileObserver(_ObservesClamped, PercentileObserver):
    """PercentileObserver over the clamped range."""


class ClampedMSEObserver(_ObservesClamped, MSEObserver):
    """MSEObserver over the clamped range."""


_CLAMPED = {
    HistogramObserver: ClampedHistogramObserver,
    MinMaxObserver: ClampedMinMaxObserver,
    PercentileObserver: ClampedPercentileObserver,
    MSEObserver: ClampedMSEObserver,
}


def clamped_qconfig(qconfig: QConfig, clamp_min: float, clamp_max: float, engine: str) -> QConfig:
    """`qconfig` with its activation observer clamping to [clamp_min, clamp_max]: same observer kind and
    arguments (histogram or min-max, 7-bit range...), same weight observer. Meant for output observers
    only (see clamp_bounded_activation_observers)."""
    activation = qconfig.activation
    kind = activation.p.func if hasattr(activation, "p") else activation
    keywords = dict(activation.p.keywords) if hasattr(activation, "p") else {}
    if kind in _CLAMPED:
        clamped: type = _CLAMPED[kind]
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
