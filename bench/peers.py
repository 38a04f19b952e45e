"""The pipeline beside a peer, NNCF, on the same test models, calibration data and evaluation data.

Per test model (digits CNN, mobile_digits, outlier_transformer, text_encoder) it runs the pipeline
in-process twice (tracking off, no cache): with every recovery option off (the old defaults) and with
the new defaults (conf/recovery/default.yaml as resolved on this CPU, the best options measured by
bench/accuracy_recovery.py). Then NNCF's `nncf.quantize` on the same float model with the same
calibration batches (the pipeline's own DataBundle, every batch: `subset_size` = the batch count):
the default preset, and `model_type=nncf.ModelType.TRANSFORMER` on the transformer models. Every
arm is scored by the same code on the same evaluation tensors against the same float outputs:
accuracy (labels), output SQNR and mean per-sample cosine against float, top-1 agreement with float,
seconds to quantize (pipeline: calibrate + reference_convert + lower; NNCF: `nncf.quantize`), and the
pipeline's int8 batch-1 speedup. NNCF returns a fake-quantized torch model (its int8 execution goes
through OpenVINO), so it has no torch int8 speedup: "n/a (fake-quant)". A failing NNCF arm is a row
with its error, not a crash.

    pip install -e '.[peers]'            # nncf==3.4.0; leaves torch 2.13.0 alone
    python bench/peers.py [--models digits_cnn mobile_digits outlier_transformer text_encoder] [--backend x86]

Writes outputs/bench/peers.json. One thread (torch.set_num_threads(1)) for everything.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import metric_keys
from pipeline.batch import ModelInputs
from pipeline.engine.qconfigs import quantized_engine
from pipeline.measure import sqnr_db

try:
    from bench import _common as common
except ModuleNotFoundError:  # python bench/peers.py: sys.path starts with bench/
    import _common as common  # type: ignore[no-redef]

TRANSFORMERS = ("outlier_transformer", "text_encoder")
FAKE_QUANT = "n/a (fake-quant)"
PIPELINE_ARMS: list[tuple[str, list[str]]] = [
    ("recovery off (old defaults)", common.BASELINE),
    ("new defaults (recovery on)", []),
]


def scores(outputs: torch.Tensor, float_outputs: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
    """Accuracy (with labels), SQNR, mean cosine and top-1 agreement against the float outputs."""
    return {
        "accuracy": None if labels is None else (outputs.argmax(1) == labels).float().mean().item(),
        "sqnr_db": sqnr_db(float_outputs, outputs),
        "cosine": common.cosine(float_outputs, outputs),
        "agreement": (outputs.argmax(1) == float_outputs.argmax(1)).float().mean().item(),
    }


def same_batches(first: list, second: list) -> bool:
    """Both runs' batches hold equal tensors (the split is seeded: it should)."""
    return len(first) == len(second) and all(
        all(torch.equal(a, b) for a, b in zip(x.tensors, y.tensors, strict=True))
        for (x, _), (y, _) in zip(first, second, strict=True)
    )


def nncf_quantize(
    model: nn.Module, calibration: list[tuple[ModelInputs, Any]], model_type: str | None
) -> tuple[nn.Module, float]:
    """`nncf.quantize` on a copy of `model` with every calibration batch; (model, seconds)."""
    import nncf

    # NNCF's torch engine calls model(*tuple): feed each batch as the model's positional inputs, so
    # keyword inputs (text_encoder's input_ids, attention_mask) go in forward-signature order.
    dataset = nncf.Dataset(calibration, lambda batch: batch[0].positional(model))
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if model_type == "transformer" else {}
    subject = copy.deepcopy(model)
    start = time.perf_counter()
    quantized = nncf.quantize(subject, dataset, subset_size=len(calibration), **kwargs)
    return quantized, time.perf_counter() - start


class _Tiny(nn.Module):
    """Not an nn.Sequential: NNCF adds a hook-storage child to the model, which a top-level Sequential
    then calls as a layer (NotImplementedError: Module [HookStorage] is missing "forward")."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def nncf_warmup() -> float:
    """Quantize a tiny model once, untimed in the table: the first call in a process loads (the very
    first on a machine compiles) NNCF's CPU extension."""
    tiny = _Tiny().eval()
    batch = (ModelInputs((torch.randn(2, 1, 8, 8),)), None)
    start = time.perf_counter()
    nncf_quantize(tiny, [batch], None)
    return time.perf_counter() - start


def pipeline_warmup(backend: str) -> float:
    """One untimed quantization of the digits CNN: a process's first prepare_fx / convert pays one-off
    import and tracing costs that would otherwise land on the first row's "quantize s"."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        common.run_pipeline([f"backend={backend}", "stages=[load,calibrate,reference_convert,lower]"], Path(folder))
    return time.perf_counter() - start


def bench_model(model: str, backend: str, folder: Path, run_nncf: bool) -> list[dict[str, Any]]:
    """The table rows of one test model."""
    rows: list[dict[str, Any]] = []
    runs = [
        (label, common.run_pipeline([*common.MODELS[model], f"backend={backend}", *overrides], folder / str(i)))
        for i, (label, overrides) in enumerate(PIPELINE_ARMS)
    ]
    loaded = runs[0][1].artifact("loaded")
    data = loaded.data
    inputs = common.evaluation_inputs(data.evaluation)
    labels = common.evaluation_labels(data.evaluation) if loaded.has_accuracy else None
    with torch.no_grad():
        float_outputs = inputs.call(loaded.model)
    float_accuracy = None if labels is None else (float_outputs.argmax(1) == labels).float().mean().item()
    base = {"model": model, "float_accuracy": float_accuracy}
    for label, run in runs:
        other = run.artifact("loaded").data
        same = same_batches(data.calibration, other.calibration) and same_batches(data.evaluation, other.evaluation)
        with torch.no_grad(), quantized_engine(run.spec.backend.engine):
            outputs = inputs.call(run.artifact("lowered").model)
        rows.append(
            {
                **base,
                "tool": "pipeline",
                "setting": label,
                **scores(outputs, float_outputs, labels),
                "quantize_seconds": run.quantize_seconds,
                "speedup_b1": run.metric(metric_keys.speedup(1)),
                "same_data": same,
                "error": None,
            }
        )
    if not run_nncf:
        return rows
    presets: list[tuple[str, str | None]] = [("default preset", None)]
    if model in TRANSFORMERS:
        presets.append(("model_type=TRANSFORMER", "transformer"))
    for label, model_type in presets:
        row = {**base, "tool": "nncf", "setting": label, "speedup_b1": FAKE_QUANT, "same_data": True, "error": None}
        try:
            quantized, seconds = nncf_quantize(loaded.model, data.calibration, model_type)
            with torch.no_grad():
                outputs = inputs.call(quantized)
            row.update(scores(outputs, float_outputs, labels), quantize_seconds=seconds)
        except Exception as error:  # a peer failing on a model is a finding: record it, go on
            row.update(accuracy=None, sqnr_db=None, cosine=None, agreement=None, quantize_seconds=None)
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
            row["traceback"] = traceback.format_exc()
        rows.append(row)
    return rows


def _number(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.{digits}f}"


COLUMNS = ("model", "tool + setting", "accuracy (float)", "SQNR dB", "cosine", "agreement", "quantize s", "speedup b1")


def table_cells(row: dict[str, Any]) -> list[str]:
    """One row's cells, in COLUMNS order."""
    setting = f"{row['tool']}: {row['setting']}"
    if row.get("error"):
        return [row["model"], setting, f"FAILED: {row['error']}", "-", "-", "-", "-", _number(row["speedup_b1"], 2)]
    accuracy = _number(row["accuracy"], 3)
    if row.get("float_accuracy") is not None:
        accuracy += f" ({row['float_accuracy']:.3f})"
    speedup = row["speedup_b1"]
    return [
        row["model"],
        setting,
        accuracy,
        _number(row["sqnr_db"], 1),
        _number(row["cosine"], 4),
        _number(row["agreement"], 3),
        _number(row["quantize_seconds"], 1),
        speedup if isinstance(speedup, str) else f"{_number(speedup, 2)}x" if speedup is not None else "-",
    ]


def build_table(rows: list[dict[str, Any]]) -> str:
    """The rows as one Markdown table (printed, and pasted into the README)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    previous = None
    for row in rows:
        cells = table_cells(row)
        if cells[0] == previous:
            cells[0] = ""
        else:
            previous = cells[0]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(common.MODELS), choices=list(common.MODELS))
    parser.add_argument("--backend", default="x86")
    parser.add_argument("--no-nncf", action="store_true", help="pipeline rows only (NNCF not installed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = common.machine(args.backend)
    report: dict[str, Any] = {"machine": info, "threads": 1, "rows": [], "seconds": {}}
    report["pipeline_warmup_seconds"] = pipeline_warmup(args.backend)
    if not args.no_nncf:
        import nncf

        info["nncf"] = nncf.__version__
        report["nncf_warmup_seconds"] = nncf_warmup()
    print(f"{common.machine_line(info)}, nncf {info.get('nncf', '-')}, backend={args.backend}, 1 thread")
    for model in args.models:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            rows = bench_model(model, args.backend, Path(folder), not args.no_nncf)
        report["seconds"][model] = time.perf_counter() - start
        report["rows"].extend(rows)
        print(f"{model}: {report['seconds'][model]:.0f} s", flush=True)
    print()
    print(build_table(report["rows"]))
    print(f"\nwrote {common.write_report('peers', report)}")


if __name__ == "__main__":
    main()
