"""The two engines side by side: engine=fx and engine=pt2e on the same model, data and backend.

Runs `python -m pipeline engine=<fx|pt2e> backend=x86` on the digits default and on the ResNet-18-shaped net
(random weights, synthetic inputs, a small image count so it takes minutes), tracking off, cache off, latency
at one thread, diagnose off, AOTInductor and ONNX off (ONNX/AOTI are compared per file, not per engine). Reads
each run's metrics.json and prints accuracy, output SQNR vs float, b1/b32 speedup over float, how many timed
runs the lowered model's fastest form got at b1/b32, the deployable file's size and the run's wall time.

    python bench/engines.py [--size 112] [--models digits,resnet18]

Prints a table and writes outputs/bench/engines.json, with the machine as every run tags it
(pipeline.machine: CPU model, torch's CPU capability, VNNI, AVX512, AMX) and the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.machine import machine_tags

REPO = Path(__file__).resolve().parents[1]

COMMON = [
    "backend=x86",
    "tracking=off",
    "cache.enabled=false",
    "diagnose.enabled=false",
    "evaluate.latency.threads=1",
    "evaluate.latency.repeats=20",
    "evaluate.latency.batch_sizes=[1,32]",  # the table's b1/b32 columns (the default is [1, 8])
    "export.aot_inductor=false",
    "export.onnx=false",
]


def models(size: int) -> dict[str, list[str]]:
    return {
        "digits": [],
        "resnet18": [
            "model=resnet18",
            "data=synthetic",
            f"data.factory.shape=[3,{size},{size}]",
            "data.factory.calibration_batches=2",
            "data.factory.evaluation_batches=1",
            "data.factory.batch_size=8",
        ],
    }


def run(engine: str, overrides: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "pipeline", f"engine={engine}", *COMMON, *overrides, f"output_dir={out}"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        (run_dir,) = list(Path(out, "runs").iterdir())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        fastest = json.loads((run_dir / "evaluate" / "fastest_form.json").read_text())
        files = [p for p in (run_dir / "export").iterdir() if p.suffix in (".pt", ".pt2")]
        return {
            "accuracy": metrics.get("eval/lowered/accuracy", float("nan")),
            "sqnr_db": metrics.get("eval/lowered/sqnr_db", float("nan")),
            "speedup_b1": metrics.get("latency/speedup_b1", float("nan")),
            "speedup_b32": metrics.get("latency/speedup_b32", float("nan")),
            # Timed runs of the lowered model's fastest form: 1 means the measurement was a single call (on
            # main 7f565fb, pt2e's recompile at a new batch size spent the latency budget).
            **{f"lowered_b{size}_runs": runs(metrics, fastest, size) for size in (1, 32)},
            # The medians behind the speedups (engines compared without float's run-to-run noise).
            **{
                f"{model}_b{size}_ms": metrics.get(f"latency/{model}/b{size}_ms", float("nan"))
                for model in ("float", "lowered")
                for size in (1, 32)
            },
            "file": files[0].name if files else "",
            "file_mb": files[0].stat().st_size / 1e6 if files else float("nan"),
            "seconds": seconds,
        }


def runs(metrics: dict[str, float], fastest: dict[str, str], size: int) -> float:
    """Timed runs of the lowered model's fastest form at `size` (0: not timed)."""
    return metrics.get(f"latency/lowered/{fastest.get(f'lowered/b{size}')}/b{size}_runs", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=112, help="ResNet input side (224 = ImageNet)")
    parser.add_argument("--models", default="digits,resnet18")
    args = parser.parse_args()
    # The CPU as the pipeline detects it (the runs' cpu.* tags); the load: the machine may be shared.
    machine = {**machine_tags(), "cores": os.cpu_count(), "load_at_start": os.getloadavg()[0]}
    rows = []
    for model, overrides in models(args.size).items():
        if model not in args.models.split(","):
            continue
        for engine in ("fx", "pt2e"):
            row = {"model": model, "engine": engine, **run(engine, overrides)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = "| model | engine | accuracy | SQNR dB | speedup b1 | speedup b32 | runs b1/b32 | file | MB | run s |"
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        accuracy = "-" if r["accuracy"] != r["accuracy"] else f"{r['accuracy']:.4f}"  # NaN: random weights
        lines.append(
            f"| {r['model']} | {r['engine']} | {accuracy} | {r['sqnr_db']:.1f} | {r['speedup_b1']:.2f}x | "
            f"{r['speedup_b32']:.2f}x | {r['lowered_b1_runs']:.0f}/{r['lowered_b32_runs']:.0f} | {r['file']} | "
            f"{r['file_mb']:.2f} | {r['seconds']:.0f} |"
        )
    machine["load_at_end"] = os.getloadavg()[0]
    flags = ", ".join(f"{name} {machine[f'cpu.{name}']}" for name in ("vnni", "avx512", "amx"))
    print(
        f"\n{machine['cpu.model']} ({machine['cpu.capability']}; {flags}), {machine['cores']} cores, "
        f"torch {machine['torch.version']}, latency at 1 thread; load average {machine['load_at_start']:.1f} at "
        f"start, {machine['load_at_end']:.1f} at end\n"
    )
    print("\n".join(lines))
    out = REPO / "outputs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
