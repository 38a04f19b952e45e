"""Accuracy recovery (conf/recovery/): what the engine does beyond choosing observers.

- activation bits by CPU: fbgemm/x86 use 7-bit activations (reduce_range) because their AVX2 int8 dot
  product (vpmaddubsw) saturates 16-bit sums at 8 bits; with VNNI (vpdpbusd, 32-bit sums) 8 bits are exact.
- bounded activations: conv/linear outputs feeding only ReLU6/hardtanh observe the clipped range
  (observers.clamp_bounded_activation_observers), on by default except on qnnpack.
- SmoothQuant: per input channel j of a Linear fed by a LayerNorm or another Linear, divide the
  activation by s_j (folded into the producer's weights) and multiply the Linear's weight column by s_j,
  s_j = max|X_j|^alpha / max|W_j|^(1 - alpha): the float function is unchanged, activation outliers move
  into the weights, which are quantized per channel.
- bias correction: pipeline/engine/bias_correction.py.

Each function works on torch objects; steps.py calls them with the specs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
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
