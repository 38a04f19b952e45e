"""What diagnose found (stages/diagnose.py computes it), and its plain words: diagnosis.txt, engine faults
and wide ranges named with their fix, the most sensitive layers, then each suggestion with its measured gain."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.engine.numerics import LayerDiagnostics, LoggedOutput
from pipeline.engine.recovery import has_vnni
from pipeline.engine.suggestions import Verified
from pipeline.schema import DiagnoseSpec, SkipSpec

_BOUNDED_TYPES = ("ReLU6", "Hardtanh", "relu6", "hardtanh")


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
    cumulative_only = any(layer.cumulative_only for layer in diagnosis.layers)
    if cumulative_only:
        parts.append(
            "Per-node figures (engine=pt2e: torchao's numeric debugger, each node of the q/dq program against the "
            "same node of the calibrated prepared model) are CUMULATIVE: a node's output carries the error of "
            "every node before it, so a low figure may start upstream; own, weight and kernel SQNR are not "
            "measured. Lowest cumulative SQNR: "
            + ", ".join(f"{layer.module_name} ({layer.quantized_type}) {layer.own_sqnr_db:.1f} dB" for layer in shown)
            + "."
        )
    elif shown:
        parts.append(
            "Most sensitive layers (own SQNR: the int8 layer alone on the float input"
            + (", after the ReLU6 clip where it feeds one" if any(layer.clipped_to for layer in shown) else "")
            + "): "
            + ", ".join(f"{layer.module_name} ({layer.quantized_type}) {layer.own_sqnr_db:.1f} dB" for layer in shown)
            + "."
        )
    if diagnosis.verified:
        how = (
            "calibrated anew with it (pt2e skips at prepare time)"
            if cumulative_only
            else "re-converted from the calibration"
        )
        parts.append(f"Suggestions, each {how} and measured on the same batches:")
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
