"""Bias correction (recovery.bias_correction): after the reference convert, before lowering, each int8
conv/linear's bias is shifted by the mean error per output channel that quantization puts into its output.
Two ways, chosen by recovery.bias_correction_method:

- empirical: the first `samples` calibration samples run through the reference model once, as one batch,
  in graph order; each layer's shift is (float output mean - quantized output mean) per channel, applied
  before the layers after it see its output. It corrects what weight and activation rounding and the
  corrected layers before do to the mean, at the cost of one reference-model pass (2.1 s of a 13 s
  default run on the ResNet-18 shape at 224 px, bench/bias_correction.py).
- analytic: the error a layer's quantized weights put into its output mean is (W - W_q) applied to the
  layer's mean input, per input channel (for a conv, the kernel's sum over its window); the input means are
  recorded by the calibration on the way, so it runs no model pass at all (NNCF's fast bias correction
  works from the same statistics). It does not see activation rounding: on the measured models it keeps
  83-99% of the empirical gain.
- auto (the default): empirical when its pass is small (samples x the model's conv/linear multiply-adds per
  sample at most AUTO_EMPIRICAL_MACS), else analytic.

The float statistics (per conv/linear module: the output and input means per channel, the multiply-adds
per sample) come from the calibrated (prepared) model's same-named modules, whose BatchNorms are folded
like the reference model's: recorded by the calibration (FloatMeansRecorder) or kept by an earlier
correction on the same samples when their batches' digests match, else one pass of the prepared model with
its observers bypassed, so its calibration state is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.batch import ModelInputs
from pipeline.engine.recovery import _call, _first_samples

log = logging.getLogger(__name__)

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
METHODS = ("auto", "empirical", "analytic")
# auto's bound on the empirical pass: samples x multiply-adds per sample. 20 G: the digits models, mobile_digits
# and the tiny BERT (<= 0.3 G at 64 samples) stay empirical, the ResNet-18 shape at 224 px (1.8 G a sample,
# 116 G at 64 samples: a 2.1 s pass on 2 cores, AMD EPYC) goes analytic (99% of the empirical gain there).
AUTO_EMPIRICAL_MACS = 20e9
# The float statistics, kept on the prepared model (GraphModule.meta) under this key with the digests of
# the calibration batches they were taken on: the calibration records them as it runs (FloatMeansRecorder),
# and a bias correction on the same samples (reference_convert, the search's trials, diagnose's
# verifications) reads them instead of running the float model over the samples again.
FLOAT_MEANS = "pipeline_bias_correction_float_means"


@dataclass
class FloatStatistics:
    """Per conv/linear module name of the prepared model, on the first samples: its output's and its input's
    mean per channel, and its multiply-adds per sample (all from its first call per forward)."""

    outputs: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    macs_per_sample: float


def _channel_means(output: torch.Tensor, linear: bool) -> torch.Tensor:
    """Per output channel (the last dim of a linear's output, dim 1 of a conv's), the mean over every other
    dim: reduced in place, no transposed copy of the activation."""
    if linear:
        return output.reshape(-1, output.shape[-1]).mean(0)
    return output.mean(dim=[d for d in range(output.dim()) if d != 1])


def _channel_sums(output: torch.Tensor, linear: bool) -> torch.Tensor:
    """Per channel, the batch's sum, in float64 for adding up batches. Summed in the tensor's own dtype
    first: a float64 reduction over every element made the calibration of the ResNet-18 shape 25% slower
    (1.85 against 1.45 s), and one batch's float32 sum is exact to about 1e-6."""
    dims = list(range(output.dim() - 1)) if linear else [d for d in range(output.dim()) if d != 1]
    return output.sum(dim=dims).double()


def _macs_per_sample(module: nn.Module, output: torch.Tensor, batch_size: int) -> float:
    """A conv/linear call's multiply-adds per sample: output elements x weights per output element."""
    weights_per_output = module.weight.numel() / module.weight.shape[0]
    return output.numel() / max(batch_size, 1) * weights_per_output


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


class _StatisticsHooks:
    """Forward hooks on every conv/linear module of `model` summing, per channel, its output and its first
    input (first call per forward, after `forward_starts(batch_size)`), and its multiply-adds per sample."""

    def __init__(self, model: nn.Module) -> None:
        self.output_sums: dict[str, torch.Tensor] = {}
        self.input_sums: dict[str, torch.Tensor] = {}
        self.output_elements: dict[str, int] = {}
        self.input_elements: dict[str, int] = {}
        self.macs: dict[str, float] = {}
        self.seen: set[str] = set()
        self.batch_size = 1
        self.active = True
        self.hooks = [
            module.register_forward_hook(self._hook(name, isinstance(module, nn.Linear)))
            for name, module in model.named_modules()
            if isinstance(module, _WEIGHTED)
        ]

    def forward_starts(self, batch_size: int) -> None:
        self.seen, self.batch_size = set(), batch_size

    def _hook(self, name: str, linear: bool) -> Any:
        def add(sums: dict[str, torch.Tensor], elements: dict[str, int], value: torch.Tensor) -> None:
            found = _channel_sums(value.detach(), linear)
            sums[name] = found if name not in sums else sums[name] + found
            elements[name] = elements.get(name, 0) + value.numel() // found.numel()

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.active or name in self.seen or not isinstance(output, torch.Tensor):
                return
            self.seen.add(name)
            add(self.output_sums, self.output_elements, output)
            if args and isinstance(args[0], torch.Tensor) and not args[0].is_quantized:
                add(self.input_sums, self.input_elements, args[0])
            self.macs[name] = _macs_per_sample(module, output, self.batch_size)

        return hook

    def statistics(self) -> FloatStatistics:
        def means(sums: dict[str, torch.Tensor], elements: dict[str, int]) -> dict[str, torch.Tensor]:
            return {name: (total / elements[name]).float() for name, total in sums.items()}

        return FloatStatistics(
            outputs=means(self.output_sums, self.output_elements),
            inputs=means(self.input_sums, self.input_elements),
            macs_per_sample=sum(self.macs.values()),
        )

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


class FloatMeansRecorder:
    """Around a calibration of `prepared`: the float statistics of its conv/linear modules over the first
    `samples` samples, kept in prepared.meta[FLOAT_MEANS] by keep() when those samples are whole batches.
    Call `batch(inputs)` before each calibration forward, close() always."""

    def __init__(self, prepared: nn.Module, samples: int) -> None:
        self.prepared, self.limit = prepared, samples
        self.digests: list[str] = []
        self.count, self.cut = 0, False
        self.hooks = _StatisticsHooks(prepared)

    def batch(self, inputs: Any) -> None:
        size = ModelInputs.wrap(inputs).batch_size
        self.hooks.forward_starts(size)
        if not self.hooks.active:
            return
        if self.count >= self.limit or self.count + size > self.limit:
            self.hooks.active, self.cut = False, self.count < self.limit
            return
        self.digests.append(_batch_digest(inputs))
        self.count += size

    def close(self) -> None:
        """Remove the hooks (also after a failed calibration: nothing is kept then)."""
        self.hooks.close()

    def keep(self) -> None:
        """After the calibration ran through: the statistics into prepared.meta, unless a batch straddled the
        limit."""
        self.close()
        if self.cut or not self.digests or not hasattr(self.prepared, "meta"):
            return
        self.prepared.meta[FLOAT_MEANS] = (tuple(self.digests), self.hooks.statistics())


def _recorded(prepared: nn.Module, digests: tuple[str, ...] | None) -> FloatStatistics | None:
    """The statistics recorded (by the calibration or an earlier correction) on the samples whose batches have
    these digests, or None."""
    kept = getattr(prepared, "meta", {}).get(FLOAT_MEANS)
    return kept[1] if kept is not None and digests is not None and kept[0] == digests else None


def _float_pass(prepared: nn.Module, inputs: ModelInputs) -> FloatStatistics:
    """The float statistics of every conv/linear module of the prepared model on `inputs`: the prepared
    model run once with its observers bypassed. Every such module, not only those a skip-list leaves
    quantized, so a later correction with another skip-list finds its layers here."""
    hooks = _StatisticsHooks(prepared)
    hooks.forward_starts(inputs.batch_size)
    try:
        with observers_bypassed(prepared):
            _call(prepared, inputs)
    finally:
        hooks.close()
    return hooks.statistics()


def resolve_method(method: str, macs_per_sample: float, samples: int) -> str:
    """The way `method` (recovery.bias_correction_method) corrects a model of `macs_per_sample` on `samples`."""
    if method != "auto":
        return method
    return "empirical" if macs_per_sample * samples <= AUTO_EMPIRICAL_MACS else "analytic"


def _analytic_shift(module: nn.Module, input_mean: torch.Tensor) -> torch.Tensor | None:
    """(W - W_q) applied to a constant input of `input_mean` per channel: the output-mean error per channel the
    quantized weights add (for a conv, away from its padded borders); None when the shapes do not fit."""
    error = module.weight - module.get_weight()
    if isinstance(module, nn.Linear):
        return error @ input_mean if input_mean.numel() == error.shape[1] else None
    if input_mean.numel() != error.shape[1] * module.groups:
        return None
    kernel = error.shape[2:]
    constant = input_mean.reshape(1, -1, *([1] * len(kernel))).expand(1, input_mean.numel(), *kernel)
    convolve = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}[len(kernel)]
    return convolve(constant, error, groups=module.groups).flatten()


def _add_to_bias(module: nn.Module, shift: torch.Tensor) -> None:
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros_like(shift))
    module.bias += shift


@torch.no_grad()
def correct_bias(
    reference: nn.Module, prepared: nn.Module, batches: Sequence[Any], samples: int, method: str = "auto"
) -> dict[str, float]:
    """Shift the bias of each quantized conv/linear of the reference model (in place) on the first `samples`
    calibration samples, the way `method` says (the module's docstring). Returns the mean absolute shift
    per corrected layer."""
    from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule

    count = min(samples, sum(ModelInputs.wrap(batch).batch_size for batch in batches))
    quantized = {
        name: module
        for name, module in reference.named_modules()
        if isinstance(module, ReferenceQuantizedModule) and isinstance(module, _WEIGHTED)
    }
    float_modules = dict(prepared.named_modules())
    digests = _whole_batch_digests(batches, samples)  # which samples: hashed once a correction
    inputs: ModelInputs | None = None  # the samples as one batch, made only for a pass that needs them
    statistics = _recorded(prepared, digests)
    if statistics is None:
        inputs = _first_samples(batches, samples)
        statistics = _float_pass(prepared, inputs)
        if hasattr(prepared, "meta") and digests:
            prepared.meta[FLOAT_MEANS] = (digests, statistics)  # for the next correction on these samples
    chosen = resolve_method(method, statistics.macs_per_sample, count)
    targets = {
        name: module
        for name, module in quantized.items()
        if name in statistics.outputs and isinstance(float_modules.get(name), _WEIGHTED)
    }
    log.info(
        "bias correction: %s (%s; %.2g multiply-adds a sample x %d samples)",
        chosen,
        f"recovery.bias_correction_method={method}",
        statistics.macs_per_sample,
        count,
    )
    shifts: dict[str, float] = {}
    if chosen == "analytic":
        for name, module in targets.items():
            mean = statistics.inputs.get(name)
            shift = _analytic_shift(module, mean) if mean is not None else None
            if shift is not None:
                _add_to_bias(module, shift)
                shifts[name] = float(shift.abs().mean())
        return shifts

    def correct(name: str, linear: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            if name in shifts:  # a module called twice: corrected on its first call only
                return None
            shift = statistics.outputs[name] - _channel_means(output, linear)
            _add_to_bias(module, shift)
            shifts[name] = float(shift.abs().mean())
            shape = [1] * output.dim()
            shape[-1 if linear else 1] = -1
            output += shift.reshape(shape)  # the layers after see the corrected output (in place, no copy)
            return None

        return hook

    hooks = [
        module.register_forward_hook(correct(name, isinstance(module, nn.Linear))) for name, module in targets.items()
    ]
    try:
        _call(reference, inputs if inputs is not None else _first_samples(batches, samples))
    finally:
        for hook in hooks:
            hook.remove()
    return shifts


def statistics_state(prepared: nn.Module) -> dict[str, Any] | None:
    """The float statistics the calibration kept on `prepared`, as plain tensors, strings and numbers (a
    weights_only file), or None: the calibration cache stores them beside the observer state, so a cached
    calibration's bias correction needs no float pass either."""
    kept = getattr(prepared, "meta", {}).get(FLOAT_MEANS)
    if kept is None or not isinstance(kept[1], FloatStatistics):
        return None
    digests, statistics = kept
    return {
        "digests": list(digests),
        "outputs": statistics.outputs,
        "inputs": statistics.inputs,
        "macs_per_sample": statistics.macs_per_sample,
    }


def restore_statistics(prepared: nn.Module, state: dict[str, Any]) -> None:
    """statistics_state's dictionary back onto a freshly prepared model."""
    statistics = FloatStatistics(dict(state["outputs"]), dict(state["inputs"]), float(state["macs_per_sample"]))
    prepared.meta[FLOAT_MEANS] = (tuple(state["digests"]), statistics)
