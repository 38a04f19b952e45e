"""Stage `diagnose` (after `lower`, when diagnose.enabled=true): where the int8 model's error comes from.

torch's FX numeric suite compares the calibrated (prepared) model with the lowered one on a few
evaluation batches. For each quantized layer: its cumulative SQNR (its output through the whole int8
network so far, earlier layers' error included), its own SQNR (the int8 layer alone on the float
model's input to it) and its weight SQNR. Then a plain-words diagnosis and a suggested skip-list.

Config keys read: diagnose.* (the engine is the lowered model's, backend.engine).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from pipeline import metric_keys
from pipeline.batch import ModelInputs
from pipeline.engine import get_engine, introspect
from pipeline.engine.numerics import LayerDiagnostics, LoggedOutput
from pipeline.schema import DiagnoseSpec, EngineSpec, SkipSpec, skip_yaml
from stages.types import Calibrated, Loaded, Lowered, StageContext

log = logging.getLogger(__name__)

NAME = "diagnose"
CONSUMES = ("loaded", "calibrated", "lowered")
USES: tuple[str, ...] = ()
PRODUCES = ("diagnosis",)
READS = ("diagnose", "custom_config")
OPTIONAL = True
FAILURE_IS_FATAL = False  # an analysis: nothing later needs its report; a failure is recorded and the run goes on


@dataclass
class Diagnosis:
    layers: list[LayerDiagnostics]  # worst own SQNR first
    first_layer_sqnr_db: float
    engine_problem: bool
    text: str
    suggested: SkipSpec


def first_layer(logged: list[LoggedOutput]) -> list[LoggedOutput]:
    """The ops up to the second op with weights: the first conv/linear with what follows it. An unfused
    activation such as ReLU6 belongs to its layer, and is where kernel faults show."""
    weighted = [i for i, output in enumerate(logged) if output.has_weight]
    end = weighted[1] if len(weighted) > 1 else len(logged)
    return logged[:end]


def diagnose(
    loaded: Loaded, calibrated: Calibrated, lowered: Lowered, spec: DiagnoseSpec, flow: EngineSpec | None = None
) -> Diagnosis:
    inputs = ModelInputs.cat([x for x, _ in loaded.data.evaluation[: spec.max_batches]])
    layers, logged = get_engine(flow or EngineSpec()).layer_diagnostics(
        calibrated.model, lowered.model, inputs, lowered.engine
    )
    first = first_layer(logged)
    first_sqnr = min(output.sqnr_db for output in first)
    later = logged[len(first) :]
    worst_later = min((output.sqnr_db for output in later), default=first_sqnr)
    engine_problem = first_sqnr < spec.first_layer_db and worst_later >= first_sqnr - spec.later_margin_db
    candidates = [layer for layer in layers if layer.module_name and layer.own_sqnr_db < spec.skip_below_db]
    skipped = list(dict.fromkeys(layer.module_name for layer in candidates))[: spec.max_skip]
    suggested = SkipSpec(name="suggested", module_name=skipped)
    text = _explain(layers, logged, first, first_sqnr, worst_later, engine_problem, skipped, lowered.engine, spec)
    return Diagnosis(layers, first_sqnr, engine_problem, text, suggested)


def _explain(
    layers: list[LayerDiagnostics],
    logged: list[LoggedOutput],
    first: list[LoggedOutput],
    first_sqnr: float,
    worst_later: float,
    engine_problem: bool,
    skipped: list[str],
    engine: str,
    spec: DiagnoseSpec,
) -> str:
    names = ", ".join(f"{output.module_name or output.key} ({output.quantized_type})" for output in first)
    if engine_problem:
        relu6 = any(output.quantized_type in ("ReLU6", "Hardtanh", "relu6", "hardtanh") for output in first)
        return (
            f"The error starts at the first quantized layer: {names} already has a cumulative SQNR of "
            f"{first_sqnr:.1f} dB (below diagnose.first_layer_db={spec.first_layer_db:g}), and the rest of the "
            f"network is not much worse (worst later op {worst_later:.1f} dB). Sensitive layers do not look like "
            f"this: it is a kernel or engine problem of backend '{engine}', and no skip-list of sensitive layers "
            f"fixes it. Try another backend (backend=x86 or backend=fbgemm). On qnnpack, quantized ReLU6/hardtanh "
            f"after a quantized conv gives wrong values in torch 2.13 (channels-last quint8): use ReLU instead of "
            f"ReLU6{' (this first layer has one)' if relu6 else ''}."
        )
    worst = ", ".join(f"{layer.module_name or '(top level)'} {layer.own_sqnr_db:.1f} dB" for layer in layers[:3])
    text = (
        f"The first layer ({names}) is fine at {first_sqnr:.1f} dB cumulative SQNR, so the error is not an engine "
        f"fault at the input. Most sensitive layers (own SQNR, each quantized alone on float inputs): {worst}."
    )
    drops = [(before.sqnr_db - after.sqnr_db, before, after) for before, after in pairwise(logged)]
    worst_drop = max(drops, key=lambda drop: drop[0], default=None)
    if worst_drop is not None and worst_drop[0] > 0:
        _, before, after = worst_drop
        text += (
            f" The cumulative SQNR falls most at {after.module_name or after.key} ({before.sqnr_db:.1f} -> "
            f"{after.sqnr_db:.1f} dB): the error of the layers feeding it is amplified there."
        )
    if skipped:
        return text + (
            f" Suggested to leave float (own SQNR below diagnose.skip_below_db={spec.skip_below_db:g} dB, at most "
            f"{spec.max_skip}): {', '.join(skipped)}; see suggested_skip.yaml."
        )
    return text + f" No layer is below diagnose.skip_below_db={spec.skip_below_db:g} dB: nothing is suggested to skip."


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def write_outputs(diagnosis: Diagnosis, spec: DiagnoseSpec, out: Path) -> None:
    """layers.csv, layers.png, diagnosis.txt and suggested_skip.yaml under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "layers.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["rank", "module_name", "op_type", "own_sqnr_db", "cumulative_sqnr_db", "weight_sqnr_db"])
        for rank, layer in enumerate(diagnosis.layers, start=1):
            writer.writerow(
                [
                    rank,
                    layer.module_name,
                    layer.quantized_type,
                    _number(layer.own_sqnr_db),
                    _number(layer.cumulative_sqnr_db),
                    _number(layer.weight_sqnr_db),
                ]
            )
    (out / "diagnosis.txt").write_text(diagnosis.text + "\n")
    header = (
        f"Suggested by the diagnose stage: layers whose own SQNR is below diagnose.skip_below_db="
        f"{spec.skip_below_db:g} dB, at most {spec.max_skip}, worst first.\n"
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

    layers = diagnosis.layers
    finite = [
        v
        for layer in layers
        for v in (layer.own_sqnr_db, layer.cumulative_sqnr_db, layer.weight_sqnr_db)
        if v is not None and math.isfinite(v)
    ]
    cap = max(finite, default=0.0) + 10.0  # an identical output (inf dB) is drawn to the edge

    def shown(value: float | None) -> float:
        return 0.0 if value is None else min(value, cap)

    rows = range(len(layers))
    figure, axis = plt.subplots(figsize=(10, 1.5 + 0.45 * len(layers)))
    height = 0.27
    for offset, label, color, values in (
        (-height, "own (layer alone, float inputs)", "tab:red", [layer.own_sqnr_db for layer in layers]),
        (0.0, "cumulative (through the int8 network)", "tab:blue", [layer.cumulative_sqnr_db for layer in layers]),
        (height, "weight", "0.6", [layer.weight_sqnr_db for layer in layers]),
    ):
        axis.barh([r + offset for r in rows], [shown(v) for v in values], height=height, color=color, label=label)
    axis.set_yticks(list(rows), [f"{layer.module_name or '(top level)'} ({layer.quantized_type})" for layer in layers])
    axis.invert_yaxis()  # worst at the top
    axis.axvline(spec.skip_below_db, linestyle="--", color="black", label=f"skip below {spec.skip_below_db:g} dB")
    axis.set_xlabel("SQNR vs float (dB, higher is better)")
    axis.set_title("Per-layer SQNR, worst own SQNR first")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never over a bar
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def compute(ctx: StageContext) -> dict[str, Any]:
    """The diagnosis, or the reason the numeric suite cannot run on this model (a str)."""
    blocker = get_engine(ctx.spec.engine).numerics_blocker(ctx.spec.custom_config)
    float_io = [] if blocker else introspect.float_io_quantized_ops(ctx.artifacts["lowered"].model)
    if blocker is None and float_io:
        blocker = (
            f"torch's FX numeric suite compares int8 activations, and the dynamic, float16 or weight-only ops of "
            f"qconfig_mapping={ctx.spec.qconfig_mapping.name} have none ({', '.join(float_io[:2])})"
        )
    if blocker is not None:
        log.warning("diagnose: skipped: %s (diagnose.enabled=false silences this).", blocker)
        return {"diagnosis": f"Skipped: {blocker}."}
    artifacts = ctx.artifacts
    diagnosis = diagnose(
        artifacts["loaded"], artifacts["calibrated"], artifacts["lowered"], ctx.spec.diagnose, ctx.spec.engine
    )
    log.log(logging.WARNING if diagnosis.engine_problem else logging.INFO, "diagnose: %s", diagnosis.text)
    return {"diagnosis": diagnosis}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """layers.csv, layers.png, diagnosis.txt and suggested_skip.yaml (only diagnosis.txt when skipped)."""
    diagnosis: Diagnosis | str = produced["diagnosis"]
    if isinstance(diagnosis, str):
        (ctx.out_dir / "diagnosis.txt").write_text(diagnosis + "\n")
        return {metric_keys.DIAGNOSE_SKIPPED: 1.0}
    write_outputs(diagnosis, ctx.spec.diagnose, ctx.out_dir)
    return {
        metric_keys.DIAGNOSE_LAYERS: float(len(diagnosis.layers)),
        metric_keys.DIAGNOSE_WORST_LAYER_SQNR_DB: diagnosis.layers[0].own_sqnr_db if diagnosis.layers else float("nan"),
        metric_keys.DIAGNOSE_FIRST_LAYER_SQNR_DB: diagnosis.first_layer_sqnr_db,
        metric_keys.DIAGNOSE_ENGINE_PROBLEM: float(diagnosis.engine_problem),
        metric_keys.DIAGNOSE_SUGGESTED_SKIP: float(len(diagnosis.suggested.module_name)),
    }
