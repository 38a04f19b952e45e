"""Bias correction: how many calibration samples it needs (recovery.bias_correction_samples).

Per model (the digits default, and the ResNet-18-shaped net at 224 px), the pipeline's steps in-process:
prepare with the default recovery, calibrate once, then for each sample count a fresh reference convert,
bias correction on the first N samples (timed: its float pass and its reference-model pass), lowering,
and the lowered model's output SQNR against float on the evaluation part; the gain is against the same
conversion without bias correction. The calibration is the default run's (digits: its 256 calibration
images; ResNet: 64 images, as bench/pipeline_overhead.py's run), the bias-correction samples come from a
pool of 256 calibration samples (for the ResNet, 32 batches of 8 of the synthetic data, of which the
first 8 are the calibration), so every row calibrates the same way and only the sample count changes.

    python bench/bias_correction.py [--models digits resnet18] [--samples 16 64 256]

Prints a table and writes outputs/bench/bias_correction.json.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
from torch import nn

from pipeline.batch import ModelInputs
from pipeline.engine import steps
from pipeline.engine.qconfigs import quantized_engine
from pipeline.measure import sqnr_db
from pipeline.schema import BackendSpec, CustomConfigSpec, QConfigMappingSpec, RecoverySpec, SkipSpec

try:
    from bench import _common as common
except ModuleNotFoundError:  # python bench/bias_correction.py: sys.path starts with bench/
    import _common as common  # type: ignore[no-redef]

X86 = BackendSpec(engine="x86", backend_config="x86")
MAPPING = QConfigMappingSpec(name="backend_default")
CUSTOM = CustomConfigSpec()


def digits() -> tuple[nn.Module, Any, list[ModelInputs], list[ModelInputs]]:
    """The default model and data; calibration = the pool = the 256 calibration images."""
    from stages.sources.digits import digits_cnn, digits_data

    torch.manual_seed(0)
    data = digits_data()
    pool = [x for x, _ in data.calibration]
    return digits_cnn().eval(), data, pool, pool


def resnet18() -> tuple[nn.Module, Any, list[ModelInputs], list[ModelInputs]]:
    """ResNet-18 shape, 224 px, batches of 8: calibration the first 8 batches, the pool 32 batches."""
    from stages.sources.resnet import resnet18 as build
    from stages.sources.synthetic import synthetic_data

    torch.manual_seed(0)
    data = synthetic_data(shape=[3, 224, 224], calibration_batches=32, evaluation_batches=8, batch_size=8, seed=0)
    pool = [x for x, _ in data.calibration]
    return build(num_classes=1000).eval(), data, pool[:8], pool


MODELS = {"digits": digits, "resnet18": resnet18}


def measure(name: str, samples: list[int]) -> list[dict[str, Any]]:
    model, data, calibration, pool = MODELS[name]()
    recovery = RecoverySpec()
    evaluation = ModelInputs.cat([x for x, _ in data.evaluation])
    prepared = steps.prepare(model, data.example_inputs, name, X86, MAPPING, CUSTOM, recovery, calibration)
    with quantized_engine("x86"), torch.no_grad():
        for inputs in calibration:
            inputs.call(prepared)
        expected = evaluation.call(model)

    def lowered_sqnr(count: int | None) -> tuple[float, float | None]:
        conversion = steps.convert_reference(prepared, X86, MAPPING, SkipSpec(name="none"), CUSTOM)
        seconds = None
        if count is not None:
            start = time.perf_counter()
            steps.correct_bias(conversion, prepared, pool, RecoverySpec(bias_correction_samples=count))
            seconds = time.perf_counter() - start
        lowered, _ = steps.lower(conversion, X86, data.example_inputs)
        with quantized_engine("x86"), torch.no_grad():
            return sqnr_db(expected, evaluation.call(lowered)), seconds

    without, _ = lowered_sqnr(None)
    rows = []
    for count in samples:
        sqnr, seconds = lowered_sqnr(count)
        rows.append({"model": name, "samples": count, "sqnr_db": sqnr, "gain_db": sqnr - without, "seconds": seconds})
        print(f"{name:<10}{count:>8}{sqnr:>10.2f}{sqnr - without:>10.2f}{seconds:>10.2f}", flush=True)
    rows.append({"model": name, "samples": 0, "sqnr_db": without, "gain_db": 0.0, "seconds": 0.0})
    print(f"{name:<10}{'off':>8}{without:>10.2f}{0.0:>10.2f}{0.0:>10.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["digits", "resnet18"])
    parser.add_argument("--samples", nargs="+", type=int, default=[16, 64, 256])
    args = parser.parse_args()
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    info = common.machine("x86")
    print(f"{common.machine_line(info)}; {torch.get_num_threads()} torch threads; load average at start {load}")
    print(f"{'model':<10}{'samples':>8}{'SQNR dB':>10}{'gain dB':>10}{'seconds':>10}")
    rows = [row for name in args.models for row in measure(name, args.samples)]
    end_load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    report = {"machine": info, "load_average_at_start": load, "load_average_at_end": end_load, "rows": rows}
    print(f"load average at end {end_load}; wrote {common.write_report('bias_correction', report)}")


if __name__ == "__main__":
    main()
