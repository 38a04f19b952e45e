"""What the pipeline costs on top of the work itself.

Times, on the embedded default (x86; `--model digits`) or the ResNet-18-shaped net at 224 px with 64
calibration and 64 evaluation images (`--model resnet18`), (1) each stage of a full default run and its
share of the run, (2) that full run's wall time against a plain script that builds the same model and
data, calibrates (prepare_fx), converts (convert_fx) and computes accuracy (argmax agreement with float
for the random-weight ResNet) once, and (3) the pipeline running only the plain script's work (no
diagnose, latency, export, bias correction or SmoothQuant; tracking on, as a user runs it), all
in-process after imports, median of N repeats (a full, a same-work and a plain run per repeat,
interleaved; each ratio is the median of the repeats' own ratios). The full run's extra work is config
validation, MLflow logging, the per-layer diagnosis, latency (adaptive, intervals logged), the exported
files and writing each stage's outputs. Every run calibrates (cache.enabled=false); the float reference's latency cache
(<cache.dir>/latency) is on in the full runs, so the first full run times the float model
(reported separately: `first_full_run_seconds`) and the repeats reuse it, as a sweep does.

    python bench/pipeline_overhead.py [--model digits|resnet18] [--repeats 3]

Prints a table and writes outputs/bench/pipeline_overhead[_resnet18].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from pipeline import metric_keys, runner, schema
from pipeline.validation import validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MODELS = {
    "digits": [],
    # 64 calibration and 64 evaluation images of 224 x 224, batches of 8.
    "resnet18": [
        "model=resnet18",
        "data=synthetic",
        "data.factory.calibration_batches=8",
        "data.factory.evaluation_batches=8",
    ],
}
# Every run calibrates, as the plain script does: the runs share one output folder, so the calibration
# cache would otherwise turn every repeat's calibration into a cache hit (the full runs get a fresh
# cache.dir each instead, see full_run).
COMPARABLE = [
    "cache.enabled=false",
    "stages=[load,calibrate,reference_convert,lower,evaluate]",
    "evaluate.latency.enabled=false",
    "diagnose.enabled=false",  # per-layer diagnostics are extra work the plain script does not do
    # Accuracy recovery beyond the observers is extra work too: bias correction runs the reference model
    # over 64 calibration samples, SmoothQuant looks for LayerNorm-fed Linears.
    "recovery.bias_correction=false",
    "recovery.smoothquant_alpha=0",
    "evaluate.models=[float,lowered]",  # float (for SQNR/agreement) and the int8 model, as the plain script
]


STORE = tempfile.TemporaryDirectory()  # one MLflow store for every run, as a user has
LATENCY_CACHE = Path(STORE.name) / "latency-from-first-run"
LOAD_AT_START = " ".join(f"{value:.1f}" for value in os.getloadavg())


def machine_line() -> str:
    from pipeline.engine.recovery import has_vnni
    from pipeline.machine import cpu_model

    return f"{cpu_model()}, VNNI {'yes' if has_vnni() else 'no'}, torch {torch.__version__}"


def pipeline_run(overrides: list[str]) -> tuple[float, dict[str, float]]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"output_dir={STORE.name}", *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        spec = schema.from_config(cfg)
        validate(spec)
        state = runner.run(spec, cfg, Path(run_dir))
        return time.perf_counter() - start, state.metrics


def plain_script(model_overrides: list[str]) -> tuple[float, float]:
    """What a user would write by hand for the same result: the same model and data factories, the
    backend's default mapping, one calibration, convert_fx, and accuracy (or, without labels, top-1
    agreement with the float model)."""
    warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
    from hydra.utils import instantiate
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=model_overrides)
    start = time.perf_counter()
    torch.backends.quantized.engine = "x86"
    torch.manual_seed(0)
    model, data = instantiate(cfg.model.factory).eval(), instantiate(cfg.data.factory)
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), data.example_inputs.args)
    with torch.no_grad():
        for inputs, _ in data.calibration:
            inputs.call(prepared)
        quantized = convert_fx(prepared)
        hits = 0
        for x, y in data.evaluation:
            predicted = x.call(quantized).argmax(1)
            hits += (predicted == (y if y is not None else x.call(model).argmax(1))).sum().item()
    accuracy = hits / data.num_evaluation_samples
    return time.perf_counter() - start, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    schema.register()
    chosen = MODELS[args.model]

    def full_run() -> tuple[float, dict[str, float]]:
        """A default run that calibrates (a fresh cache folder) but finds the float reference's latency
        from the first full run (its latency/ folder copied in), as the jobs of a sweep do."""
        cache_dir = Path(tempfile.mkdtemp(dir=STORE.name, prefix="cache-"))
        if LATENCY_CACHE.is_dir():
            shutil.copytree(LATENCY_CACHE, cache_dir / "latency")
        found = pipeline_run([*chosen, f"cache.dir={cache_dir}"])
        if not LATENCY_CACHE.is_dir() and (cache_dir / "latency").is_dir():
            shutil.copytree(cache_dir / "latency", LATENCY_CACHE)
        return found

    store_seconds, _ = pipeline_run([*chosen, *COMPARABLE])  # warm-up: imports, the MLflow store's creation
    plain_script(chosen)

    first_full = full_run()  # a fresh output folder: calibrates and times the float reference
    # Interleaved, one of each per repeat, so a load that comes and goes on a shared machine hits all three
    # alike; the ratios are the medians of each repeat's own ratio.
    full, comparable, plain = [], [], []
    for _ in range(args.repeats):
        full.append(full_run())
        comparable.append(pipeline_run([*chosen, *COMPARABLE])[0])
        plain.append(plain_script(chosen))

    stages = [key.split("/")[1] for key in full[0][1] if key.startswith("stage/") and key.endswith("/seconds")]
    stage_seconds = {
        stage: statistics.median(metrics[f"stage/{stage}/seconds"] for _, metrics in full) for stage in stages
    }
    full_seconds = statistics.median(seconds for seconds, _ in full)
    result = {
        "model": args.model,
        "machine": machine_line(),
        "load_average_at_start": LOAD_AT_START,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "full_run_seconds": statistics.median(seconds for seconds, _ in full),
        "full_run_stage_seconds": stage_seconds,
        "full_run_stage_share": {stage: seconds / full_seconds for stage, seconds in stage_seconds.items()},
        "first_full_run_seconds": first_full[0],
        "full_over_plain_ratio": statistics.median(f[0] / p[0] for f, p in zip(full, plain, strict=True)),
        "comparable_pipeline_seconds": statistics.median(comparable),
        "plain_script_seconds": statistics.median(seconds for seconds, _ in plain),
        "plain_script_accuracy": plain[0][1],
        "pipeline_lowered_accuracy": full[0][1].get("eval/lowered/accuracy", full[0][1].get("eval/lowered/agreement")),
    }
    result["first_run_with_new_store_seconds"] = store_seconds
    result["overhead_ratio"] = statistics.median(c / p[0] for c, p in zip(comparable, plain, strict=True))

    print(f"{result['machine']}; load average at start {LOAD_AT_START} (a shared machine: figures vary run to run)")
    print(f"{'what (' + args.model + ')':<44}{'seconds':>10}{'share':>8}")
    for stage, seconds in stage_seconds.items():
        print(f"{'full default run: ' + stage:<44}{seconds:>10.3f}{seconds / full_seconds:>8.0%}")
    print(f"{'full default run: total':<44}{result['full_run_seconds']:>10.3f}")
    print(f"{'first full run (times the float reference)':<44}{first_full[0]:>10.3f}")
    print(f"{'full run / plain script':<44}{result['full_over_plain_ratio']:>10.2f}")
    print(f"{'pipeline, same work as the plain script':<44}{result['comparable_pipeline_seconds']:>10.3f}")
    print(f"{'plain script (prepare/calibrate/convert/eval)':<44}{result['plain_script_seconds']:>10.3f}")
    print(f"{'overhead ratio (pipeline / plain)':<44}{result['overhead_ratio']:>10.2f}")
    print(f"{'(first run ever: creates the MLflow store)':<44}{store_seconds:>10.3f}")
    lowered = result["pipeline_lowered_accuracy"]  # None for the random-weight ResNet: it logs SQNR, not accuracy
    shown = f"{lowered:.4f}" if lowered is not None else "- (no accuracy logged)"
    sqnr = full[0][1].get(metric_keys.LOWERED_SQNR_DB)
    result["pipeline_lowered_sqnr_db"] = sqnr
    print(f"accuracy: pipeline {shown}, plain {result['plain_script_accuracy']:.4f} (plain: agreement without labels)")
    if sqnr is not None:
        print(f"pipeline lowered SQNR against float: {sqnr:.2f} dB")
    out = Path(f"outputs/bench/pipeline_overhead{'' if args.model == 'digits' else '_' + args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
