"""What the pipeline costs on top of the work itself.

Times, on the embedded default (x86), (1) each stage of a full default run and (2) the pipeline
running the same work as a plain script (prepare_fx, calibrate, convert_fx, accuracy on the
evaluation part) against that plain script, both in-process after imports, median of N repeats.
The pipeline's extra work is config validation, MLflow logging, writing each stage's outputs,
and evaluating float/reference/lowered with SQNR and agreement.

    python bench/pipeline_overhead.py [--repeats 3]

Prints a table and writes outputs/bench/pipeline_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from pipeline import runner, schema
from pipeline.validation import validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Every run calibrates, as the plain script does: the runs share one output folder, so the calibration
# cache would otherwise turn every repeat's calibration into a cache hit.
FULL = ["cache.enabled=false"]
COMPARABLE = [
    *FULL,
    "stages=[load,calibrate,reference_convert,lower,evaluate]",
    "evaluate.latency.enabled=false",
    "diagnose.enabled=false",  # per-layer diagnostics are extra work the plain script does not do
]


STORE = tempfile.TemporaryDirectory()  # one MLflow store for every run, as a user has


def pipeline_run(overrides: list[str]) -> tuple[float, dict[str, float]]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"output_dir={STORE.name}", *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        spec = schema.from_config(cfg)
        validate(spec)
        state = runner.run(spec, cfg, Path(run_dir))
        return time.perf_counter() - start, state.metrics


def plain_script() -> tuple[float, float]:
    """What a user would write by hand for the same result."""
    warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from stages.sources.digits import digits_cnn, digits_data

    start = time.perf_counter()
    torch.backends.quantized.engine = "x86"
    model, data = digits_cnn(), digits_data()
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), data.example_inputs.args)
    with torch.no_grad():
        for inputs, _ in data.calibration:
            inputs.call(prepared)
        quantized = convert_fx(prepared)
        correct = sum((x.call(quantized).argmax(1) == y).sum().item() for x, y in data.evaluation)
    accuracy = correct / data.num_evaluation_samples
    return time.perf_counter() - start, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    schema.register()
    store_seconds, _ = pipeline_run(COMPARABLE)  # warm-up: imports, and the MLflow store's one-time creation
    plain_script()

    full = [pipeline_run(FULL) for _ in range(args.repeats)]
    comparable = [pipeline_run(COMPARABLE)[0] for _ in range(args.repeats)]
    plain = [plain_script() for _ in range(args.repeats)]

    stages = [key.split("/")[1] for key in full[0][1] if key.startswith("stage/") and key.endswith("/seconds")]
    stage_seconds = {
        stage: statistics.median(metrics[f"stage/{stage}/seconds"] for _, metrics in full) for stage in stages
    }
    result = {
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "full_run_seconds": statistics.median(seconds for seconds, _ in full),
        "full_run_stage_seconds": stage_seconds,
        "comparable_pipeline_seconds": statistics.median(comparable),
        "plain_script_seconds": statistics.median(seconds for seconds, _ in plain),
        "plain_script_accuracy": plain[0][1],
        "pipeline_lowered_accuracy": full[0][1]["eval/lowered/accuracy"],
    }
    result["first_run_with_new_store_seconds"] = store_seconds
    result["overhead_ratio"] = result["comparable_pipeline_seconds"] / result["plain_script_seconds"]

    print(f"{'what':<44}{'seconds':>10}")
    for stage, seconds in stage_seconds.items():
        print(f"{'full default run: ' + stage:<44}{seconds:>10.3f}")
    print(f"{'full default run: total':<44}{result['full_run_seconds']:>10.3f}")
    print(f"{'pipeline, same work as the plain script':<44}{result['comparable_pipeline_seconds']:>10.3f}")
    print(f"{'plain script (prepare/calibrate/convert/eval)':<44}{result['plain_script_seconds']:>10.3f}")
    print(f"{'overhead ratio (pipeline / plain)':<44}{result['overhead_ratio']:>10.2f}")
    print(f"{'(first run ever: creates the MLflow store)':<44}{store_seconds:>10.3f}")
    print(f"accuracy: pipeline {result['pipeline_lowered_accuracy']:.4f}, plain {result['plain_script_accuracy']:.4f}")
    out = Path("outputs/bench/pipeline_overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
