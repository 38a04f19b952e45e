"""Accuracy recovery, option by option, on the test models that show the problems.

Per model (the MobileNet-style ReLU6 CNN, the outlier transformer and the digits default), runs the
pipeline in-process (load -> calibrate -> reference_convert -> lower -> evaluate, tracking off, no cache)
for: the old defaults with every recovery option off ("baseline": 7-bit activations on x86, histogram
observers), each option alone on top of it, the new defaults (conf/recovery/default.yaml as resolved on
this CPU), and the new defaults with each alternative observer; then the search's winner (search=greedy,
a one-point accuracy bar) from the new defaults, from the baseline (where its recovery phase may switch
to the defaults first) and from the baseline with skips only (search.recovery_phase=false), with its
trial count. Prints accuracy, top-1 agreement with float, output SQNR and
cosine against float, the lowered model's SQNR against its reference model (int8 kernels vs their float
simulation: exactness of 8-bit activations), the batch-1 speedup, and the search's trials / float layers.
deep_mlp (98 Linears, four activation outliers, SmoothQuant off) shows the search's trial count on ~100 layers.

    python bench/accuracy_recovery.py [--models mobile_digits outlier_transformer digits_cnn deep_mlp] [--backend x86]

Writes outputs/bench/accuracy_recovery.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from pipeline import metric_keys
from pipeline.engine.qconfigs import quantized_engine
from pipeline.measure import sqnr_db

try:
    from bench import _common as common
except ModuleNotFoundError:  # python bench/accuracy_recovery.py: sys.path starts with bench/
    import _common as common  # type: ignore[no-redef]

# The models that show the problems (text_encoder is in bench/peers.py).
RECOVERY_MODELS = ["mobile_digits", "outlier_transformer", "digits_cnn", "deep_mlp"]
# The search's rows: search=greedy, a one-point accuracy bar, the stages that then use its winner.
SEARCH = ["search=greedy", "search.max_drop=0.01", "stages=[load,calibrate,search,reference_convert,lower,evaluate]"]
# (label, overrides on top of the baseline, or on top of the defaults when `from_defaults`)
ARMS: list[tuple[str, list[str], bool]] = [
    ("baseline (all off, 7-bit)", [], False),
    ("+ activation_bits=8", ["recovery.activation_bits=8"], False),
    ("+ bounded_activations=on", ["recovery.bounded_activations=on"], False),
    ("+ bias_correction", ["recovery.bias_correction=true"], False),
    ("+ smoothquant_alpha=0.5", ["recovery.smoothquant_alpha=0.5"], False),
    ("+ percentile observer", ["backend.default_qconfig=percentile_per_channel"], False),
    ("+ mse observer", ["backend.default_qconfig=mse_per_channel"], False),
    ("new defaults (all on, auto)", [], True),
    ("defaults + percentile", ["backend.default_qconfig=percentile_per_channel"], True),
    ("defaults + mse", ["backend.default_qconfig=mse_per_channel"], True),
    ("search winner (defaults)", SEARCH, True),
    ("search winner (baseline)", SEARCH, False),
    ("search, skips only (baseline)", [*SEARCH, "search.recovery_phase=false"], False),
]


def run_arm(overrides: list[str], out_dir: Path) -> dict[str, float]:
    run = common.run_pipeline(overrides, out_dir)
    loaded, lowered, reference = (run.artifact(name) for name in ("loaded", "lowered", "reference"))
    inputs = common.evaluation_inputs(loaded.data.evaluation)
    with torch.no_grad(), quantized_engine(run.spec.backend.engine):
        float_out, int8_out, reference_out = (inputs.call(m) for m in (loaded.model, lowered.model, reference.model))
    search = run.result.artifacts.get("search")
    return {
        "search_trials": len(search.trials) if search else None,
        "search_float_layers": len(search.winner.skipped) if search else None,
        "search_met": search.met if search else None,
        "float_accuracy": run.metric(metric_keys.FLOAT_ACCURACY),
        "accuracy": run.metric(metric_keys.LOWERED_ACCURACY),
        "agreement": run.metric(metric_keys.LOWERED_AGREEMENT),
        "sqnr_db": sqnr_db(float_out, int8_out),
        "cosine": common.cosine(float_out, int8_out),
        "lowered_vs_reference_db": sqnr_db(reference_out, int8_out),
        "speedup_b1": run.metric(metric_keys.speedup(1)),
        "seconds": run.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=RECOVERY_MODELS, choices=list(common.MODELS))
    parser.add_argument("--backend", default="x86")
    parser.add_argument("--arms", nargs="+", help="only the arms whose label starts with one of these")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = common.machine(args.backend)
    print(f"{common.machine_line(info)}, backend={args.backend}, 1 thread for latency")
    report: dict[str, object] = {"machine": info, "models": {}}
    header = (
        f"{'arm':<30}{'acc':>7}{'agree':>7}{'SQNR dB':>9}{'cosine':>8}{'int8 vs ref dB':>15}{'speedup':>9}"
        f"{'trials':>8}{'float':>7}"
    )
    for model in args.models:
        rows = {}
        for label, overrides, from_defaults in ARMS:
            if args.arms and not any(label.startswith(prefix) for prefix in args.arms):
                continue
            with tempfile.TemporaryDirectory() as folder:
                base = [*common.MODELS[model], f"backend={args.backend}", *([] if from_defaults else common.BASELINE)]
                rows[label] = run_arm([*base, *overrides], Path(folder))
        first = next(iter(rows.values()))  # the baseline, or the first arm asked for
        print(f"\n{model}: float accuracy {first['float_accuracy']:.4f}")
        print(header)
        for label, row in rows.items():
            print(
                f"{label:<30}{row['accuracy']:>7.4f}{row['agreement']:>7.3f}{row['sqnr_db']:>9.2f}{row['cosine']:>8.4f}"
                f"{row['lowered_vs_reference_db']:>15.1f}{row['speedup_b1']:>9.2f}"
                + (
                    f"{row['search_trials']:>8}{row['search_float_layers']:>7}"
                    + ("" if row["search_met"] else "  (bar missed)")
                    if row["search_trials"] is not None
                    else ""
                )
            )
        report["models"][model] = rows  # type: ignore[index]
    out = common.write_report("accuracy_recovery", report)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
