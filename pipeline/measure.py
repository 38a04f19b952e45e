"""Measurements shared by the stages that score a model (evaluate, search, export): SQNR, accuracy and
agreement against float, serialized size, and latency of each deployable form.

Which form is fastest depends on threads and batch size (one int8 model ran 12x faster frozen at one
thread yet slower frozen at sixteen), so every form is measured and the fastest is recorded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pipeline import metric_keys
from pipeline.batch import ModelInputs
from pipeline.progress import progress
from pipeline.schema import LatencySpec

log = logging.getLogger(__name__)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    noise = (reference - approximation).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the saved state_dict (packed int8 weights included); a lowered GraphModule itself
    cannot be pickled in torch 2.13."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _deployable_forms(model: nn.Module, example: ModelInputs, forms: list[str]) -> dict[str, Callable]:
    """Each form as a callable taking the positional tuple of `example` (tracing takes positionals only).
    A model that names its own form (pt2e's compiled model: `compiled_form = "compiled"`) is its only form."""
    if form := getattr(model, "compiled_form", None):
        return {form: model}
    built: dict[str, Callable] = {}
    if "eager" in forms:
        built["eager"] = model
    if "traced" in forms or "frozen" in forms:
        with torch.no_grad():
            traced = torch.jit.trace(model, example.positional(model), check_trace=False)
        if "traced" in forms:
            built["traced"] = traced
        if "frozen" in forms:
            built["frozen"] = torch.jit.freeze(traced.eval())
    return built


def _time_ms(run: Callable, inputs: tuple, spec: LatencySpec) -> tuple[float, float]:
    with torch.no_grad():
        for _ in range(spec.warmup):
            run(*inputs)
        samples = []
        for _ in range(spec.repeats):
            start = time.perf_counter()
            run(*inputs)
            samples.append((time.perf_counter() - start) * 1000.0)
    samples.sort()
    p90 = samples[min(len(samples) - 1, round(0.9 * (len(samples) - 1)))]
    return statistics.median(samples), p90


def measure_latency(
    models: dict[str, nn.Module], pool: ModelInputs | torch.Tensor, spec: LatencySpec
) -> tuple[dict[str, float], dict[str, str]]:
    """Median and p90 ms per model, form and batch size; the fastest form per model and batch size. Each
    batch is built from `pool` (every input repeated to the batch size), whatever the inputs are."""
    pool = ModelInputs.wrap(pool)
    metrics: dict[str, float] = {}
    fastest: dict[str, str] = {}
    jobs = [(name, size) for name in models for size in spec.batch_sizes]
    with _threads(spec.threads):
        for name, size in progress(jobs, len(jobs), "latency", log):
            inputs = pool.repeat_to(size)
            positional = inputs.positional(models[name])
            best = None
            for form, run in _deployable_forms(models[name], inputs, spec.forms).items():
                median, p90 = _time_ms(run, positional, spec)
                metrics[metric_keys.form_latency_ms(name, form, size, "median")] = median
                metrics[metric_keys.form_latency_ms(name, form, size, "p90")] = p90
                if best is None or median < best[1]:
                    best = (form, median)
            assert best is not None
            metrics[metric_keys.latency_ms(name, size)] = best[1]
            fastest[f"{name}/b{size}"] = best[0]
    for size in spec.batch_sizes:
        float_ms, lowered_ms = metric_keys.latency_ms("float", size), metric_keys.latency_ms("lowered", size)
        if float_ms in metrics and lowered_ms in metrics:
            metrics[metric_keys.speedup(size)] = metrics[float_ms] / metrics[lowered_ms]
    return metrics, fastest


def quality_metrics(
    name: str, outputs: torch.Tensor, float_outputs: torch.Tensor | None, labels: torch.Tensor | None
) -> dict[str, float]:
    """accuracy (with labels), and SQNR and argmax agreement against float (for a model other than float)."""
    metrics: dict[str, float] = {}
    if labels is not None:
        metrics[metric_keys.eval_metric(name, metric_keys.ACCURACY)] = (
            (outputs.argmax(1) == labels).float().mean().item()
        )
    if name != "float" and float_outputs is not None:
        metrics[metric_keys.eval_metric(name, metric_keys.SQNR_DB)] = sqnr_db(float_outputs, outputs)
        agreement = (outputs.argmax(1) == float_outputs.argmax(1)).float().mean().item()
        metrics[metric_keys.eval_metric(name, metric_keys.AGREEMENT)] = agreement
    return metrics
