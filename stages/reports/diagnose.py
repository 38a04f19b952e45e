"""The files the diagnose stage writes: layers.csv, suggestions.csv, diagnosis.txt, suggested_skip.yaml and
layers.png."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from pipeline.engine.diagnosis import Diagnosis
from pipeline.engine.numerics import LayerDiagnostics
from pipeline.schema import DiagnoseSpec, skip_yaml


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
                    "" if layer.cumulative_only else _number(layer.own_sqnr_db),  # pt2e: not measured
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

    def own(layer: LayerDiagnostics) -> float | None:
        return None if layer.cumulative_only else layer.own_sqnr_db  # pt2e: not measured, no bar

    rows = range(len(layers))
    figure, axis = plt.subplots(figsize=(10, 1.5 + 0.45 * len(layers)))
    height = 0.27
    for offset, label, color, values in (
        (-height, "own (layer alone, float inputs)", "tab:red", [own(layer) for layer in layers]),
        (0.0, "cumulative (through the int8 network)", "tab:blue", [layer.cumulative_sqnr_db for layer in layers]),
        (height, "weight", "0.6", [layer.weight_sqnr_db for layer in layers]),
    ):
        if any(v is not None for v in values):  # a figure not measured (pt2e's own and weight) gets no legend entry
            axis.barh([r + offset for r in rows], [shown(v) for v in values], height=height, color=color, label=label)
    axis.set_yticks(list(rows), [f"{layer.module_name} ({layer.quantized_type})" for layer in layers])
    axis.invert_yaxis()  # worst at the top
    axis.axvline(spec.skip_below_db, linestyle="--", color="black", label=f"skip below {spec.skip_below_db:g} dB")
    axis.set_xlabel("SQNR vs float (dB, higher is better)")
    if any(layer.cumulative_only for layer in layers):
        axis.set_title("Per-node SQNR (engine=pt2e: cumulative only, against the prepared model), worst first")
    else:
        axis.set_title("Per-layer SQNR, worst own SQNR first")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never over a bar
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
