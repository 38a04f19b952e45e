"""Stage `evaluate`: task metric, SQNR and agreement against float, serialized size, and latency of
each deployable form (eager GraphModule, TorchScript traced, traced and frozen).

Which form is fastest depends on threads and batch size (one int8 model ran 12x faster frozen at one
thread yet slower frozen at sixteen), so every form is measured and the fastest is recorded.

Config keys read: evaluate.models, evaluate.max_batches, evaluate.latency.*, backend.engine.
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

from pipeline.engine.qconfigs import quantized_engine
from pipeline.schema import EvaluateSpec, LatencySpec
from stages.types import EvaluationReport, Loaded, progress

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


def _deployable_forms(model: nn.Module, example: torch.Tensor, forms: list[str]) -> dict[str, Callable]:
    built: dict[str, Callable] = {}
    if "eager" in forms:
        built["eager"] = model
    if "traced" in forms or "frozen" in forms:
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        if "traced" in forms:
            built["traced"] = traced
        if "frozen" in forms:
            built["frozen"] = torch.jit.freeze(traced.eval())
    return built


def _time_ms(run: Callable, inputs: torch.Tensor, spec: LatencySpec) -> tuple[float, float]:
    with torch.no_grad():
        for _ in range(spec.warmup):
            run(inputs)
        samples = []
        for _ in range(spec.repeats):
            start = time.perf_counter()
            run(inputs)
            samples.append((time.perf_counter() - start) * 1000.0)
    samples.sort()
    p90 = samples[min(len(samples) - 1, round(0.9 * (len(samples) - 1)))]
    return statistics.median(samples), p90


def _batch_of(pool: torch.Tensor, size: int) -> torch.Tensor:
    repeats = -(-size // pool.shape[0])
    return pool.repeat(repeats, *([1] * (pool.dim() - 1)))[:size].contiguous()


def measure_latency(
    models: dict[str, nn.Module], pool: torch.Tensor, spec: LatencySpec
) -> tuple[dict[str, float], dict[str, str]]:
    """Median and p90 ms per model, form and batch size; the fastest form per model and batch size."""
    metrics: dict[str, float] = {}
    fastest: dict[str, str] = {}
    jobs = [(name, size) for name in models for size in spec.batch_sizes]
    with _threads(spec.threads):
        for name, size in progress(jobs, len(jobs), "latency", log):
            inputs = _batch_of(pool, size)
            best = None
            for form, run in _deployable_forms(models[name], inputs, spec.forms).items():
                median, p90 = _time_ms(run, inputs, spec)
                metrics[f"latency/{name}/{form}/b{size}_median_ms"] = median
                metrics[f"latency/{name}/{form}/b{size}_p90_ms"] = p90
                if best is None or median < best[1]:
                    best = (form, median)
            assert best is not None
            metrics[f"latency/{name}/b{size}_ms"] = best[1]
            fastest[f"{name}/b{size}"] = best[0]
    for size in spec.batch_sizes:
        if f"latency/float/b{size}_ms" in metrics and f"latency/lowered/b{size}_ms" in metrics:
            metrics[f"latency/speedup_b{size}"] = (
                metrics[f"latency/float/b{size}_ms"] / metrics[f"latency/lowered/b{size}_ms"]
            )
    return metrics, fastest


def evaluate(
    loaded: Loaded,
    candidates: dict[str, nn.Module],
    engine: str,
    spec: EvaluateSpec,
) -> EvaluationReport:
    """`candidates` maps 'reference' and 'lowered' to models when those stages ran; float is loaded's."""
    models = {"float": loaded.model, **candidates}
    models = {name: model for name, model in models.items() if name in spec.models}
    batches = loaded.data.evaluation[: spec.max_batches]
    if not batches:
        raise ValueError(
            "evaluate: the evaluation data is empty; check data.* (evaluation size) and evaluate.max_batches."
        )
    metrics: dict[str, float] = {}
    with quantized_engine(engine), torch.no_grad():
        outputs = {name: torch.cat([model(inputs) for inputs, _ in batches]) for name, model in models.items()}
        labels = torch.cat([label for _, label in batches]) if loaded.has_accuracy else None
        float_predictions = outputs["float"].argmax(1) if "float" in outputs else None
        for name, logits in outputs.items():
            if labels is not None:
                metrics[f"eval/{name}/accuracy"] = (logits.argmax(1) == labels).float().mean().item()
            if name != "float" and "float" in outputs:
                metrics[f"eval/{name}/sqnr_db"] = sqnr_db(outputs["float"], logits)
                metrics[f"eval/{name}/agreement"] = (logits.argmax(1) == float_predictions).float().mean().item()
        if "eval/lowered/accuracy" in metrics and "eval/float/accuracy" in metrics:
            metrics["eval/accuracy_delta"] = metrics["eval/lowered/accuracy"] - metrics["eval/float/accuracy"]
        metrics["eval/samples"] = float(sum(int(inputs.shape[0]) for inputs, _ in batches))

        if "lowered" in models:
            metrics["size/float_bytes"] = float(serialized_bytes(loaded.model))
            metrics["size/lowered_bytes"] = float(serialized_bytes(models["lowered"]))
            metrics["size/ratio"] = metrics["size/lowered_bytes"] / metrics["size/float_bytes"]

        fastest: dict[str, str] = {}
        if spec.latency.enabled:
            deployable = {name: model for name, model in models.items() if name != "reference"}
            pool = torch.cat([inputs for inputs, _ in batches])
            latency, fastest = measure_latency(deployable, pool, spec.latency)
            metrics.update(latency)
    return EvaluationReport(metrics=metrics, fastest_form=fastest)
