"""Helpers the benches share: run the pipeline in-process (tracking off, no cache) and read its models,
data and metrics; output cosine; the machine line; the JSON report.

A bench imports it as `bench._common` when the repository root is on sys.path (`PYTHONPATH=$PWD`,
`python -m bench.<name>`, the tests) and as `_common` when run as `python bench/<name>.py` (then sys.path
starts with bench/).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from pipeline import metric_keys, runner, schema
from pipeline.batch import ModelInputs
from pipeline.engine.recovery import has_vnni
from pipeline.machine import cpu_model
from pipeline.validation import validate

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
BENCH_OUT = Path("outputs/bench")

# The test models and the overrides that select them (experiment presets; digits_cnn is the default).
MODELS: dict[str, list[str]] = {
    "digits_cnn": [],
    "mobile_digits": ["experiment=mobile_digits"],
    "outlier_transformer": ["experiment=outlier_transformer"],
    "text_encoder": ["experiment=text_encoder"],
    # 98 Linears with four activation outliers; SmoothQuant would fix them at once, so it is off here and the
    # skip search has layers to find among ~100 (bench/accuracy_recovery.py's search rows).
    "deep_mlp": ["model=deep_mlp", "recovery.smoothquant_alpha=0"],
}
# Every recovery option off: the pipeline's defaults before the accuracy-recovery work (7-bit
# activations on x86, histogram observers, no bounded ranges, no bias correction, no SmoothQuant).
BASELINE = [
    "recovery.activation_bits=7",
    "recovery.bounded_activations=off",
    "recovery.bias_correction=false",
    "recovery.smoothquant_alpha=0",
]
# The stages that score a model, quickly: no tracking, cache, diagnosis or export; batch-1 latency only.
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
# The stages whose seconds are "time to quantize" (calibration, bias correction, convert, lowering).
QUANTIZE_STAGES = ("calibrate", "reference_convert", "lower")


@dataclass
class PipelineRun:
    """One in-process run: its spec, what it produced and its wall seconds."""

    spec: schema.PipelineSpec
    result: runner.RunResult
    seconds: float

    def artifact(self, name: str) -> Any:
        return self.result.artifacts[name]

    def metric(self, key: str) -> float | None:
        return self.result.metrics.get(key)

    @property
    def quantize_seconds(self) -> float:
        """Seconds of calibrate + reference_convert + lower (what a user waits for the int8 model)."""
        return sum(self.result.metrics.get(metric_keys.stage_seconds(stage), 0.0) for stage in QUANTIZE_STAGES)


def run_pipeline(overrides: list[str], out_dir: Path) -> PipelineRun:
    """Compose conf/ with QUICK + `overrides`, validate and run the pipeline under `out_dir`."""
    schema.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*QUICK, f"output_dir={out_dir}", *overrides])
    spec = schema.from_config(cfg)
    validate(spec)
    start = time.perf_counter()
    result = runner.run(spec, cfg, out_dir / "run")
    return PipelineRun(spec, result, time.perf_counter() - start)


def evaluation_inputs(batches: list[tuple[ModelInputs, torch.Tensor | None]]) -> ModelInputs:
    """All evaluation batches as one ModelInputs."""
    return ModelInputs.cat([inputs for inputs, _ in batches])


def evaluation_labels(batches: list[tuple[ModelInputs, torch.Tensor | None]]) -> torch.Tensor | None:
    """All evaluation labels, or None when the data has none."""
    labels = [labels for _, labels in batches]
    return None if any(part is None for part in labels) else torch.cat(labels)  # type: ignore[arg-type]


def cosine(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Mean per-sample cosine similarity of the outputs."""
    return torch.nn.functional.cosine_similarity(reference.flatten(1), approximation.flatten(1), dim=1).mean().item()


def machine(backend: str) -> dict[str, Any]:
    """The machine a bench ran on (CPU model, VNNI, torch) and the backend."""
    return {"cpu": cpu_model(), "vnni": has_vnni(), "torch": torch.__version__, "backend": backend}


def machine_line(info: dict[str, Any]) -> str:
    return f"machine: {info['cpu']}, VNNI {'yes' if info['vnni'] else 'no'}, torch {info['torch']}"


def write_report(name: str, report: dict[str, Any]) -> Path:
    """Write `report` as outputs/bench/<name>.json; returns the path."""
    out = BENCH_OUT / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    return out
