"""The skip search's decisions and outcome (stages/search.py runs the trials): the bar a trial's score
must reach, the bisection over the sensitivity order, the winner among the trials, the default trial
budget and an accuracy-like score's interval. Numbers in, numbers out: no model is touched here."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import quality
from pipeline.engine.numerics import LayerSensitivity
from pipeline.schema import SearchSpec, SkipSpec

PROPORTIONS = ("accuracy", "agreement", "topk")  # criteria whose score is a share of samples


@dataclass
class Trial:
    number: int
    skipped: list[str]  # module names left float
    score: float  # the criterion's value (accuracy, SQNR, mean cosine ...)
    meets: bool
    latency_ms: float  # the fastest deployable form at the first evaluate.latency batch size
    metrics: dict[str, float] = field(default_factory=dict)
    latency_spread_ms: float = 0.0  # p90 - median of that form: the measurement's noise
    interval: tuple[float, float] | None = None  # 95% Wilson interval of an accuracy-like score
    recovery_defaults: bool = False  # converted with the recovery phase's settings (the recovery defaults)


@dataclass
class SearchResult:
    winner: Trial
    trials: list[Trial]
    sensitivity: list[LayerSensitivity]
    float_score: float
    bar: float
    met: bool
    samples: int = 0  # evaluation samples each trial is scored on
    max_trials: int = 0  # the budget the search ran with
    # The winner's calibration (a stages.types.SearchedCalibration) when the recovery phase switched settings.
    calibration: Any = None

    @property
    def float_layers_searched(self) -> int:
        return len(self.sensitivity)

    def skip_spec(self, name: str = "searched") -> SkipSpec:
        return SkipSpec(name=name, module_name=list(self.winner.skipped))


def wilson_interval(score: float, samples: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (accuracy, agreement) measured on `samples` samples."""
    return quality.wilson_interval(min(max(score, 0.0), 1.0) * samples, samples, z)


def default_max_trials(layers: int) -> int:
    """2*ceil(log2(layers))+4: a bisection over the sensitivity order plus put-backs and trial 0."""
    return 2 * math.ceil(math.log2(max(layers, 2))) + 4


def pick_winner(trials: list[Trial], latency_tie: float) -> Trial:
    """The fastest trial meeting the bar, where a latency within the measured noise of the fastest (its
    p90-median spread, at least `latency_tie` of it) is a tie, won by fewer float layers; with no trial
    meeting the bar, the best score."""
    passing = [trial for trial in trials if trial.meets]
    if not passing:
        return max(trials, key=lambda trial: trial.score)
    fastest = min(passing, key=lambda trial: trial.latency_ms)

    def ties(trial: Trial) -> bool:
        noise = max(fastest.latency_spread_ms, trial.latency_spread_ms, latency_tie * fastest.latency_ms)
        return trial.latency_ms <= fastest.latency_ms + noise

    return min((trial for trial in passing if ties(trial)), key=lambda trial: (len(trial.skipped), trial.latency_ms))


def acceptance_bar(spec: SearchSpec, float_score: float) -> float:
    """The lowest accepted score: a fixed bar (sqnr, cosine, custom) or a drop below float (accuracy, topk,
    agreement; float agrees with itself, 1.0)."""
    fixed = {"sqnr": spec.min_sqnr_db, "cosine": spec.min_cosine, "custom": spec.min_value}
    if spec.criterion in fixed:
        return fixed[spec.criterion]
    if spec.drop_mode == "relative":
        return float_score * (1.0 - spec.max_drop)
    return float_score - spec.max_drop


def bisect(
    order: list[str], run_trial: Callable[[list[str]], Trial], budget_left: Callable[[], bool]
) -> list[str] | None:
    """The smallest prefix of `order` (most sensitive first) whose layers left float meet the bar, by
    bisection (assuming more float layers never hurt): about log2(len(order)) trials. None when the budget
    ran out before a prefix met the bar, or when even the whole order left float misses it."""
    low, high, high_met = 0, len(order), False  # prefix `low` misses (trial 0); prefix `high` is assumed to meet
    while high - low > 1 and budget_left():
        middle = (low + high) // 2
        if run_trial(order[:middle]).meets:
            high, high_met = middle, True
        else:
            low = middle
    if not high_met and high - low <= 1 and budget_left():
        high_met = run_trial(order[:high]).meets
    return order[:high] if high_met else None
