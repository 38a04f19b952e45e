"""Per-layer numerics by forward hooks on same-named modules of the calibrated (prepared), reference and
lowered models: each layer's cumulative SQNR (its output through the whole int8 network so far), its own
SQNR (the int8 layer alone, on the float model's input to it quantized the way the int8 model quantizes
it), its weight SQNR, and its kernel SQNR (the int8 kernel against its own float simulation, the reference
model's module, on the very same int8 input: a healthy kernel is exact up to rounding, so a low kernel
SQNR is an engine fault, whatever the float model does).

Hooks instead of torch's FX numeric suite: the suite re-traces both models with a tracer whose skipped
module names and classes torch 2.13 hard-codes empty, so it refused models with custom or non-traceable
modules; a hook sees any module the lowered graph calls, custom ones included. The layers compared are
the lowered graph's call_module targets, the names a skip-list's module_name entry configures: never the
top-level model ('').

Where float and int8 are meant to agree: a conv/linear whose output goes only into ReLU6/hardtanh is
compared after that clip (`bounds`): with recovery.bounded_activations its int8 output is clipped by
design, and comparing it with the unclipped float output would blame the layer for what ReLU6 discards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from pipeline.batch import ModelInputs
from pipeline.engine.qconfigs import quantized_engine


@dataclass
class LayerSensitivity:
    module_name: str  # a skip-list's module_name entry
    quantized_type: str
    sqnr_db: float  # of this layer's output, quantized alone on float inputs (no error from earlier layers)
    key: str = ""  # kept for callers that joined tables on it: the module name
    has_weight: bool = True  # a conv/linear (or any module with a weight): what a skip-list can leave float


@dataclass
class LoggedOutput:
    """One module's output through the whole quantized network so far, in execution order."""

    key: str
    module_name: str
    quantized_type: str
    sqnr_db: float  # int8 network vs float network at this module's output: earlier layers' error included
    has_weight: bool
    kernel_sqnr_db: float | None = None  # int8 kernel vs its float simulation on the same int8 input
    quantized: bool = True  # its output is int8 (False: a module left float)


@dataclass
class LayerDiagnostics:
    module_name: str
    quantized_type: str
    own_sqnr_db: float  # quantized alone on float inputs
    cumulative_sqnr_db: float | None  # its output through the whole quantized network so far
    weight_sqnr_db: float | None  # int8 weight vs float weight; None for layers without weights
    kernel_sqnr_db: float | None = None  # int8 kernel vs the reference model's module on the same input
    clipped_to: tuple[float, float] | None = None  # compared after this ReLU6/hardtanh clip
    has_weight: bool = False
    # Own SQNR not measured (pt2e: torchao's numeric debugger compares whole programs node by node):
    # own_sqnr_db then holds the cumulative figure, the one layers are ranked by.
    cumulative_only: bool = False


_GLUE = ("Quantize", "DeQuantize")


@dataclass
class Power:
    """Signal and noise power of one comparison, summed batch by batch: its SQNR is the SQNR of the batches
    joined (up to float rounding), while only one batch is held (diagnose's per-node pt2e figures and its
    verified output SQNRs sum them too)."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, reference: torch.Tensor, approximation: torch.Tensor) -> None:
        reference, approximation = reference.detach().float(), approximation.detach().float()
        self.noise += (reference - approximation).pow(2).sum().item()
        self.signal += reference.pow(2).sum().item()

    @property
    def db(self) -> float:
        if self.noise == 0.0:
            return float("inf")
        if self.signal == 0.0:
            return float("-inf")
        return 10.0 * torch.log10(torch.tensor(self.signal / self.noise)).item()


_Power = Power  # the name tests/test_search_stream.py uses


def as_batches(inputs: ModelInputs | torch.Tensor | Iterable[Any]) -> Iterable[Any]:
    """One batch as a one-batch sequence; batches (any iterable) as they are."""
    return [inputs] if isinstance(inputs, ModelInputs | torch.Tensor) else inputs


def _sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    power = Power()
    power.add(reference, approximation)
    return power.db


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor of a module's output (custom modules may return tuples or dicts)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        return first_tensor(list(value.values()))
    return None


def _float(value: torch.Tensor) -> torch.Tensor:
    return value.dequantize() if value.is_quantized else value


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(item) for item in value)
    if isinstance(value, list):
        return [_clone(item) for item in value]
    return value


def compared_modules(lowered: GraphModule, prepared: nn.Module) -> list[str]:
    """The lowered graph's call_module targets that the prepared model has under the same name (the
    modules a module_name skip entry configures), quantize/dequantize glue left out, in graph order."""
    prepared_names = {name for name, _ in prepared.named_modules(remove_duplicate=False)}
    names: list[str] = []
    for node in lowered.graph.nodes:
        name = str(node.target)
        if node.op != "call_module" or not name or name in names or name not in prepared_names:
            continue
        if type(lowered.get_submodule(name)).__name__ in _GLUE or "activation_post_process" in name:
            continue
        names.append(name)
    return names


@contextmanager
def _recording(model: nn.Module, names: list[str]) -> Iterator[dict[str, tuple[tuple[Any, ...], Any]]]:
    """{name: (args, output)} of each named module's first call while the block runs (cloned: an in-place
    activation after a module must not change what was recorded)."""
    seen: dict[str, tuple[tuple[Any, ...], Any]] = {}
    hooks = []
    for name in names:

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any, name: str = name) -> None:
            if name not in seen:
                seen[name] = (_clone(args), _clone(output))

        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in hooks:
            handle.remove()


@contextmanager
def _without_observers(prepared: GraphModule) -> Iterator[GraphModule]:
    """The calibrated model with its observers (and fake-quants) passing values through without recording
    them, restored on exit: running it as it is would update its observers with whatever it is fed. No copy
    of the model is made."""
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase

    swapped = [
        module
        for module in prepared.modules()
        if isinstance(module, ObserverBase | FakeQuantizeBase) and "forward" not in vars(module)
    ]
    try:
        for module in swapped:
            module.forward = _identity  # type: ignore[method-assign]
        yield prepared
    finally:
        for module in swapped:
            vars(module).pop("forward", None)


def _identity(value: Any) -> Any:
    return value


def _weight(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        try:
            weight = weight()
        except Exception:
            return None
    if isinstance(weight, torch.Tensor):
        return _float(weight)
    if isinstance(module, nn.Sequential) and len(module) and not isinstance(module, GraphModule):
        return _weight(module[0])  # a fused float module (ConvReLU2d, LinearReLU...): its first child
    return None


def _requantized_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (float) quantized with the qparams of the int8 tensor `like` (per-tensor only)."""
    if not like.is_quantized or like.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return value
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        value = value.contiguous(memory_format=torch.channels_last)  # as the int8 model lays it out (qnnpack)
    return torch.quantize_per_tensor(value.float(), like.q_scale(), like.q_zero_point(), like.dtype)


def _clip(value: torch.Tensor, bounds: tuple[float, float] | None) -> torch.Tensor:
    return value if bounds is None else value.clamp(*bounds)


@dataclass
class _Compared:
    """One compared module's figures, accumulated over the batches."""

    kind: str
    clip: tuple[float, float] | None
    quantized: bool
    has_weight: bool
    weight_sqnr_db: float | None
    cumulative: Power = field(default_factory=Power)
    own: Power | None = None  # None: not measurable (no input, or the module refused the float input)
    kernel: Power | None = None  # None: no float simulation to compare the int8 kernel with


def module_numerics(
    prepared: GraphModule,
    lowered: GraphModule,
    inputs: ModelInputs | Iterable[ModelInputs],
    engine: str,
    reference: nn.Module | None = None,
    bounds: dict[str, tuple[float, float]] | None = None,
) -> tuple[list[LayerDiagnostics], list[LoggedOutput]]:
    """Per quantized module (worst own SQNR first) and every compared module in execution order.

    `inputs`: one batch, or batches (any iterable, consumed once): each SQNR sums its signal and noise power
    over the batches, so it equals the SQNR on the batches joined (up to float rounding) while memory holds
    one batch and the activations recorded for it, whatever the number of batches."""
    bounds = bounds or {}
    names = compared_modules(lowered, prepared)
    reference_modules = dict(reference.named_modules()) if reference is not None else {}
    batches = as_batches(inputs)
    compared: dict[str, _Compared] = {}  # execution order of the int8 model (on the first batch)
    with quantized_engine(engine), torch.no_grad():
        for batch in batches:
            batch = ModelInputs.wrap(batch)
            with _recording(lowered, names) as int8_seen:
                batch.call(lowered)
            # Observers bypassed (no copy): the calibration must not learn the evaluation batches.
            with _without_observers(prepared), _recording(prepared, names) as float_seen:
                batch.call(prepared)
            for name in int8_seen:
                if name not in float_seen:
                    continue
                (int8_args, int8_output), (float_args, float_output) = int8_seen[name], float_seen[name]
                int8_out, float_out = first_tensor(int8_output), first_tensor(float_output)
                if int8_out is None or float_out is None or int8_out.shape != float_out.shape:
                    continue
                module = lowered.get_submodule(name)
                figures = compared.get(name)
                if figures is None:
                    figures = compared[name] = _first_seen(name, module, prepared, int8_out, bounds)
                clip = figures.clip
                figures.cumulative.add(_clip(float_out, clip), _clip(_float(int8_out), clip))
                own = _own(module, int8_args, float_args, float_out, clip)
                if own is not None:
                    figures.own = figures.own or Power()
                    figures.own.add(*own)
                kernel = _kernel(reference_modules.get(name), module, int8_args, int8_out)
                if kernel is not None:
                    figures.kernel = figures.kernel or Power()
                    figures.kernel.add(*kernel)
            del int8_seen, float_seen  # this batch's recorded activations, before the next batch's
    logged: list[LoggedOutput] = []
    layers: list[LayerDiagnostics] = []
    for name, figures in compared.items():
        cumulative = figures.cumulative.db
        own_db = figures.own.db if figures.own is not None else None
        kernel_db = figures.kernel.db if figures.kernel is not None else None
        logged.append(
            LoggedOutput(name, name, figures.kind, cumulative, figures.has_weight, kernel_db, figures.quantized)
        )
        # Layers: what a skip-list leaves float (modules with weights, custom modules). Pooling, ReLU6 and
        # the like run on int8 tensors between int8 neighbours: lowering re-quantizes them if skipped.
        module = lowered.get_submodule(name)
        if figures.quantized and (figures.has_weight or not type(module).__module__.startswith("torch.")):
            layers.append(
                LayerDiagnostics(
                    name,
                    figures.kind,
                    cumulative if own_db is None else own_db,
                    cumulative,
                    figures.weight_sqnr_db,
                    kernel_db,
                    figures.clip,
                    figures.has_weight,
                )
            )
    return sorted(layers, key=lambda layer: layer.own_sqnr_db), logged


def _first_seen(
    name: str,
    module: nn.Module,
    prepared: nn.Module,
    int8_out: torch.Tensor,
    bounds: dict[str, tuple[float, float]],
) -> _Compared:
    """What does not change from batch to batch: the module's kind, clip, whether it is int8, its weight SQNR."""
    quantized = int8_out.is_quantized or type(module).__module__.startswith(
        ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
    )
    float_weight, int8_weight = _weight(prepared.get_submodule(name)), _weight(module)
    weight = (
        _sqnr(float_weight, int8_weight)
        if float_weight is not None and int8_weight is not None and float_weight.shape == int8_weight.shape
        else None
    )
    return _Compared(type(module).__name__, bounds.get(name), quantized, int8_weight is not None, weight)


def _own(
    module: nn.Module,
    int8_args: tuple[Any, ...],
    float_args: tuple[Any, ...],
    float_out: torch.Tensor,
    clip: tuple[float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The int8 module on the float model's input to it (quantized with the int8 input's qparams): the float
    output and that output, to compare."""
    if not int8_args or not float_args:
        return None
    args = []
    for int8_arg, float_arg in zip(int8_args, float_args, strict=False):
        if isinstance(int8_arg, torch.Tensor) and isinstance(float_arg, torch.Tensor):
            args.append(_requantized_like(_float(float_arg), int8_arg) if int8_arg.is_quantized else float_arg)
        else:
            args.append(int8_arg)
    try:
        output = first_tensor(module(*args))
    except Exception:
        return None
    if output is None or output.shape != float_out.shape:
        return None
    return _clip(float_out, clip), _clip(_float(output), clip)


def _kernel(
    simulation: nn.Module | None, module: nn.Module, int8_args: tuple[Any, ...], int8_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The int8 module's output against its float simulation (the reference model's module, run on the
    dequantized int8 input and rounded to the output's int8 grid): the simulation and the output, to compare."""
    if simulation is None or not int8_out.is_quantized or simulation is module:
        return None
    kind = type(simulation)
    stateless_float = kind.__module__.startswith("torch.nn.modules")  # ReLU6, hardtanh...: float on both sides
    if kind.__module__.startswith("torch.ao.nn.quantized.modules") or (kind is type(module) and not stateless_float):
        return None  # the same int8 module on both sides (a custom module, or quantized in the reference too)
    try:
        expected = first_tensor(simulation(*(_float(a) if isinstance(a, torch.Tensor) else a for a in int8_args)))
    except Exception:
        return None
    if expected is None or expected.shape != int8_out.shape:
        return None
    return _float(_requantized_like(_float(expected), int8_out)), _float(int8_out)


def consumers(prepared: GraphModule, names: list[str]) -> dict[str, set[str]]:
    """For each named module: the named modules its output reaches through other ops (observers,
    activations, adds, reshapes) without passing another named module."""
    wanted = set(names)
    nodes = {str(node.target): node for node in prepared.graph.nodes if node.op == "call_module"}
    reached: dict[str, set[str]] = {}
    for name in names:
        node = nodes.get(name)
        found: set[str] = set()
        stack = list(node.users) if node is not None else []
        seen: set[Any] = set()
        while stack:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module" and str(user.target) in wanted:
                found.add(str(user.target))
            else:
                stack.extend(user.users)
        reached[name] = found
    return reached


def layer_sensitivity(
    prepared: GraphModule,
    lowered: GraphModule,
    inputs: ModelInputs | Iterable[ModelInputs],
    engine: str,
    bounds: dict[str, tuple[float, float]] | None = None,
) -> list[LayerSensitivity]:
    """Each quantized layer's error, worst first: its own SQNR (the int8 layer on the float model's input,
    so one bad layer does not make every later one look bad), or, when lower, the own SQNR of a layer
    its output feeds. A layer that suffers from its int8 input (an activation outlier produced upstream)
    is only fixed with its producer float too, so the producer ranks with it (what a skip search ranks by).
    `inputs`: one batch or an iterable of batches, accumulated (module_numerics): a search streams its set."""
    layers, _ = module_numerics(prepared, lowered, inputs, engine, None, bounds)
    own = {layer.module_name: layer.own_sqnr_db for layer in layers}
    feeds = consumers(prepared, list(own))
    ranked = []
    for layer in layers:
        downstream = [own[name] for name in feeds.get(layer.module_name, ()) if name in own]
        ranked.append(
            LayerSensitivity(
                layer.module_name,
                layer.quantized_type,
                min([layer.own_sqnr_db, *downstream]),
                layer.module_name,
                layer.has_weight,
            )
        )
    # Ties (a producer and the consumer it hurts): the consumer, whose own SQNR it is, first.
    return sorted(ranked, key=lambda layer: (layer.sqnr_db, own[layer.module_name] != layer.sqnr_db))


def float_outputs(model: GraphModule, names: list[str], inputs: ModelInputs, engine: str) -> dict[str, bool]:
    """For each module name the lowered graph calls: whether its output is float (left float) or int8.
    Names the graph does not call are left out (lowering fused or removed them)."""
    present = [name for name in names if name in compared_modules(model, model)]
    with quantized_engine(engine), torch.no_grad(), _recording(model, present) as seen:
        inputs.call(model)
    result = {}
    for name, (_, output) in seen.items():
        tensor = first_tensor(output)
        if tensor is not None:
            result[name] = not tensor.is_quantized
    return result


def observed_output_ranges(prepared: GraphModule, names: list[str]) -> dict[str, tuple[float, float]]:
    """The calibrated [min, max] of the output observer of each named module (when it has one)."""
    modules = dict(prepared.named_modules(remove_duplicate=False))
    ranges: dict[str, tuple[float, float]] = {}
    wanted = set(names)
    for node in prepared.graph.nodes:
        if node.op != "call_module" or str(node.target) not in wanted:
            continue
        for user in node.users:
            observer = modules.get(str(user.target)) if user.op == "call_module" else None
            low, high = getattr(observer, "min_val", None), getattr(observer, "max_val", None)
            ok = isinstance(low, torch.Tensor) and isinstance(high, torch.Tensor) and low.numel() == 1
            if ok and bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
                ranges[str(node.target)] = (float(low), float(high))
                break
    return ranges
