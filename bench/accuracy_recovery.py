"""Accuracy recovery, option by option, on the test models that show the problems.

Per model (the MobileNet-style ReLU6 CNN, the outlier transformer and the digits default), runs the
pipeline in-process (load -> calibrate -> reference_convert -> lower -> evaluate, tracking off, no cache)
for: the old defaults with every recovery option off ("baseline": 7-bit activations on x86, histogram
observers), each option alone on top of it, the new defaults (conf/recovery/default.yaml as resolved on
this CPU), and the new defaults with each alternative observer. Prints accuracy, top-1 agreement with
float, output SQNR and cosine against float, the lowered model's SQNR against its reference model
(int8 kernels vs their float simulation: exactness of 8-bit activations), and the batch-1 speedup.

    python bench/accuracy_recovery.py [--models mobile_digits outlier_transformer digits_cnn] [--backend x86]

Writes outputs/bench/accuracy_recovery.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from pipeline import metric_keys, runner, schema
from pipeline.batch import ModelInputs
from pipeline.engine.qconfigs import quantized_engine
from pipeline.engine.recovery import has_vnni
from pipeline.measure import sqnr_db
from pipeline.validation import validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

MODELS = {
    "mobile_digits": ["experiment=mobile_digits"],
    "outlier_transformer": ["experiment=outlier_transformer"],
    "digits_cnn": [],
}
BASELINE = [
    "recovery.activation_bits=7",
    "recovery.bounded_activations=off",
    "recovery.bias_correction=false",
    "recovery.smoothquant_alpha=0",
]
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
]
QUICK = [
    "tracking=off",
    "cache.enabled=false",
    "diagnose.enabled=false",
    "stages=[load,calibrate,reference_convert,lower,evaluate]",
    "evaluate.latency.batch_sizes=[1]",
    "evaluate.latency.forms=[eager,traced]",
    "evaluate.latency.warmup=5",
    "evaluate.latency.repeats=40",
]


def cosine(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Mean per-sample cosine similarity of the outputs."""
    return torch.nn.functional.cosine_similarity(reference.flatten(1), approximation.flatten(1), dim=1).mean().item()


def run_arm(overrides: list[str], out_dir: Path) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*QUICK, f"output_dir={out_dir}", *overrides])
    spec = schema.from_config(cfg)
    validate(spec)
    start = time.perf_counter()
    result = runner.run(spec, cfg, out_dir / "run")
    seconds = time.perf_counter() - start
    loaded, lowered, reference = (result.artifacts[name] for name in ("loaded", "lowered", "reference"))
    inputs = ModelInputs.cat([x for x, _ in loaded.data.evaluation])
    with torch.no_grad(), quantized_engine(spec.backend.engine):
        float_out, int8_out, reference_out = (inputs.call(m) for m in (loaded.model, lowered.model, reference.model))
    metrics = result.metrics
    return {
        "float_accuracy": metrics.get(metric_keys.FLOAT_ACCURACY),
        "accuracy": metrics.get(metric_keys.LOWERED_ACCURACY),
        "agreement": metrics.get(metric_keys.LOWERED_AGREEMENT),
        "sqnr_db": sqnr_db(float_out, int8_out),
        "cosine": cosine(float_out, int8_out),
        "lowered_vs_reference_db": sqnr_db(reference_out, int8_out),
        "speedup_b1": metrics.get(metric_keys.speedup(1)),
        "seconds": seconds,
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--backend", default="x86")
    args = parser.parse_args()
    schema.register()
    torch.set_num_threads(1)
    machine = {"cpu": cpu_model(), "vnni": has_vnni(), "torch": torch.__version__, "backend": args.backend}
    print(
        f"machine: {machine['cpu']}, VNNI {'yes' if machine['vnni'] else 'no'}, torch {machine['torch']}, "
        f"backend={args.backend}, 1 thread for latency"
    )
    report: dict[str, object] = {"machine": machine, "models": {}}
    header = f"{'arm':<30}{'acc':>7}{'agree':>7}{'SQNR dB':>9}{'cosine':>8}{'int8 vs ref dB':>15}{'speedup':>9}"
    for model in args.models:
        rows = {}
        for label, overrides, from_defaults in ARMS:
            with tempfile.TemporaryDirectory() as folder:
                base = [] if from_defaults else BASELINE
                rows[label] = run_arm([*MODELS[model], f"backend={args.backend}", *base, *overrides], Path(folder))
        first = next(iter(rows.values()))
        print(f"\n{model}: float accuracy {first['float_accuracy']:.4f}")
        print(header)
        for label, row in rows.items():
            print(
                f"{label:<30}{row['accuracy']:>7.4f}{row['agreement']:>7.3f}{row['sqnr_db']:>9.2f}{row['cosine']:>8.4f}"
                f"{row['lowered_vs_reference_db']:>15.1f}{row['speedup_b1']:>9.2f}"
            )
        report["models"][model] = rows  # type: ignore[index]
    out = Path("outputs/bench/accuracy_recovery.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
