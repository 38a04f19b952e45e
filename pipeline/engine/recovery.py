"""Accuracy recovery (conf/recovery/): what the engine does beyond choosing observers.

- activation bits by CPU: fbgemm/x86 use 7-bit activations (reduce_range) because their AVX2 int8 dot
  product (vpmaddubsw) saturates 16-bit sums at 8 bits; with VNNI (vpdpbusd, 32-bit sums) 8 bits are exact.
- bounded activations: conv/linear outputs feeding only ReLU6/hardtanh observe the clipped range
  (observers.clamp_bounded_activation_observers), on by default except on qnnpack.
- SmoothQuant: per input channel j of a Linear fed by a LayerNorm or another Linear, divide the
  activation by s_j (folded into the producer's weights) and multiply the Linear's weight column by s_j,
  s_j = max|X_j|^alpha / max|W_j|^(1 - alpha): the float function is unchanged, activation outliers move
  into the weights, which are quantized per channel.
- bias correction: after the reference convert, each int8 conv/linear's bias is shifted by the mean
  difference per output channel between the float layer's output and the quantized model's, on
  calibration data, in graph order, so each correction sees the corrected layers before it.

Each function works on torch objects; steps.py calls them with the specs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.observer import FixedQParamsObserver, UniformQuantizationObserverBase

from pipeline.batch import ModelInputs
from pipeline.schema import RecoverySpec

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Activation bits


def has_vnni() -> bool:
    """The CPU has AVX512-VNNI or AVX-VNNI (int8 dot products into 32-bit sums, no 16-bit saturation)."""
    return bool(torch.cpu._is_vnni_supported())


def activation_bits(recovery: RecoverySpec | None, engine: str) -> int | None:
    """The uint8 activation bit width to use (None: leave the qconfigs as the library builds them)."""
    if recovery is None:
        return None
    choice = str(recovery.activation_bits)
    if choice in ("7", "8"):
        return int(choice)
    return 7 if engine in ("fbgemm", "x86") and not has_vnni() else 8


def _qconfig_with_bits(qconfig: Any, bits: int) -> Any:
    """`qconfig` with its uint8 activation observer at `bits` bits; any other qconfig unchanged."""
    if not isinstance(qconfig, QConfig):
        return qconfig
    partial = getattr(qconfig.activation, "p", None)
    kind = getattr(partial, "func", None)
    if not isinstance(kind, type) or not issubclass(kind, UniformQuantizationObserverBase):
        return qconfig
    if issubclass(kind, FixedQParamsObserver):
        return qconfig
    keywords = dict(partial.keywords)
    if keywords.get("dtype", torch.quint8) != torch.quint8 or keywords.get("is_dynamic", False):
        return qconfig
    if "quant_min" in keywords or "quant_max" in keywords:
        keywords.pop("reduce_range", None)
        keywords["quant_min"], keywords["quant_max"] = 0, 2**bits - 1
    else:
        keywords["reduce_range"] = bits == 7
    activation = kind.with_args(*partial.args, **keywords)
    return QConfig(activation=activation, weight=qconfig.weight)


def set_activation_bits(mapping: QConfigMapping, bits: int) -> QConfigMapping:
    """Every uint8 activation observer of `mapping` at `bits` bits (in place; returns the mapping). Fixed-qparams
    (sigmoid, softmax...), dynamic and non-uint8 qconfigs are left alone."""
    mapping.global_qconfig = _qconfig_with_bits(mapping.global_qconfig, bits)
    for table in (
        mapping.object_type_qconfigs,
        mapping.module_name_regex_qconfigs,
        mapping.module_name_qconfigs,
        mapping.module_name_object_type_order_qconfigs,
    ):
        for key, qconfig in list(table.items()):
            table[key] = _qconfig_with_bits(qconfig, bits)
    return mapping


# --------------------------------------------------------------------------------------------------
# Bounded activations


def clamps_bounded(recovery: RecoverySpec | None, engine: str) -> bool:
    """Whether recovery clamps the observers of outputs feeding ReLU6/hardtanh on `engine`."""
    if recovery is None or recovery.bounded_activations == "off":
        return False
    if recovery.bounded_activations == "on":
        return True
    return engine != "qnnpack"  # qnnpack's quantized ReLU6 on conv outputs is wrong regardless (TORCH_FACTS)


# --------------------------------------------------------------------------------------------------
# Calibration inputs


def _call(model: nn.Module, inputs: Any) -> Any:
    return ModelInputs.wrap(inputs).call(model)


def _first_samples(batches: Sequence[Any], limit: int) -> ModelInputs:
    """The first `limit` samples of the batches as one batch (each input concatenated)."""
    taken, count = [], 0
    for batch in batches:
        taken.append(ModelInputs.wrap(batch))
        count += taken[-1].batch_size
        if count >= limit:
            break
    return ModelInputs.cat(taken)[:limit]


# --------------------------------------------------------------------------------------------------
# SmoothQuant


def _smoothable_groups(model: nn.Module, tracer: torch.fx.Tracer) -> list[tuple[str, list[str]]]:
    """(producer, consumers): a LayerNorm (with affine weights) or Linear module whose output goes only into
    Linear modules as their input (a Linear producer may pass through one ReLU first, which commutes with a
    positive scale). Every module involved is called exactly once in the traced graph."""
    graph = tracer.trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1

    def module_of(node: torch.fx.Node) -> nn.Module | None:
        return modules.get(str(node.target)) if node.op == "call_module" else None

    groups = []
    for node in graph.nodes:
        producer = module_of(node)
        is_norm = isinstance(producer, nn.LayerNorm) and producer.elementwise_affine and producer.bias is not None
        if not (is_norm or isinstance(producer, nn.Linear)) or calls[str(node.target)] != 1:
            continue
        output = node
        if isinstance(producer, nn.Linear) and len(node.users) == 1:
            (user,) = node.users
            if isinstance(module_of(user), nn.ReLU) or (user.op == "call_function" and user.target is torch.relu):
                output = user
        consumers = []
        for user in output.users:
            if _reads_shape_only(user):
                continue
            consumer = module_of(user)
            if not isinstance(consumer, nn.Linear) or calls[str(user.target)] != 1 or user.args[0] is not output:
                break
            consumers.append(str(user.target))
        else:
            if consumers:
                groups.append((str(node.target), consumers))
    return groups


def _reads_shape_only(node: torch.fx.Node) -> bool:
    """`x.shape`, `x.size()`, `x.dim()`: uses of a tensor that a per-channel scale does not change."""
    import operator

    if node.op == "call_function" and node.target in (getattr, operator.getitem) and len(node.args) > 1:
        return node.target is getattr and node.args[1] in ("shape", "ndim", "dtype", "device")
    return node.op == "call_method" and node.target in ("size", "dim")


@torch.no_grad()
def smooth_quant(
    model: nn.Module, batches: Sequence[Any], alpha: float, tracer: torch.fx.Tracer
) -> tuple[nn.Module, dict[str, float]]:
    """A SmoothQuant-ed copy of `model` (the input stays untouched) and, per producer, the largest scale it
    divided by. If the copy's outputs on the first batch differ from the model's by more than 1e-5 relative,
    the model is returned unchanged with an empty report."""
    smoothed = copy.deepcopy(model).eval()
    try:
        groups = _smoothable_groups(smoothed, tracer)
    except Exception as error:  # an untraceable model: prepare reports it properly right after
        log.debug("SmoothQuant: tracing failed (%s); nothing smoothed", error)
        return model, {}
    if not groups:
        return model, {}
    modules = dict(smoothed.named_modules())
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(0)
            maxima[name] = x if name not in maxima else torch.maximum(maxima[name], x)

        return hook

    hooks = [modules[consumers[0]].register_forward_pre_hook(record(producer)) for producer, consumers in groups]
    try:
        for batch in batches:
            _call(smoothed, batch)
    finally:
        for hook in hooks:
            hook.remove()
    report = {}
    for producer_name, consumer_names in groups:
        consumers = [modules[name] for name in consumer_names]
        weight_max = torch.stack([c.weight.abs().amax(0) for c in consumers]).amax(0)
        act_max = maxima[producer_name]
        scales = (act_max.clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)).clamp(1e-5, 1e5)
        scales = torch.where((act_max > 0) & (weight_max > 0), scales, torch.ones_like(scales))
        producer = modules[producer_name]
        if isinstance(producer, nn.LayerNorm):
            producer.weight /= scales
            producer.bias /= scales
        else:
            producer.weight /= scales[:, None]
            if producer.bias is not None:
                producer.bias /= scales
        for consumer in consumers:
            consumer.weight *= scales[None, :]
        report[producer_name] = float(scales.max())
    first = batches[0]
    before, after = _call(model, first), _call(smoothed, first)
    change = float((after - before).abs().max() / before.abs().max().clamp(min=1e-12))
    if change > 1e-5:
        log.warning(
            "recovery.smoothquant_alpha=%g: the smoothed model's outputs differ from float by %.2e (relative, "
            "more than 1e-5); SmoothQuant is not applied",
            alpha,
            change,
        )
        return model, {}
    return smoothed, report


# --------------------------------------------------------------------------------------------------
# Bias correction

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _channel_means(output: torch.Tensor, linear: bool) -> torch.Tensor:
    """Per output channel (the last dim of a linear's output, dim 1 of a conv's), the mean over every other
    dim: reduced in place, no transposed copy of the activation."""
    if linear:
        return output.reshape(-1, output.shape[-1]).mean(0)
    return output.mean(dim=[d for d in range(output.dim()) if d != 1])


@contextlib.contextmanager
def observers_bypassed(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every observer a pass-through and every fake-quant's observer off, restored after: a
    prepared model runs its float function without touching its calibration state (and without the cost of
    the observers' statistics), no copy made. An observer's forward returns its input unchanged, so the
    outputs are those of running the model itself."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    bypassed: list[nn.Module] = []
    observing: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        for module in model.modules():
            if isinstance(module, FakeQuantizeBase):
                observing.append((module, module.observer_enabled.clone()))
                module.disable_observer()
            elif isinstance(module, ObserverBase) and "forward" not in vars(module):
                module.forward = _identity  # type: ignore[method-assign]
                bypassed.append(module)
        yield model
    finally:
        for module in bypassed:
            del module.forward
        for module, enabled in observing:
            module.observer_enabled.copy_(enabled)


def _identity(x: Any) -> Any:
    return x


# The float pass's per-channel means, kept on the prepared model (GraphModule.meta) under this key with the
# digests of the calibration batches they were taken on: the calibration records them as it runs
# (FloatMeansRecorder), and a bias correction on the same samples (reference_convert, the search's trials,
# diagnose's verifications) reads them instead of running the float model over the samples again.
FLOAT_MEANS = "pipeline_bias_correction_float_means"


def _batch_digest(batch: Any) -> str:
    from pipeline.digest import tensor_digest

    digest = hashlib.sha256(b"bias-correction-batch")
    for name, tensor in ModelInputs.wrap(batch).named():
        digest.update(name.encode())
        tensor_digest(digest, tensor)
    return digest.hexdigest()


def _whole_batch_digests(batches: Sequence[Any], limit: int) -> tuple[str, ...] | None:
    """Digests of the batches holding the first `limit` samples, or None when `limit` ends inside a batch
    (its samples' means are then not those of whole batches)."""
    digests, count = [], 0
    for batch in batches:
        size = ModelInputs.wrap(batch).batch_size
        if count + size > limit:
            return None
        digests.append(_batch_digest(batch))
        count += size
        if count == limit:
            break
    return tuple(digests)


def _channel_sums(output: torch.Tensor, linear: bool) -> torch.Tensor:
    dims = list(range(output.dim() - 1)) if linear else [d for d in range(output.dim()) if d != 1]
    return output.sum(dim=dims, dtype=torch.float64)


class FloatMeansRecorder:
    """Around a calibration of `prepared`: per conv/linear module, the per-channel mean of its output (first
    call per forward) over the first `samples` samples, kept in prepared.meta[FLOAT_MEANS] by keep() when
    those samples are whole batches. Call `batch(inputs)` before each calibration forward, close() always."""

    def __init__(self, prepared: nn.Module, samples: int) -> None:
        self.prepared, self.limit = prepared, samples
        self.digests: list[str] = []
        self.count, self.recording, self.cut = 0, True, False
        self.sums: dict[str, torch.Tensor] = {}
        self.elements: dict[str, int] = {}
        self.seen: set[str] = set()
        self.hooks = [
            module.register_forward_hook(self._hook(name, isinstance(module, nn.Linear)))
            for name, module in prepared.named_modules()
            if isinstance(module, _WEIGHTED)
        ]

    def _hook(self, name: str, linear: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.recording or name in self.seen or not isinstance(output, torch.Tensor):
                return
            self.seen.add(name)
            sums = _channel_sums(output.detach(), linear)
            self.sums[name] = sums if name not in self.sums else self.sums[name] + sums
            self.elements[name] = self.elements.get(name, 0) + output.numel() // sums.numel()

        return hook

    def batch(self, inputs: Any) -> None:
        self.seen = set()
        if not self.recording:
            return
        size = ModelInputs.wrap(inputs).batch_size
        if self.count >= self.limit or self.count + size > self.limit:
            self.recording, self.cut = False, self.count < self.limit
            return
        self.digests.append(_batch_digest(inputs))
        self.count += size

    def close(self) -> None:
        """Remove the hooks (also after a failed calibration: nothing is kept then)."""
        for hook in self.hooks:
            hook.remove()

    def keep(self) -> None:
        """After the calibration ran through: the means into prepared.meta, unless a batch straddled the limit."""
        self.close()
        if self.cut or not self.digests or not hasattr(self.prepared, "meta"):
            return
        means = {name: (self.sums[name] / self.elements[name]).float() for name in self.sums}
        self.prepared.meta[FLOAT_MEANS] = (tuple(self.digests), means)


def _float_means(prepared: nn.Module, batches: Sequence[Any], samples: int) -> dict[str, torch.Tensor] | None:
    """The means recorded for these samples (by the calibration or an earlier correction), or None. The
    batches' digests say which samples they were taken on."""
    kept = getattr(prepared, "meta", {}).get(FLOAT_MEANS)
    if kept is None:
        return None
    digests, means = kept
    return means if _whole_batch_digests(batches, samples) == digests else None


def _float_pass(prepared: nn.Module, inputs: ModelInputs) -> dict[str, torch.Tensor]:
    """Per conv/linear module of the prepared model, the per-channel mean of its output (first call) on
    `inputs`: the prepared model run once with its observers bypassed. Every such module, not only those a
    skip-list leaves quantized, so a later correction with another skip-list finds its layers here."""
    targets: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in prepared.named_modules():
        if not isinstance(module, _WEIGHTED):
            continue
        linear = isinstance(module, nn.Linear)

        def keep(twin: nn.Module, args: Any, output: torch.Tensor, name: str = name, linear: bool = linear) -> None:
            if name not in targets:
                targets[name] = _channel_means(output, linear)

        hooks.append(module.register_forward_hook(keep))
    try:
        with observers_bypassed(prepared):
            _call(prepared, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return targets


@torch.no_grad()
def correct_bias(reference: nn.Module, prepared: nn.Module, batches: Sequence[Any], samples: int) -> dict[str, float]:
    """Shift the bias of each quantized conv/linear of the reference model (in place) by the per-channel mean
    of (float output - quantized output) on the first `samples` calibration samples, in graph order: the
    samples run through the reference model once as one batch, and each layer's correction is applied
    before the layers after it see its output. The float outputs come from the calibrated (prepared)
    model's same-named modules, whose BatchNorms are folded like the reference model's: recorded by the
    calibration (FloatMeansRecorder) or an earlier correction on the same samples when their batches'
    digests match, else one pass of the prepared model with its observers bypassed (observers_bypassed), so
    its calibration state is untouched. Returns the mean absolute shift per corrected layer."""
    from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule

    inputs = _first_samples(batches, samples)
    quantized = {
        name: module
        for name, module in reference.named_modules()
        if isinstance(module, ReferenceQuantizedModule) and isinstance(module, _WEIGHTED)
    }
    float_modules = dict(prepared.named_modules())
    recorded = _float_means(prepared, batches, samples)
    targets = dict(recorded) if recorded is not None else _float_pass(prepared, inputs)
    if recorded is None and hasattr(prepared, "meta") and (digests := _whole_batch_digests(batches, samples)):
        prepared.meta[FLOAT_MEANS] = (digests, targets)  # for the next correction on these samples
    shifts: dict[str, float] = {}

    def correct(name: str, linear: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            if name in shifts:  # a module called twice: corrected on its first call only
                return None
            shift = targets[name] - _channel_means(output, linear)
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros_like(shift))
            module.bias += shift
            shifts[name] = float(shift.abs().mean())
            shape = [1] * output.dim()
            shape[-1 if linear else 1] = -1
            output += shift.reshape(shape)  # the layers after see the corrected output (in place, no copy)
            return None

        return hook

    hooks = [
        module.register_forward_hook(correct(name, isinstance(module, nn.Linear)))
        for name, module in quantized.items()
        if name in targets and isinstance(float_modules.get(name), _WEIGHTED)
    ]
    try:
        _call(reference, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return shifts
