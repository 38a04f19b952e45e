"""Measurements shared by the stages that score a model (evaluate, search, export): output SQNR, serialized
size, and latency of each deployable form (the quality metrics are pipeline/quality.py).

Which form is fastest depends on threads and batch size (one int8 model ran 12x faster frozen at one
thread yet slower frozen at sixteen), so every form is measured and the fastest is recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    cannot be pickled in torch 2.13. A model that says what it deploys (pt2e's compiled model:
    `deployed_state_dict()`, without the float weights its module still holds) is sized by that."""
    buffer = io.BytesIO()
    deployed = getattr(model, "deployed_state_dict", None)
    torch.save(deployed() if deployed is not None else model.state_dict(), buffer)
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


# Warm-up. torch.compile (pt2e's lowered form) compiles on the first call at each input shape and
# TorchScript's profiling executor optimizes on the second, so the first calls at a batch size can take
# seconds against a steady call of a millisecond. Counted in the budget, a compile used it up (pt2e's b1 on
# experiment=custom_module was timed once, at 0.05x). So every (form, batch size) warms up outside the
# budget: at least `warmup` calls (those beyond the first stop after budget_s / 4, as before), and on until
# two consecutive calls are within WARMUP_RATIO of each other, for at most MAX_WARMUP_CALLS calls or budget_s
# after the first call (the first call, a compile, is never cut).
WARMUP_RATIO = 2.0
MAX_WARMUP_CALLS = 20
WARMUP_LOG_S = 1.0  # a warm-up longer than this is logged (a compile, or a slow model)


@dataclass(frozen=True)
class WarmUp:
    """The untimed calls before a measurement: how many, their seconds, the first and last call's."""

    calls: int
    seconds: float
    first_s: float
    last_s: float
    stable: bool  # the last two calls were within WARMUP_RATIO of each other


def warm_up(run: Callable, inputs: tuple, spec: LatencySpec) -> WarmUp:
    """Untimed calls until at least `spec.warmup` are done (the extra ones within budget_s / 4 of the first
    call's end) and the last two took within WARMUP_RATIO of each other, or MAX_WARMUP_CALLS / budget_s after
    the first call is spent: what a compile or recompile at this input shape needs, outside the budget."""
    began = time.perf_counter()
    durations: list[float] = []
    first_end = began
    stable = False
    while True:
        start = time.perf_counter()
        run(*inputs)
        end = time.perf_counter()
        durations.append(end - start)
        if len(durations) == 1:
            first_end = end
        since_first = end - first_end
        if len(durations) >= 2:
            shorter, longer = sorted(durations[-2:])
            stable = longer <= WARMUP_RATIO * shorter
        counted = len(durations) >= max(1, spec.warmup) or since_first > spec.budget_s / 4.0
        if stable and counted:
            break
        if len(durations) >= MAX_WARMUP_CALLS or since_first > spec.budget_s:
            break
    return WarmUp(len(durations), time.perf_counter() - began, durations[0], durations[-1], stable)


# Adaptive timing. Like torch.utils.benchmark's Timer.adaptive_autorange (which stops on the spread of
# its blocks, IQR/median), but the stop rule is the one the report needs: the median's 95% confidence
# interval (distribution-free, from order statistics) within `target_ci` of the median, or the time budget
# spent. A stable function stops after `repeats` runs; a noisy or slow one gets runs until it knows or
# until `budget_s` is gone, and the interval it reached is reported either way.
MAX_RUNS = 100_000  # a hard stop for a function so fast that the budget allows millions of runs
_Z95 = 1.959963984540054


@dataclass(frozen=True)
class Timing:
    """One (model, form, batch size) measurement in ms: median, p90 and the median's 95% interval."""

    median: float
    p90: float
    ci_low: float
    ci_high: float
    runs: int
    seconds: float  # wall time of the timed runs (the budget's), warm-up excluded
    warm: WarmUp | None = None

    @property
    def relative_half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2.0 / self.median if self.median > 0 else float("inf")


def median_interval(samples: list[float]) -> tuple[float, float]:
    """The median's 95% confidence interval from sorted `samples`: the order statistics j..k with
    P(Bin(n, 1/2) < j) <= 2.5% on each side (exact below 200 samples, the normal approximation above).
    Below 6 samples no pair reaches 95%, and the interval is the whole range."""
    n = len(samples)
    if n < 6:
        return samples[0], samples[-1]
    if n <= 200:
        total, tail, lower = 2.0**n, 0.0, 0
        for count in range(n + 1):
            tail += math.comb(n, count) / total
            if tail > 0.025:
                break
            lower = count + 1  # P(X <= count) <= 2.5%: the (count+1)-th smallest is a valid lower bound
        lower = max(1, lower)
    else:
        lower = max(1, math.floor(n / 2.0 - _Z95 * math.sqrt(n) / 2.0))
    upper = n + 1 - lower
    return samples[lower - 1], samples[upper - 1]


def time_adaptive(run: Callable, inputs: tuple, spec: LatencySpec) -> Timing:
    """Warm up (see warm_up: outside the budget, on until two consecutive calls agree), then time single runs
    until at least `repeats` are in and the median's interval is within `target_ci` of it, or `budget_s`
    is spent (then the interval reached is what is reported)."""
    with torch.no_grad():
        warm = warm_up(run, inputs, spec)
        began = time.perf_counter()
        samples: list[float] = []
        next_check = max(1, spec.repeats)
        while True:
            start = time.perf_counter()
            run(*inputs)
            end = time.perf_counter()
            samples.append((end - start) * 1000.0)
            if len(samples) >= MAX_RUNS or end - began >= spec.budget_s:
                break
            if len(samples) >= next_check:
                ordered = sorted(samples)
                low, high = median_interval(ordered)
                if (high - low) / 2.0 <= spec.target_ci * statistics.median(ordered):
                    break
                next_check = len(samples) + max(1, len(samples) // 10)  # re-sorting costs little this way
    samples.sort()
    low, high = median_interval(samples)
    p90 = samples[min(len(samples) - 1, round(0.9 * (len(samples) - 1)))]
    return Timing(statistics.median(samples), p90, low, high, len(samples), time.perf_counter() - began, warm)


class LatencyCache:
    """Latency figures of one model (the float reference) kept on disk, so a sweep or a search times it
    once: keyed by the model's weights and code, the input shapes and dtypes, the thread count, forms,
    batch sizes and stop rule, the torch version and this machine's CPU. One small JSON file per key in
    <cache.dir>/latency/ (next to the calibration cache; delete the folder to clear it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.hits = 0
        self.misses = 0

    def key(self, model: nn.Module, pool: ModelInputs, spec: LatencySpec) -> str:
        from pipeline.digest import model_code, tensor_digest
        from pipeline.machine import cpu_model

        digest = hashlib.sha256()
        for name, value in sorted(model.state_dict().items()):
            digest.update(name.encode())
            tensor_digest(digest, value)
        digest.update(model_code(model).encode())
        shapes = [(name, str(t.dtype), tuple(t.shape[1:])) for name, t in pool.named()]
        settings = {"shapes": shapes, "latency": asdict(spec), "torch": torch.__version__, "cpu": cpu_model()}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        return digest.hexdigest()[:24]

    def load(self, key: str) -> tuple[dict[str, float], dict[str, str]] | None:
        path = self.directory / f"{key}.json"
        try:
            entry = json.loads(path.read_text())
            found = (dict(entry["metrics"]), dict(entry["fastest"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("latency cache: ignoring unreadable entry %s (%s)", path, error)
            return None
        return found

    def store(self, key: str, metrics: dict[str, float], fastest: dict[str, str]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".tmp-{key}-", dir=self.directory)
        with os.fdopen(handle, "w") as file:
            json.dump({"metrics": metrics, "fastest": fastest, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, file)
        os.replace(temporary, self.directory / f"{key}.json")  # atomic: a reader sees all or nothing


def _measure_model(
    name: str, model: nn.Module, pool: ModelInputs, spec: LatencySpec, built_forms: dict[str, Callable] | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """Every form at the smallest batch size; at larger ones only the form fastest there (every form when
    spec.prune is false): what one form gains over another at batch 1 is per-call overhead, which a larger
    batch amortizes (traced and frozen within 0.3% at batch 32 on the ResNet-18 shape), and each extra form
    at batch 32 cost that run about 0.9 s of timing."""
    metrics: dict[str, float] = {}
    fastest: dict[str, str] = {}
    forms = list(spec.forms)
    built: dict[str, Callable] = {}
    for position, size in enumerate(sorted(spec.batch_sizes)):
        inputs = pool.repeat_to(size)
        positional = inputs.positional(model)
        # Traced and frozen are built once, at the smallest batch size, and reused at larger ones (as the
        # exported file, traced at the example's batch size, is): tracing and freezing again at batch 8 was
        # 0.3 s of the ResNet-18 shape's run. A module whose trace kept its batch size is traced again.
        reused = {form: built[form] for form in forms if form in built}
        if len(reused) == len(forms) and _follows_batch_size(reused, positional, size):
            candidates = reused
        else:
            candidates = built = _deployable_forms(model, inputs, forms)
            if built_forms is not None and position == 0:
                built_forms.update(built)  # the forms as built at the smallest batch size, for the caller
        timings: dict[str, Timing] = {}
        for form, run in candidates.items():
            timing = time_adaptive(run, positional, spec)
            _log_warm_up(name, form, size, timing.warm)
            timings[form] = timing
            for statistic in ("median", "p90", "ci_low", "ci_high"):
                metrics[metric_keys.form_latency_ms(name, form, size, statistic)] = getattr(timing, statistic)
            metrics[metric_keys.form_latency_runs(name, form, size)] = float(timing.runs)
        best_form = min(timings, key=lambda form: timings[form].median)
        best = timings[best_form]
        fastest[f"{name}/b{size}"] = best_form
        metrics[metric_keys.latency_ms(name, size)] = best.median
        metrics[metric_keys.latency_ci_ms(name, size, "low")] = best.ci_low
        metrics[metric_keys.latency_ci_ms(name, size, "high")] = best.ci_high
        if spec.prune and position == 0 and len(timings) > 1:
            if len(spec.batch_sizes) > 1:
                log.info(
                    "latency %s: %s fastest at batch %d; only it is timed at larger batches "
                    "(evaluate.latency.prune=false times every form)",
                    name,
                    best_form,
                    size,
                )
            forms = [best_form]
    return metrics, fastest


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else []
    return next((found for value in values if (found := _first_tensor(value)) is not None), None)


def _follows_batch_size(built: dict[str, Callable], positional: tuple, size: int) -> bool:
    """Whether every built form answers a batch of `size` with `size` outputs (one call each, which the
    warm-up would make anyway)."""
    with torch.no_grad():
        for run in built.values():
            output = _first_tensor(run(*positional))
            if output is None or output.dim() == 0 or output.shape[0] != size:
                return False
    return True


def _log_warm_up(name: str, form: str, size: int, warm: WarmUp | None) -> None:
    """A line when a warm-up took long (a compile at this shape) or never settled."""
    if warm is None:
        return
    if warm.seconds >= WARMUP_LOG_S:
        compiled = " (a compile at this input shape)" if warm.first_s > 10.0 * warm.last_s else ""
        log.info(
            "latency %s/%s b%d: warm-up %.1f s over %d calls, first %.3f s%s, last %.3f ms; outside the timing budget",
            name,
            form,
            size,
            warm.seconds,
            warm.calls,
            warm.first_s,
            compiled,
            warm.last_s * 1000.0,
        )
    if not warm.stable:
        log.warning(
            "latency %s/%s b%d: after %d warm-up calls (%.1f s) two consecutive calls still differ by more than "
            "%gx; timing anyway",
            name,
            form,
            size,
            warm.calls,
            warm.seconds,
            WARMUP_RATIO,
        )


def measure_latency(
    models: dict[str, nn.Module],
    pool: ModelInputs | torch.Tensor,
    spec: LatencySpec,
    cache: LatencyCache | None = None,
    cached: tuple[str, ...] = ("float",),
    built_forms: dict[str, dict[str, Callable]] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Median, p90 and the median's 95% interval in ms per model, form and batch size (adaptive repeats,
    see time_adaptive); the fastest form per model and batch size; speedup float/lowered with its
    interval. Each batch is built from `pool` (every input repeated to the batch size). With `cache`,
    the models named in `cached` (the float reference) are timed once per cache key and reused. With
    `built_forms`, each timed model's forms as built at the smallest batch size go in under its name."""
    pool = ModelInputs.wrap(pool)
    metrics: dict[str, float] = {}
    fastest: dict[str, str] = {}
    with _threads(spec.threads):
        for name in progress(list(models), len(models), "latency", log):
            key = cache.key(models[name], pool, spec) if cache is not None and name in cached else None
            found = cache.load(key) if cache is not None and key is not None else None
            if found is not None:
                assert cache is not None
                cache.hits += 1
                log.info("latency %s: reused from the latency cache (%s)", name, key)
            else:
                kept = built_forms.setdefault(name, {}) if built_forms is not None else None
                found = _measure_model(name, models[name], pool, spec, kept)
                if cache is not None and key is not None:
                    cache.misses += 1
                    cache.store(key, *found)
            metrics.update(found[0])
            fastest.update(found[1])
    for size in spec.batch_sizes:
        if metric_keys.latency_ms("float", size) in metrics and metric_keys.latency_ms("lowered", size) in metrics:
            metrics.update(speedup_metrics(metrics, size))
    return metrics, fastest


def speedup_metrics(metrics: dict[str, float], size: int) -> dict[str, float]:
    """float / lowered latency at `size`, with the interval from the two medians' intervals (the
    slowest-float-over-fastest-lowered ends)."""
    float_ms, lowered_ms = (
        metrics[metric_keys.latency_ms("float", size)],
        metrics[metric_keys.latency_ms("lowered", size)],
    )
    figures = {metric_keys.speedup(size): float_ms / lowered_ms}
    float_low = metrics.get(metric_keys.latency_ci_ms("float", size, "low"))
    lowered_high = metrics.get(metric_keys.latency_ci_ms("lowered", size, "high"))
    if float_low is not None and lowered_high is not None:
        figures[metric_keys.speedup_ci(size, "low")] = float_low / lowered_high
        lowered_low = metrics[metric_keys.latency_ci_ms("lowered", size, "low")]
        figures[metric_keys.speedup_ci(size, "high")] = (
            metrics[metric_keys.latency_ci_ms("float", size, "high")] / lowered_low
        )
    return figures
