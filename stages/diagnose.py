"""Stage `diagnose` (after `lower`, when diagnose.enabled=true): where the int8 model's error comes from,
and which fix helps, measured.

The calibrated and lowered models' same-named modules are compared by forward hooks (engine
`module_numerics`; custom and non-traceable modules included) on diagnose.max_batches evaluation batches.
Per quantized layer: cumulative SQNR (its output through the whole int8 network so far), own SQNR (the int8
layer alone on the float model's input), weight SQNR, and kernel SQNR (the int8 kernel against its own
float simulation, the reference model's module, on the very same int8 input). A conv/linear whose output
feeds only ReLU6/hardtanh is compared after the clip, where float and int8 are meant to agree.

What it looks for, in this order:
- an engine fault: a kernel below diagnose.kernel_db against its own simulation (healthy kernels are exact
  up to rounding). Named in plain words (qnnpack's quantized ReLU6/hardtanh fault; 8-bit activations on a
  CPU without VNNI), with the fix verified: the same reference model lowered for another backend;
- wide observed ranges feeding bounded activations with the clip off: recovery.bounded_activations=on,
  verified by a re-calibration with it;
- sensitive layers: the worst own SQNRs below diagnose.skip_below_db (layers with weights, the modules a
  skip-list leaves float), each verified alone by a re-convert from the calibration: its output SQNR gain
  (and the accuracy/agreement on the same batches) is reported next to it, and a skip that lowering undoes
  (the module's output is still int8) or that gains less than diagnose.min_gain_db is reported as no help.
  suggested_skip.yaml lists only the skips that helped.
It also checks the run's own skip-list (skip.* or the search's winner) against what lowering left float.

Config keys read: diagnose.*, backend.*, qconfig_mapping.*, skip.*, custom_config.*, recovery.*, calibrate.max_batches.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pipeline import metric_keys
from pipeline.batch import ModelInputs
from pipeline.engine import get_engine, introspect, steps
from pipeline.engine.numerics import LayerDiagnostics, LoggedOutput
from pipeline.engine.qconfigs import quantized_engine
from pipeline.engine.recovery import activation_bits, clamps_bounded, has_vnni
from pipeline.measure import sqnr_db
from pipeline.schema import (
    BackendSpec,
    CustomConfigSpec,
    DiagnoseSpec,
    QConfigMappingSpec,
    RecoverySpec,
    SkipSpec,
    skip_yaml,
)
from stages.types import Calibrated, Loaded, Lowered, StageContext

log = logging.getLogger(__name__)

NAME = "diagnose"
CONSUMES = ("loaded", "calibrated", "lowered")
USES: tuple[str, ...] = ("reference", "searched_skip", "searched_calibration")
PRODUCES = ("diagnosis",)
READS = ("diagnose", "backend", "qconfig_mapping", "skip", "custom_config", "recovery", "calibrate")
OPTIONAL = True
FAILURE_IS_FATAL = False  # an analysis: nothing later needs its report; a failure is recorded and the run goes on

_BOUNDED_TYPES = ("ReLU6", "Hardtanh", "relu6", "hardtanh")


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


@dataclass
class Diagnosis:
    layers: list[LayerDiagnostics]  # worst own SQNR first
    first_layer_sqnr_db: float
    engine_problem: bool
    text: str
    suggested: SkipSpec
    logged: list[LoggedOutput] = field(default_factory=list)
    output_sqnr_db: float = float("nan")
    faults: list[LoggedOutput] = field(default_factory=list)  # kernels below diagnose.kernel_db
    wide_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    verified: list[Verified] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)  # skip entries whose module lowering left int8


class _Measure:
    """Output SQNR (and accuracy or agreement) of a candidate model on the diagnose batches."""

    def __init__(self, loaded: Loaded, inputs: ModelInputs, labels: torch.Tensor | None, engine: str) -> None:
        self.inputs, self.labels, self.engine = inputs, labels, engine
        with torch.no_grad():
            self.float_outputs = inputs.call(loaded.model)
        self.score_name = "accuracy" if labels is not None else "agreement"

    def __call__(self, model: torch.nn.Module, engine: str | None = None) -> tuple[float, float | None]:
        with quantized_engine(engine or self.engine), torch.no_grad():
            outputs = self.inputs.call(model)
        if not isinstance(outputs, torch.Tensor) or not isinstance(self.float_outputs, torch.Tensor):
            return float("nan"), None
        sqnr = sqnr_db(self.float_outputs, outputs)
        score = None
        if outputs.dim() == 2:
            target = self.labels if self.labels is not None else self.float_outputs.argmax(1)
            score = (outputs.argmax(1) == target).float().mean().item()
        return sqnr, score


@dataclass
class _Setting:
    """What the run was converted with, to re-convert from the calibration with one change."""

    backend: BackendSpec
    mapping: QConfigMappingSpec
    custom: CustomConfigSpec
    recovery: RecoverySpec | None
    calibration: list[Any]


def _convert(calibrated_model: torch.nn.Module, setting: _Setting, skip: SkipSpec, loaded: Loaded) -> Any:
    conversion = steps.convert_reference(calibrated_model, setting.backend, setting.mapping, skip, setting.custom)
    if setting.recovery is not None and setting.recovery.bias_correction and setting.calibration:
        steps.correct_bias(conversion, calibrated_model, setting.calibration, setting.recovery)
    model, _ = steps.lower(conversion, setting.backend, loaded.data.example_inputs)
    return model


def _skipped(verified: Verified) -> list[str]:
    """The module names of a verified skip suggestion ("skip.module_name=[a, b]")."""
    return verified.what.split("[", 1)[1].rstrip("]").split(", ")


def verify_skip(
    names: list[str],
    loaded: Loaded,
    calibrated: Calibrated,
    setting: _Setting,
    measure: _Measure,
    before: tuple[float, float | None],
    min_gain_db: float,
) -> Verified:
    """Re-convert from the calibration with `names` left float; the gain, and whether lowering kept them float."""
    what = f"skip.module_name=[{', '.join(names)}]"
    try:
        model = _convert(calibrated.model, setting, SkipSpec(name="verify", module_name=list(names)), loaded)
    except steps.NothingQuantizedError:
        return Verified(what, before[0], None, measure.score_name, before[1], None, "nothing left int8")
    sqnr, score = measure(model)
    kept_float = get_engine().float_outputs(model, names, measure.inputs, setting.backend.engine)
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
    loaded: Loaded,
    setting: _Setting,
    skip: SkipSpec,
    measure: _Measure,
    before: tuple[float, float | None],
    min_gain_db: float,
) -> Verified:
    """Re-calibrate (prepare + the calibration batches) with another recovery setting, then convert and measure."""
    prepared = steps.prepare(
        loaded.model,
        loaded.data.example_inputs,
        loaded.model_name,
        setting.backend,
        setting.mapping,
        setting.custom,
        recovery,
        setting.calibration,
    )
    with quantized_engine(setting.backend.engine), torch.no_grad():
        for inputs in setting.calibration:
            ModelInputs.wrap(inputs).call(prepared)
    model = _convert(prepared, replace(setting, recovery=recovery), skip, loaded)
    sqnr, score = measure(model)
    verified = Verified(what, before[0], sqnr, measure.score_name, before[1], score)
    verified.helps = verified.gain_db is not None and verified.gain_db >= min_gain_db
    if not verified.helps:
        verified.note = f"gain below diagnose.min_gain_db={min_gain_db:g}"
    return verified


def verify_backend(
    engine: str,
    reference: Any,
    loaded: Loaded,
    setting: _Setting,
    measure: _Measure,
    before: tuple[float, float | None],
) -> Verified:
    """The same reference model (same calibration) lowered for another backend's kernels."""
    what = f"backend={engine}"
    try:
        model = get_engine().lower(reference.model, reference.engine_state, engine)
        sqnr, score = measure(model, engine)
    except Exception as error:  # a backend that cannot run this reference model: say so, do not suggest it
        return Verified(what, before[0], None, measure.score_name, before[1], None, f"{type(error).__name__}: {error}")
    verified = Verified(what, before[0], sqnr, measure.score_name, before[1], score)
    verified.helps = verified.gain_db is not None and verified.gain_db >= 1.0
    return verified


def diagnose(
    loaded: Loaded,
    calibrated: Calibrated,
    lowered: Lowered,
    spec: DiagnoseSpec,
    setting: _Setting | None = None,
    skip: SkipSpec | None = None,
    reference: Any = None,
) -> Diagnosis:
    """The diagnosis; with `setting` (what the run converted with), every suggestion is verified."""
    engine = get_engine()
    batches = loaded.data.evaluation if spec.full else loaded.data.evaluation[: spec.max_batches]
    inputs = ModelInputs.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches]) if loaded.has_accuracy else None
    custom = setting.custom if setting is not None else CustomConfigSpec()
    bounds = engine.bounded_producers(loaded.model, custom)
    layers, logged = engine.module_numerics(
        calibrated.model, lowered.model, inputs, lowered.engine, getattr(reference, "model", None), bounds
    )
    measure = _Measure(loaded, inputs, labels, lowered.engine)
    before = measure(lowered.model)
    first = next((output for output in logged if output.quantized), None)
    first_sqnr = first.sqnr_db if first is not None else float("nan")

    # 1. Engine faults: int8 kernels that disagree with their own float simulation on the same input.
    faults = [o for o in logged if o.kernel_sqnr_db is not None and o.kernel_sqnr_db < spec.kernel_db]
    # 2. Wide observed ranges feeding bounded activations (with the clip off, the observer spans them all).
    ranges = engine.observed_output_ranges(calibrated.model, list(bounds))
    wide = {
        name: observed
        for name, observed in ranges.items()
        if (observed[1] - observed[0]) > spec.wide_range_ratio * (bounds[name][1] - bounds[name][0])
    }
    # 3. Sensitive layers: the worst own SQNRs among the modules a skip-list leaves float.
    skippable = [layer for layer in layers if layer.has_weight] or layers
    below = [layer for layer in skippable if layer.own_sqnr_db < spec.skip_below_db]
    candidates = below if spec.full else below[: spec.max_skip]

    verified: list[Verified] = []
    if setting is not None and spec.verify:
        if faults:
            # Leaving the faulty modules float: measured, since lowering may run them in int8 again.
            faulty = [output.module_name for output in faults]
            verified.append(verify_skip(faulty, loaded, calibrated, setting, measure, before, spec.min_gain_db))
        if faults and reference is not None:
            for other in ("x86", "fbgemm") if lowered.engine not in ("x86", "fbgemm") else ():
                verified.append(verify_backend(other, reference, loaded, setting, measure, before))
                if verified[-1].helps:
                    break
        clamp_off = setting.recovery is not None and not clamps_bounded(setting.recovery, lowered.engine)
        if wide and clamp_off and setting.recovery is not None and lowered.engine != "qnnpack":
            on = replace(setting.recovery, bounded_activations="on")
            verified.append(
                verify_recalibrated(
                    "recovery.bounded_activations=on",
                    on,
                    loaded,
                    setting,
                    skip or SkipSpec(),
                    measure,
                    before,
                    spec.min_gain_db,
                )
            )
        for layer in candidates:
            verified.append(
                verify_skip([layer.module_name], loaded, calibrated, setting, measure, before, spec.min_gain_db)
            )
        helping = [v for v in verified if v.helps and v.what.startswith("skip.")]
        if len(helping) > 1:  # the layers that helped alone, together
            names = [name for v in helping for name in _skipped(v)]
            verified.append(verify_skip(names, loaded, calibrated, setting, measure, before, spec.min_gain_db))
        elif not helping and len(candidates) > 1:
            # None helped alone: a layer hurt by its int8 input (an outlier made upstream) needs its producer
            # float too, so the candidates are also tried together.
            names = [layer.module_name for layer in candidates]
            verified.append(verify_skip(names, loaded, calibrated, setting, measure, before, spec.min_gain_db))
    undone: list[str] = []
    if skip is not None and skip.module_name:
        kept_float = engine.float_outputs(lowered.model, list(skip.module_name), inputs, lowered.engine)
        undone = [name for name in skip.module_name if kept_float.get(name) is False]
    if spec.verify and setting is not None:
        skips = [v for v in verified if v.helps and v.what.startswith("skip.")]
        best = max(skips, key=lambda v: (v.gain_db or 0.0, -len(_skipped(v))), default=None)
        suggested_names = _skipped(best) if best is not None else []
    else:
        suggested_names = [layer.module_name for layer in candidates]
    suggested = SkipSpec(name="suggested", module_name=suggested_names)
    diagnosis = Diagnosis(
        layers, first_sqnr, bool(faults), "", suggested, logged, before[0], faults, wide, verified, undone
    )
    bits = activation_bits(setting.recovery, lowered.engine) if setting is not None else None
    diagnosis.text = explain(diagnosis, bounds, lowered.engine, spec, skip, bits)
    return diagnosis


def explain(
    diagnosis: Diagnosis,
    bounds: dict[str, tuple[float, float]],
    engine: str,
    spec: DiagnoseSpec,
    skip: SkipSpec | None,
    bits: int | None = None,
) -> str:
    """diagnosis.txt: plain words first, then each suggestion with its measured gain."""
    parts = [f"Output SQNR of the int8 model against float: {diagnosis.output_sqnr_db:.1f} dB."]
    faults = diagnosis.faults
    if faults:
        worst = min(faults, key=lambda output: output.kernel_sqnr_db or 0.0)
        bounded = [output for output in faults if output.quantized_type in _BOUNDED_TYPES]
        if engine == "qnnpack" and bounded:
            parts.append(
                f"ENGINE FAULT: qnnpack's quantized ReLU6/hardtanh gives wrong values in torch 2.13 (on the "
                f"channels-last quint8 output of a quantized conv): {', '.join(o.module_name for o in bounded[:5])}"
                f"{' ...' if len(bounded) > 5 else ''} ({len(bounded)} modules) compute "
                f"{min(o.kernel_sqnr_db or 0.0 for o in bounded):.1f} dB against the same op in float on the same "
                f"int8 input. It is the kernel, not the model's sensitivity: leaving those modules float does not "
                f"help (lowering runs them in int8 again), and no skip-list of sensitive layers fixes it. Use "
                f"another backend (backend=x86 or fbgemm), or ReLU instead of ReLU6 in the model."
            )
        elif engine in ("x86", "fbgemm", "onednn") and not has_vnni() and bits != 7:
            parts.append(
                f"ENGINE FAULT: {worst.module_name} ({worst.quantized_type}) computes {worst.kernel_sqnr_db:.1f} dB "
                f"against its own float simulation on the same int8 input: on a CPU without VNNI, 8-bit activations "
                f"overflow the AVX2 int8 dot product. Use recovery.activation_bits=7 (or auto)."
            )
        else:
            parts.append(
                f"ENGINE FAULT: {len(faults)} int8 kernels disagree with their own float simulation on the same "
                f"input (below diagnose.kernel_db={spec.kernel_db:g} dB; healthy kernels are exact up to rounding), "
                f"worst {worst.module_name} ({worst.quantized_type}) at {worst.kernel_sqnr_db:.1f} dB. It is a kernel "
                f"or engine problem of backend '{engine}', not a sensitive layer: try another backend."
            )
    else:
        kernels = [o.kernel_sqnr_db for o in diagnosis.logged if o.kernel_sqnr_db is not None]
        if kernels:
            parts.append(
                f"No engine fault: every int8 kernel matches its own float simulation on the same input (worst "
                f"{min(kernels):.1f} dB, threshold diagnose.kernel_db={spec.kernel_db:g} dB), so the error is the "
                f"quantization itself."
            )
    if diagnosis.wide_ranges:
        ratios = {
            name: (high - low) / (bounds[name][1] - bounds[name][0])
            for name, (low, high) in diagnosis.wide_ranges.items()
        }
        worst_name = max(ratios, key=ratios.__getitem__)
        low, high = diagnosis.wide_ranges[worst_name]
        parts.append(
            f"WIDE RANGES: {len(ratios)} conv/linear outputs feed only ReLU6/hardtanh but were observed over more "
            f"than {spec.wide_range_ratio:g}x the clip (worst {worst_name}: [{low:.1f}, {high:.1f}] for a clip of "
            f"{list(bounds[worst_name])}): their int8 levels are spent on values the activation discards. The fix "
            f"is recovery.bounded_activations=on (auto turns it on for every backend but qnnpack)"
            + (", on a backend other than qnnpack." if engine == "qnnpack" else ".")
        )
    shown = diagnosis.layers[:3]
    if shown:
        parts.append(
            "Most sensitive layers (own SQNR: the int8 layer alone on the float input"
            + (", after the ReLU6 clip where it feeds one" if any(layer.clipped_to for layer in shown) else "")
            + "): "
            + ", ".join(f"{layer.module_name} ({layer.quantized_type}) {layer.own_sqnr_db:.1f} dB" for layer in shown)
            + "."
        )
    if diagnosis.verified:
        parts.append("Suggestions, each re-converted from the calibration and measured on the same batches:")
        parts.extend(f"  - {v.describe()}" for v in diagnosis.verified)
        helping = [v for v in diagnosis.verified if v.helps]
        if helping:
            best = max(helping, key=lambda v: v.gain_db or 0.0)
            parts.append(f"Best measured fix: {best.what} ({best.gain_db:+.1f} dB).")
        else:
            parts.append("None of the suggestions raised output SQNR enough to be a fix.")
    elif not faults:
        candidates = [layer for layer in diagnosis.layers if layer.own_sqnr_db < spec.skip_below_db]
        if not candidates:
            parts.append(f"No layer is below diagnose.skip_below_db={spec.skip_below_db:g} dB: nothing to skip.")
        else:
            parts.append(
                "Candidates to leave float (NOT verified, diagnose.verify=false): "
                + ", ".join(diagnosis.suggested.module_name)
                + "."
            )
    if diagnosis.undone and skip is not None:
        parts.append(
            f"SKIP UNDONE: skip={skip.name} lists {', '.join(diagnosis.undone)}, but the lowered model runs "
            f"{'it' if len(diagnosis.undone) == 1 else 'them'} in int8 (lowering re-quantizes an op that works on "
            f"int8 tensors between int8 neighbours): that entry has no effect."
        )
    if diagnosis.suggested.module_name:
        parts.append(f"suggested_skip.yaml: {', '.join(diagnosis.suggested.module_name)}.")
    return "\n".join(parts)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def write_outputs(diagnosis: Diagnosis, spec: DiagnoseSpec, out: Path) -> None:
    """layers.csv, layers.png, diagnosis.txt, suggestions.csv and suggested_skip.yaml under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "layers.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            [
                "rank",
                "module_name",
                "op_type",
                "own_sqnr_db",
                "cumulative_sqnr_db",
                "weight_sqnr_db",
                "kernel_sqnr_db",
                "compared_after_clip",
            ]
        )
        for rank, layer in enumerate(diagnosis.layers, start=1):
            writer.writerow(
                [
                    rank,
                    layer.module_name,
                    layer.quantized_type,
                    _number(layer.own_sqnr_db),
                    _number(layer.cumulative_sqnr_db),
                    _number(layer.weight_sqnr_db),
                    _number(layer.kernel_sqnr_db),
                    "" if layer.clipped_to is None else f"{layer.clipped_to[0]:g}..{layer.clipped_to[1]:g}",
                ]
            )
    with (out / "suggestions.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["suggestion", "sqnr_before_db", "sqnr_after_db", "gain_db", "score", "before", "after", "helps", "note"]
        )
        for v in diagnosis.verified:
            writer.writerow(
                [
                    v.what,
                    _number(v.sqnr_before_db),
                    _number(v.sqnr_after_db),
                    _number(v.gain_db),
                    v.score_name,
                    _number(v.score_before),
                    _number(v.score_after),
                    v.helps,
                    v.note,
                ]
            )
    (out / "diagnosis.txt").write_text(diagnosis.text + "\n")
    header = (
        "Suggested by the diagnose stage: the layers whose skip was verified to raise output SQNR by at least "
        f"diagnose.min_gain_db={spec.min_gain_db:g} dB (see suggestions.csv).\n"
        "Copy to conf/skip/suggested.yaml and run with skip=suggested.\n"
    )
    if diagnosis.engine_problem:
        header += (
            "The diagnosis found a kernel or engine problem, which skipping layers does not fix: see diagnosis.txt.\n"
        )
    (out / "suggested_skip.yaml").write_text(skip_yaml(diagnosis.suggested, header))
    _plot(diagnosis, spec, out / "layers.png")


def _plot(diagnosis: Diagnosis, spec: DiagnoseSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = diagnosis.layers[:60]  # the worst 60: a chart of a 100-layer net stays readable
    finite = [
        v
        for layer in layers
        for v in (layer.own_sqnr_db, layer.cumulative_sqnr_db, layer.weight_sqnr_db)
        if v is not None and math.isfinite(v)
    ]
    cap = max(finite, default=0.0) + 10.0  # an identical output (inf dB) is drawn to the edge

    def shown(value: float | None) -> float:
        return 0.0 if value is None or not math.isfinite(value) and value < 0 else min(value, cap)

    rows = range(len(layers))
    figure, axis = plt.subplots(figsize=(10, 1.5 + 0.45 * len(layers)))
    height = 0.27
    for offset, label, color, values in (
        (-height, "own (layer alone, float inputs)", "tab:red", [layer.own_sqnr_db for layer in layers]),
        (0.0, "cumulative (through the int8 network)", "tab:blue", [layer.cumulative_sqnr_db for layer in layers]),
        (height, "weight", "0.6", [layer.weight_sqnr_db for layer in layers]),
    ):
        axis.barh([r + offset for r in rows], [shown(v) for v in values], height=height, color=color, label=label)
    axis.set_yticks(list(rows), [f"{layer.module_name} ({layer.quantized_type})" for layer in layers])
    axis.invert_yaxis()  # worst at the top
    axis.axvline(spec.skip_below_db, linestyle="--", color="black", label=f"skip below {spec.skip_below_db:g} dB")
    axis.set_xlabel("SQNR vs float (dB, higher is better)")
    axis.set_title("Per-layer SQNR, worst own SQNR first")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never over a bar
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def compute(ctx: StageContext) -> dict[str, Any]:
    """The diagnosis, or the reason it cannot run on this model (a str)."""
    spec = ctx.spec
    artifacts = ctx.artifacts
    blocker = get_engine(spec.engine).numerics_blocker(spec.custom_config)
    float_io = [] if blocker else introspect.float_io_quantized_ops(artifacts["lowered"].model)
    if blocker is None and float_io:
        blocker = (
            f"diagnose compares int8 activations, and the dynamic, float16 or weight-only ops of "
            f"qconfig_mapping={spec.qconfig_mapping.name} have none ({', '.join(float_io[:2])})"
        )
    if blocker is not None:
        log.warning("diagnose: skipped: %s (diagnose.enabled=false silences this).", blocker)
        return {"diagnosis": f"Skipped: {blocker}."}
    loaded: Loaded = artifacts["loaded"]
    searched = artifacts.get("searched_calibration")  # the search switched recovery options
    calibrated = searched.calibrated if searched else artifacts["calibrated"]
    setting = _Setting(
        spec.backend,
        spec.qconfig_mapping,
        spec.custom_config,
        searched.recovery if searched else spec.recovery,
        [inputs for inputs, _ in loaded.data.calibration[: spec.calibrate.max_batches]],
    )
    skip = artifacts.get("searched_skip") or spec.skip
    diagnosis = diagnose(
        loaded, calibrated, artifacts["lowered"], spec.diagnose, setting, skip, artifacts.get("reference")
    )
    log.log(logging.WARNING if diagnosis.engine_problem else logging.INFO, "diagnose: %s", diagnosis.text)
    if diagnosis.engine_problem:
        ctx.warn(next(line for line in diagnosis.text.splitlines() if "ENGINE FAULT" in line))
    if diagnosis.undone:
        ctx.warn(f"skip={skip.name} entries undone by lowering (still int8): {', '.join(diagnosis.undone)}")
    return {"diagnosis": diagnosis}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """layers.csv, layers.png, diagnosis.txt, suggestions.csv and suggested_skip.yaml (only diagnosis.txt
    when skipped)."""
    diagnosis: Diagnosis | str = produced["diagnosis"]
    if isinstance(diagnosis, str):
        (ctx.out_dir / "diagnosis.txt").write_text(diagnosis + "\n")
        return {metric_keys.DIAGNOSE_SKIPPED: 1.0}
    write_outputs(diagnosis, ctx.spec.diagnose, ctx.out_dir)
    helping = [v.gain_db for v in diagnosis.verified if v.helps and v.gain_db is not None]
    return {
        metric_keys.DIAGNOSE_LAYERS: float(len(diagnosis.layers)),
        metric_keys.DIAGNOSE_WORST_LAYER_SQNR_DB: diagnosis.layers[0].own_sqnr_db if diagnosis.layers else float("nan"),
        metric_keys.DIAGNOSE_FIRST_LAYER_SQNR_DB: diagnosis.first_layer_sqnr_db,
        metric_keys.DIAGNOSE_ENGINE_PROBLEM: float(diagnosis.engine_problem),
        metric_keys.DIAGNOSE_SUGGESTED_SKIP: float(len(diagnosis.suggested.module_name)),
        metric_keys.DIAGNOSE_WIDE_RANGES: float(len(diagnosis.wide_ranges)),
        metric_keys.DIAGNOSE_VERIFIED: float(len(diagnosis.verified)),
        metric_keys.DIAGNOSE_BEST_GAIN_DB: max(helping, default=0.0),
        metric_keys.DIAGNOSE_UNDONE_SKIPS: float(len(diagnosis.undone)),
    }
