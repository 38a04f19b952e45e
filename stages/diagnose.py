"""Stage `diagnose` (the last stage, when diagnose.enabled=true): where the int8 model's error comes from,
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

engine=pt2e: torchao's numeric debugger compares each node of the q/dq program with the same node of the
calibrated prepared model (engine `module_numerics`): cumulative figures per node, no own, weight or
kernel SQNR, so layers are ranked by cumulative SQNR and the report says so. A skip suggestion is verified
by a re-calibration with it (pt2e applies skip-lists at prepare time).

Config keys read: diagnose.*, engine.*, backend.*, qconfig_mapping.*, skip.*, custom_config.*, recovery.*,
calibrate.max_batches.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline import metric_keys
from pipeline.batches import as_source, first_batch
from pipeline.engine import get_engine, introspect
from pipeline.engine.diagnosis import Diagnosis, explain
from pipeline.engine.recovery import activation_bits, clamps_bounded
from pipeline.engine.suggestions import (
    Measure,
    Setting,
    Verified,
    skipped,
    verify_backend,
    verify_recalibrated,
    verify_skip,
)
from pipeline.schema import CustomConfigSpec, DiagnoseSpec, EngineSpec, SkipSpec
from pipeline.scoring import ScoringSet
from stages.reports.diagnose import write_outputs
from stages.types import Calibrated, Loaded, Lowered, StageContext

log = logging.getLogger(__name__)

NAME = "diagnose"
CONSUMES = ("loaded", "calibrated", "lowered")
USES: tuple[str, ...] = ("reference", "searched_skip", "searched_calibration")
PRODUCES = ("diagnosis",)
READS = ("diagnose", "engine", "backend", "qconfig_mapping", "skip", "custom_config", "recovery", "calibrate")
OPTIONAL = True
FAILURE_IS_FATAL = False  # an analysis: nothing later needs its report; a failure is recorded and the run goes on


def diagnose(
    loaded: Loaded,
    calibrated: Calibrated,
    lowered: Lowered,
    spec: DiagnoseSpec,
    setting: Setting | None = None,
    skip: SkipSpec | None = None,
    reference: Any = None,
    cache_dir: Path | None = None,
) -> Diagnosis:
    """The diagnosis; with `setting` (what the run converted with), every suggestion is verified. The batches
    stream (issue 19): each figure sums signal and noise power batch by batch, against float outputs from the
    float-output cache under `cache_dir` (a temporary folder without it), so memory holds one batch."""
    source = as_source(loaded.data.evaluation)
    batches = source if spec.full else source.head(spec.max_batches)
    with ScoringSet(loaded.model, batches, loaded.has_accuracy, cache_dir, NAME) as scoring:
        return _diagnose(loaded, calibrated, lowered, spec, setting, skip, reference, scoring)


def _diagnose(
    loaded: Loaded,
    calibrated: Calibrated,
    lowered: Lowered,
    spec: DiagnoseSpec,
    setting: Setting | None,
    skip: SkipSpec | None,
    reference: Any,
    scoring: ScoringSet,
) -> Diagnosis:
    engine = get_engine(setting.flow if setting is not None else EngineSpec())
    probe = first_batch(scoring.batches)[0]  # one batch: which modules the lowered model left float
    custom = setting.custom if setting is not None else CustomConfigSpec()
    bounds = engine.bounded_producers(loaded.model, custom)
    layers, logged = engine.module_numerics(
        calibrated.model, lowered.model, scoring.inputs(), lowered.engine, getattr(reference, "model", None), bounds
    )
    measure = Measure(scoring, loaded.has_accuracy, lowered.engine, probe)
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
            verified.append(verify_skip(faulty, calibrated.model, setting, measure, before, spec.min_gain_db))
        if faults and reference is not None:
            for other in ("x86", "fbgemm") if lowered.engine not in ("x86", "fbgemm") else ():
                verified.append(verify_backend(other, reference, setting, measure, before))
                if verified[-1].helps:
                    break
        clamp_off = setting.recovery is not None and not clamps_bounded(setting.recovery, lowered.engine)
        if wide and clamp_off and setting.recovery is not None and lowered.engine != "qnnpack":
            on = replace(setting.recovery, bounded_activations="on")
            verified.append(
                verify_recalibrated(
                    "recovery.bounded_activations=on",
                    on,
                    setting,
                    skip or SkipSpec(),
                    measure,
                    before,
                    spec.min_gain_db,
                )
            )
        for layer in candidates:
            verified.append(
                verify_skip([layer.module_name], calibrated.model, setting, measure, before, spec.min_gain_db)
            )
        helping = [v for v in verified if v.helps and v.what.startswith("skip.")]
        if len(helping) > 1:  # the layers that helped alone, together
            names = [name for v in helping for name in skipped(v)]
            verified.append(verify_skip(names, calibrated.model, setting, measure, before, spec.min_gain_db))
        elif not helping and len(candidates) > 1:
            # None helped alone: a layer hurt by its int8 input (an outlier made upstream) needs its producer
            # float too, so the candidates are also tried together.
            names = [layer.module_name for layer in candidates]
            verified.append(verify_skip(names, calibrated.model, setting, measure, before, spec.min_gain_db))
    undone: list[str] = []
    if skip is not None and skip.module_name:
        kept_float = engine.float_outputs(lowered.model, list(skip.module_name), probe, lowered.engine)
        undone = [name for name in skip.module_name if kept_float.get(name) is False]
    if spec.verify and setting is not None:
        skips = [v for v in verified if v.helps and v.what.startswith("skip.")]
        best = max(skips, key=lambda v: (v.gain_db or 0.0, -len(skipped(v))), default=None)
        suggested_names = skipped(best) if best is not None else []
    else:
        suggested_names = [layer.module_name for layer in candidates]
    suggested = SkipSpec(name="suggested", module_name=suggested_names)
    diagnosis = Diagnosis(
        layers, first_sqnr, bool(faults), "", suggested, logged, before[0], faults, wide, verified, undone
    )
    bits = activation_bits(setting.recovery, lowered.engine) if setting is not None else None
    diagnosis.text = explain(diagnosis, bounds, lowered.engine, spec, skip, bits)
    return diagnosis


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
    setting = Setting(
        spec.backend,
        spec.qconfig_mapping,
        spec.custom_config,
        searched.recovery if searched else spec.recovery,
        [inputs for inputs, _ in loaded.data.calibration[: spec.calibrate.max_batches]],
        loaded.model,
        loaded.data.example_inputs,
        loaded.model_name,
        spec.engine,
    )
    skip = artifacts.get("searched_skip") or spec.skip
    cache_dir = Path(spec.cache.dir) if spec.cache.enabled and spec.cache.float_outputs else None
    diagnosis = diagnose(
        loaded, calibrated, artifacts["lowered"], spec.diagnose, setting, skip, artifacts.get("reference"), cache_dir
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
