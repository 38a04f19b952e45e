"""Adaptive latency (pipeline/measure.py): runs until the median's interval is narrow enough or the budget is
spent, reports the interval, prunes clearly slower forms, and times the float reference once per cache key.
The clock is a fake one that each timed call advances by a set amount, so no test depends on this machine's
speed (no timing assertions)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import measure
from pipeline.measure import LatencyCache, measure_latency, median_interval, time_adaptive, warm_up
from pipeline.schema import LatencySpec


class FakeClock:
    """perf_counter for pipeline.measure: advanced only by the timed functions."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, durations_ms: list[float]) -> Callable[..., None]:
        """A function that takes the next of `durations_ms` (cycled) each call."""
        cycle = itertools.cycle(durations_ms)

        def run(*_inputs) -> None:
            self.now += next(cycle) / 1000.0

        return run


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(measure.time, "perf_counter", fake)
    return fake


def test_a_stable_function_stops_at_the_minimum_runs_with_a_tight_interval(clock) -> None:
    spec = LatencySpec(warmup=2, repeats=10, target_ci=0.05, budget_s=100.0)
    timing = time_adaptive(clock.work([2.0, 2.02, 1.98]), (), spec)
    assert timing.runs == 10  # the interval was within 5% at the first check: no more runs
    assert timing.ci_low <= timing.median <= timing.ci_high
    assert timing.relative_half_width <= 0.05


def test_a_noisy_function_runs_until_the_budget_and_reports_the_wide_interval(clock) -> None:
    spec = LatencySpec(warmup=1, repeats=10, target_ci=0.01, budget_s=1.0)
    timing = time_adaptive(clock.work([1.0, 10.0, 3.0, 30.0]), (), spec)
    assert timing.runs > 10  # kept going after the minimum ...
    assert timing.seconds == pytest.approx(1.0, abs=0.05)  # ... until the budget was spent
    assert timing.ci_low <= timing.median <= timing.ci_high
    assert timing.relative_half_width > 0.01  # and says how uncertain it still is


def test_the_median_interval_is_the_order_statistics_with_95_percent_coverage() -> None:
    assert median_interval([1.0, 2.0, 3.0]) == (1.0, 3.0)  # too few samples: the whole range
    samples = [float(value) for value in range(1, 101)]
    low, high = median_interval(samples)
    assert (low, high) == (40.0, 61.0)  # the textbook ranks 40 and 61 for n = 100
    assert median_interval([float(v) for v in range(1, 1001)]) == (469.0, 532.0)  # normal approximation


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def test_only_the_fastest_form_at_batch_1_is_timed_at_larger_batches(clock, monkeypatch) -> None:
    forms = {"eager": clock.work([5.0]), "traced": clock.work([2.0]), "frozen": clock.work([0.9, 1.1])}
    monkeypatch.setattr(measure, "_deployable_forms", lambda model, inputs, wanted: {f: forms[f] for f in wanted})
    spec = LatencySpec(warmup=1, repeats=6, batch_sizes=[1, 8], target_ci=0.2, budget_s=10.0)
    metrics, fastest = measure_latency({"lowered": _model(0)}, torch.randn(4, 8), spec)
    assert "latency/lowered/eager/b1_median_ms" in metrics
    assert "latency/lowered/frozen/b8_median_ms" in metrics
    assert fastest["lowered/b1"] == fastest["lowered/b8"] == "frozen"
    assert not {"latency/lowered/eager/b8_median_ms", "latency/lowered/traced/b8_median_ms"} & set(metrics)  # pruned

    metrics, _ = measure_latency({"lowered": _model(0)}, torch.randn(4, 8), replace(spec, prune=False))
    assert {"latency/lowered/eager/b8_median_ms", "latency/lowered/traced/b8_median_ms"} <= set(metrics)


def test_the_float_reference_is_timed_once_per_cache_key_across_runs(tmp_path: Path, monkeypatch) -> None:
    timed: list[str] = []
    original = measure._measure_model

    def counting(name, *args, **kwargs):
        timed.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(measure, "_measure_model", counting)
    spec = LatencySpec(warmup=1, repeats=3, batch_sizes=[1], forms=["eager"], budget_s=0.05)
    pool = torch.randn(4, 8)
    models = {"float": _model(0), "lowered": _model(1)}

    first, _ = measure_latency(models, pool, spec, LatencyCache(tmp_path))
    cache = LatencyCache(tmp_path)  # a second run: a new process would build a new one
    second, _ = measure_latency(models, pool, spec, cache)
    assert timed == ["float", "lowered", "lowered"]  # float timed once, the candidate each run
    assert (cache.hits, cache.misses) == (1, 0)
    assert second["latency/float/b1_ms"] == first["latency/float/b1_ms"]
    assert "latency/speedup_b1_ci_low" in second

    other_weights = {"float": _model(2)}
    measure_latency(other_weights, pool, spec, cache)
    measure_latency(models, pool, replace(spec, batch_sizes=[2]), cache)  # another shape of the question
    assert timed[3:] == ["float", "float", "lowered"] and cache.misses == 2


def test_a_compile_on_the_first_call_is_warmed_up_outside_the_budget(clock, monkeypatch, caplog) -> None:
    # A 5 s first call (torch.compile at a new shape), then 1 ms calls; the 2 s budget is the timed runs'.
    # On main 7f565fb the compile spent the budget: one timed run.
    spec = LatencySpec(warmup=3, repeats=10, target_ci=0.05, budget_s=2.0, batch_sizes=[1])
    compiling = clock.work([5000.0] + [1.0] * 1000)
    monkeypatch.setattr(measure, "_deployable_forms", lambda model, inputs, wanted: {"compiled": compiling})
    with caplog.at_level(logging.INFO, logger="pipeline.measure"):
        metrics, _ = measure_latency({"lowered": _model(0)}, torch.randn(4, 8), spec)
    assert metrics["latency/lowered/compiled/b1_runs"] == 10  # every timed run steady: stopped at the minimum
    assert metrics["latency/lowered/b1_ms"] == pytest.approx(1.0)
    (line,) = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert "lowered/compiled b1: warm-up 5.0 s over 3 calls" in line and "a compile" in line


def test_the_warm_up_is_the_configured_count_when_calls_agree_and_longer_until_they_do(clock) -> None:
    spec = LatencySpec(warmup=3, repeats=10, target_ci=0.05, budget_s=100.0)
    steady = time_adaptive(clock.work([2.0, 2.02, 1.98]), (), spec)
    assert steady.warm is not None and (steady.warm.calls, steady.warm.stable) == (3, True)  # as before
    # TorchScript's profiling executor: a slow second call (it optimizes), then steady ones.
    profiling = time_adaptive(clock.work([3.0, 40.0] + [1.0] * 1000), (), spec)
    assert profiling.warm is not None and profiling.warm.calls == 4  # 3.0, 40.0, 1.0 disagree; 1.0, 1.0 agree
    assert profiling.median == pytest.approx(1.0)
    never = warm_up(clock.work([1.0, 10.0]), (), spec)  # never within 2x: stops at the cap
    assert (never.calls, never.stable) == (measure.MAX_WARMUP_CALLS, False)


def _sleepy(model: nn.Module, slow_calls: int, sleep_s: float) -> Callable[..., torch.Tensor]:
    """`model`, whose first `slow_calls` calls at each input shape also sleep `sleep_s` (a lazy compile)."""
    seen: dict[tuple, int] = {}

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        shape = tuple(tuple(x.shape) for x in inputs)
        seen[shape] = seen.get(shape, 0) + 1
        if seen[shape] <= slow_calls:
            time.sleep(sleep_s)
        return model(*inputs)

    return run


@pytest.mark.parametrize("slow_calls", [1, 2])  # 2: like TorchScript's profiling executor, optimizing on call 2
def test_a_model_slow_on_its_first_calls_at_each_shape_is_timed_at_its_steady_state(
    slow_calls: int, monkeypatch
) -> None:
    # Real clock: the check is that no sleep lands in the timed runs (a median below the sleep, every batch
    # size given its minimum of runs), not how fast the model is. On main 7f565fb the sleep used up the
    # budget: one timed run per batch size, at slow_calls=2 that one run was the sleep.
    sleep_s = 0.3
    model = _model(0)
    compiled = _sleepy(model, slow_calls, sleep_s)
    monkeypatch.setattr(measure, "_deployable_forms", lambda m, inputs, wanted: {"compiled": compiled})
    spec = LatencySpec(warmup=1, repeats=10, batch_sizes=[1, 8], target_ci=0.5, budget_s=0.2)
    metrics, fastest = measure_latency({"lowered": model}, torch.randn(4, 8), spec)
    for size in (1, 8):
        assert fastest[f"lowered/b{size}"] == "compiled"
        assert metrics[f"latency/lowered/compiled/b{size}_median_ms"] < sleep_s * 1000.0
        assert metrics[f"latency/lowered/compiled/b{size}_p90_ms"] < sleep_s * 1000.0  # no sleep timed at all
        assert metrics[f"latency/lowered/compiled/b{size}_runs"] >= spec.repeats


class _BatchBakedIn(nn.Module):
    """Traced at batch 1, its reshape keeps the 1: a traced form that does not follow the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).reshape(int(x.shape[0]), -1)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_forms_are_traced_once_unless_a_trace_keeps_its_batch_size(monkeypatch) -> None:
    builds: list[int] = []
    original = measure._deployable_forms

    def counting(model, inputs, forms):
        builds.append(inputs.batch_size)
        return original(model, inputs, forms)

    monkeypatch.setattr(measure, "_deployable_forms", counting)
    spec = LatencySpec(warmup=1, repeats=3, batch_sizes=[1, 4], forms=["traced"], budget_s=0.02)
    measure_latency({"lowered": _model(0)}, torch.randn(4, 8), spec)
    assert builds == [1]  # batch 4 reuses the batch-1 trace
    builds.clear()
    measure_latency({"lowered": _BatchBakedIn().eval()}, torch.randn(4, 8), spec)
    assert builds == [1, 4]  # its batch-1 trace answers 4 inputs with one row: traced again at 4
