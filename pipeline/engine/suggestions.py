"""Diagnose's suggestions, measured (stages/diagnose.py decides which to try): each is applied from the
run's calibration (a skip-list re-converted, a recovery option re-calibrated, another backend's lowering
of the same reference model) and the result's output SQNR, and accuracy or agreement, compared with the
run's on the same batches. An engine that applies skip-lists at prepare time (pt2e) re-calibrates with
the skip-list instead of re-converting."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from pipeline.batch import ModelInputs
from pipeline.engine import get_engine, steps
from pipeline.engine.base import ReferenceConversion
from pipeline.engine.numerics import Power
from pipeline.engine.qconfigs import quantized_engine
from pipeline.schema import BackendSpec, CustomConfigSpec, EngineSpec, QConfigMappingSpec, RecoverySpec, SkipSpec


@dataclass
class Verified:
    """One suggestion, measured: re-converted (or re-calibrated) with it, on the diagnose batches."""

    what: str  # the setting as a user writes it: "skip.module_name=[a]", "recovery.bounded_activations=on"
    sqnr_before_db: float
    sqnr_after_db: float | None  # None: could not be measured (the reason is in `note`)
    score_name: str = ""  # accuracy (trained, labelled) or agreement with float
    score_before: float | None = None
    score_after: float | None = None
    note: str = ""  # why it does not help (undone by lowering ...)
    helps: bool = False

    @property
    def gain_db(self) -> float | None:
        return None if self.sqnr_after_db is None else self.sqnr_after_db - self.sqnr_before_db

    def describe(self) -> str:
        if self.sqnr_after_db is None:
            return f"{self.what}: not measured ({self.note})"
        score = ""
        if self.score_before is not None and self.score_after is not None:
            score = f", {self.score_name} {self.score_before:.3f} -> {self.score_after:.3f}"
        verdict = "helps" if self.helps else "NO HELP"
        note = f"; {self.note}" if self.note else ""
        return (
            f"{self.what}: output SQNR {self.sqnr_before_db:.1f} -> {self.sqnr_after_db:.1f} dB "
            f"({self.gain_db:+.1f} dB{score}) - {verdict}{note}"
        )


class Measure:
    """Output SQNR (and accuracy or agreement) of a candidate model on the diagnose batches, streamed:
    `scoring` (a pipeline/scoring.py ScoringSet) yields (inputs, the float model's outputs, labels or None)
    batch by batch on each pass. The SQNR sums signal and noise power and the score counts per batch, so
    both equal the figures on the batches joined (up to float rounding) while one batch is held. `probe`
    (the first batch's inputs) is what `float_outputs` runs to see which modules a candidate left float."""

    def __init__(
        self,
        scoring: Iterable[tuple[ModelInputs, Any, torch.Tensor | None]],
        labelled: bool,
        engine: str,
        probe: ModelInputs,
    ) -> None:
        self.scoring, self.engine, self.probe = scoring, engine, probe
        self.score_name = "accuracy" if labelled else "agreement"

    def __call__(self, model: nn.Module, engine: str | None = None) -> tuple[float, float | None]:
        power, correct, count, scored = Power(), 0, 0, True
        with quantized_engine(engine or self.engine), torch.no_grad():
            for inputs, float_outputs, labels in self.scoring:
                outputs = inputs.call(model)
                if not isinstance(outputs, torch.Tensor) or not isinstance(float_outputs, torch.Tensor):
                    return float("nan"), None
                power.add(float_outputs, outputs)
                scored = scored and outputs.dim() == 2
                if scored:
                    target = labels if labels is not None else float_outputs.argmax(1)
                    correct += int((outputs.argmax(1) == target).sum())
                    count += int(outputs.shape[0])
        return power.db, correct / count if scored and count else None


@dataclass
class Setting:
    """What the run was converted with, to re-convert from the calibration with one change."""

    backend: BackendSpec
    mapping: QConfigMappingSpec
    custom: CustomConfigSpec
    recovery: RecoverySpec | None
    calibration: list[Any]  # the calibration batches' inputs
    model: nn.Module  # the float model, for a re-calibration
    example_inputs: ModelInputs
    model_name: str
    flow: EngineSpec = field(default_factory=EngineSpec)  # the config's engine group


def _convert(calibrated: nn.Module | None, setting: Setting, skip: SkipSpec) -> nn.Module:
    """The lowered model with `skip`: re-converted from `calibrated`, or from a new calibration when there is
    none or the engine applies skip-lists at prepare time."""
    flow = setting.flow
    if calibrated is None or getattr(get_engine(flow), "skips_at_prepare", False):
        calibrated = steps.recalibrate(
            setting.model,
            setting.example_inputs,
            setting.model_name,
            setting.backend,
            setting.mapping,
            setting.custom,
            setting.recovery,
            setting.calibration,
            flow=flow,
            skip=skip,
        )
    conversion = steps.convert_reference(calibrated, setting.backend, setting.mapping, skip, setting.custom, flow=flow)
    if setting.recovery is not None and setting.recovery.bias_correction and setting.calibration:
        steps.correct_bias(conversion, calibrated, setting.calibration, setting.recovery, flow)
    model, _ = steps.lower(conversion, setting.backend, setting.example_inputs, flow=flow)
    return model


def skipped(verified: Verified) -> list[str]:
    """The module names of a verified skip suggestion ("skip.module_name=[a, b]")."""
    return verified.what.split("[", 1)[1].rstrip("]").split(", ")


def verify_skip(
    names: list[str],
    calibrated: nn.Module,
    setting: Setting,
    measure: Measure,
    before: tuple[float, float | None],
    min_gain_db: float,
) -> Verified:
    """Re-convert from the calibration with `names` left float; the gain, and whether lowering kept them float."""
    what = f"skip.module_name=[{', '.join(names)}]"
    try:
        model = _convert(calibrated, setting, SkipSpec(name="verify", module_name=list(names)))
    except steps.NothingQuantizedError:
        return Verified(what, before[0], None, measure.score_name, before[1], None, "nothing left int8")
    sqnr, score = measure(model)
    kept_float = get_engine(setting.flow).float_outputs(model, names, measure.probe, setting.backend.engine)
    undone = [name for name in names if kept_float.get(name) is False]
    verified = Verified(what, before[0], sqnr, measure.score_name, before[1], score)
    if undone:
        verified.note = f"undone by lowering: {', '.join(undone)} still run{'s' if len(undone) == 1 else ''} in int8"
    gain = verified.gain_db
    verified.helps = not undone and gain is not None and gain >= min_gain_db
    if not undone and gain is not None and gain < min_gain_db:
        verified.note = f"gain below diagnose.min_gain_db={min_gain_db:g}"
    return verified


def verify_recalibrated(
    what: str,
    recovery: RecoverySpec,
    setting: Setting,
    skip: SkipSpec,
    measure: Measure,
    before: tuple[float, float | None],
    min_gain_db: float,
) -> Verified:
    """Re-calibrate (prepare + the calibration batches) with another recovery setting, then convert and measure."""
    model = _convert(None, replace(setting, recovery=recovery), skip)
    sqnr, score = measure(model)
    verified = Verified(what, before[0], sqnr, measure.score_name, before[1], score)
    verified.helps = verified.gain_db is not None and verified.gain_db >= min_gain_db
    if not verified.helps:
        verified.note = f"gain below diagnose.min_gain_db={min_gain_db:g}"
    return verified


def verify_backend(
    engine: str,
    reference: ReferenceConversion,
    setting: Setting,
    measure: Measure,
    before: tuple[float, float | None],
) -> Verified:
    """The same reference model (same calibration) lowered for another backend's kernels."""
    what = f"backend={engine}"
    try:
        model = get_engine(setting.flow).lower(reference.model, reference.engine_state, engine)
        sqnr, score = measure(model, engine)
    except Exception as error:  # a backend that cannot run this reference model: say so, do not suggest it
        return Verified(what, before[0], None, measure.score_name, before[1], None, f"{type(error).__name__}: {error}")
    verified = Verified(what, before[0], sqnr, measure.score_name, before[1], score)
    verified.helps = verified.gain_db is not None and verified.gain_db >= 1.0
    return verified
