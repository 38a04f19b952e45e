"""Greedy skip search against an exhaustive sweep of single-layer skips, on the same calibration.

Model: the outlier MLP (conf/model/outlier_mlp.yaml), where full int8 misses a one-point accuracy
bar. Both arms start from one calibrated model; the exhaustive arm converts and evaluates the fully
quantized model plus every single-layer skip, and keeps the fastest that meets the bar.

    python bench/search_vs_exhaustive.py [--max-drop 0.01]

Prints a table and writes outputs/bench/search_vs_exhaustive.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from hydra import compose, initialize_config_dir

from pipeline import schema
from pipeline.validation import validate
from stages.calibrate import calibrate
from stages.evaluate import evaluate
from stages.load import load
from stages.lower import lower
from stages.reference_convert import reference_convert
from stages.search import search

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-drop", type=float, default=0.01)
    args = parser.parse_args()
    schema.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "model=outlier_mlp",
                "search=greedy",
                f"search.max_drop={args.max_drop}",
                "evaluate.latency.batch_sizes=[1]",
            ],
        )
    spec = schema.from_config(cfg)
    validate(spec)
    loaded = load(spec.model, spec.data, spec.seed)
    start = time.perf_counter()
    calibrated = calibrate(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.calibrate)
    calibration_seconds = time.perf_counter() - start

    start = time.perf_counter()
    result = search(
        loaded, calibrated, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.evaluate, spec.search
    )
    greedy = {
        "trials": len(result.trials),
        "seconds": time.perf_counter() - start,
        "met_bar": result.met,
        "float_layers": result.winner.skipped,
        "accuracy": result.winner.metrics.get("eval/lowered/accuracy"),
        "speedup_b1": result.winner.metrics.get("latency/speedup_b1"),
    }

    start = time.perf_counter()
    layers = [layer.module_name for layer in result.sensitivity]  # every quantized layer, by name
    exhaustive_trials = []
    for skipped in [[], *([name] for name in layers)]:
        skip = replace(spec.skip, name="single", module_name=skipped)
        reference = reference_convert(calibrated, spec.backend, spec.qconfig_mapping, skip, spec.custom_config)
        lowered = lower(reference, spec.backend, loaded.data.example_inputs)
        metrics = evaluate(loaded, {"lowered": lowered.model}, spec.backend.engine, spec.evaluate).metrics
        exhaustive_trials.append((skipped, metrics))
    float_accuracy = exhaustive_trials[0][1]["eval/float/accuracy"]
    passing = [t for t in exhaustive_trials if t[1]["eval/lowered/accuracy"] >= float_accuracy - args.max_drop]
    best = (
        min(passing, key=lambda t: t[1]["latency/lowered/b1_ms"])
        if passing
        else max(exhaustive_trials, key=lambda t: t[1]["eval/lowered/accuracy"])
    )
    exhaustive = {
        "trials": len(exhaustive_trials),
        "seconds": time.perf_counter() - start,
        "met_bar": bool(passing),
        "float_layers": best[0],
        "accuracy": best[1]["eval/lowered/accuracy"],
        "speedup_b1": best[1]["latency/speedup_b1"],
    }

    report = {
        "model": "outlier_mlp",
        "backend": spec.backend.engine,
        "float_accuracy": float_accuracy,
        "bar": float_accuracy - args.max_drop,
        "fully_quantized_accuracy": exhaustive_trials[0][1]["eval/lowered/accuracy"],
        "quantizable_layers": len(layers),
        "calibrations": 1,
        "calibration_seconds": calibration_seconds,
        "greedy": greedy,
        "exhaustive_single_layer": exhaustive,
        "torch_threads_for_latency": spec.evaluate.latency.threads,
    }
    print(
        f"float accuracy {float_accuracy:.4f}, bar {report['bar']:.4f}, fully quantized "
        f"{report['fully_quantized_accuracy']:.4f}, {len(layers)} quantizable layers, one calibration "
        f"({calibration_seconds:.2f} s)"
    )
    print(f"{'arm':<26}{'trials':>7}{'seconds':>9}{'meets':>7}{'accuracy':>10}{'speedup':>9}  float layers")
    for name, arm in (("greedy search", greedy), ("exhaustive single skips", exhaustive)):
        print(
            f"{name:<26}{arm['trials']:>7}{arm['seconds']:>9.2f}{arm['met_bar']!s:>7}{arm['accuracy']:>10.4f}"
            f"{arm['speedup_b1']:>9.2f}  {arm['float_layers']}"
        )
    out = Path("outputs/bench/search_vs_exhaustive.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
