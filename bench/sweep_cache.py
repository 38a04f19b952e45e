"""A skip-list sweep with the calibration cache against the same sweep with cache.enabled=false.

Model: the ResNet-18-shaped network (conf/model/resnet18.yaml, random weights) on synthetic
inputs; x86 backend, histogram observers; N skip-lists through `python -m pipeline -m`, the basic
launcher, latency, diagnose and export off (the sweep's cost is calibration plus conversion). Each arm gets
a fresh output folder (empty cache) whose MLflow store is created before the clock starts, as every sweep
but a user's very first finds it (creating one runs ~60 migrations, 3-8 s here: timed apart as
store_creation_seconds; --fresh-store times it inside the sweep). Calibration counts come from the store.

The cached arm's wall time is also set against its ideal, computed from the same run's stage times:
C + N*E, with C one load and one calibration (the job that calibrated) and E the median job's
convert + lower + evaluate; what is left is process start, the sweep machinery, MLflow and cache hits.

    python bench/sweep_cache.py [--size 224] [--batches 16] [--cached-only]

Prints a table and writes outputs/bench/sweep_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient


def machine_line() -> str:
    import torch

    from pipeline.engine.recovery import has_vnni
    from pipeline.machine import cpu_model

    return f"{cpu_model()}, VNNI {'yes' if has_vnni() else 'no'}, torch {torch.__version__}"


SKIPS = "none,add,first_last,block2_regex,linear,conv"  # six ways to skip (first_last names miss here)
REPO = Path(__file__).resolve().parents[1]
STAGES = ("load", "calibrate", "reference_convert", "lower", "evaluate")  # diagnose and export off in both arms


def sweep(cache: bool, size: int, batches: int, fresh_store: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        if not fresh_store:
            MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db").search_experiments()  # creates the tables
        store_seconds = time.perf_counter() - began
        command = [
            sys.executable,
            "-m",
            "pipeline",
            "-m",
            "model=resnet18",
            "data=synthetic",
            f"data.factory.shape=[3,{size},{size}]",
            f"data.factory.calibration_batches={batches}",
            "data.factory.evaluation_batches=1",
            "backend=x86",
            f"skip={SKIPS}",
            "evaluate.latency.enabled=false",
            "diagnose.enabled=false",  # the same in both arms and not what the cache saves
            f"stages=[{','.join(STAGES)}]",
            f"cache.enabled={str(cache).lower()}",
            f"output_dir={out}",
        ]
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("fx-ptq").experiment_id])
        jobs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        # Where the wall time goes: every stage summed over the jobs.
        stage_seconds = {stage: sum(r.data.metrics.get(f"stage/{stage}/seconds", 0) for r in jobs) for stage in STAGES}
        per_job = [{stage: r.data.metrics.get(f"stage/{stage}/seconds", 0.0) for stage in STAGES} for r in jobs]
        calibrating = [
            job for job, r in zip(per_job, jobs, strict=True) if r.data.metrics.get("calibrate/calibrations", 0) > 0
        ]
        once = calibrating[0] if calibrating else per_job[0]
        each = statistics.median(job["reference_convert"] + job["lower"] + job["evaluate"] for job in per_job)
        ideal = once["load"] + once["calibrate"] + len(jobs) * each
        return {
            "ideal_seconds": ideal,  # C + N*E from this run's own stage times
            "wall_over_ideal": seconds / ideal,
            "wall_seconds": seconds,
            "store_creation_seconds": None if fresh_store else store_seconds,
            "jobs": len(jobs),
            "calibrations": sum(r.data.metrics.get("calibrate/calibrations", 0) for r in jobs),
            "calibrate_stage_seconds": stage_seconds["calibrate"],
            "stage_seconds": stage_seconds,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Defaults: ImageNet-sized calibration (TORCH_FACTS measured 25-45 s for it here). With a toy
    # calibration (e.g. --size 112 --batches 4, about 1 s) the cache saves nothing: a hit still costs a
    # prepare_fx and a state_dict load.
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batches", type=int, default=16, help="calibration batches of 8")
    parser.add_argument("--cached-only", action="store_true", help="skip the cache.enabled=false arm")
    parser.add_argument("--fresh-store", action="store_true", help="create the MLflow store inside the timed sweep")
    args = parser.parse_args()
    load_at_start = " ".join(f"{value:.1f}" for value in os.getloadavg())
    cached = sweep(True, args.size, args.batches, args.fresh_store)
    uncached = None if args.cached_only else sweep(False, args.size, args.batches, args.fresh_store)
    arms = {"cached": cached, **({"uncached": uncached} if uncached else {})}
    result = {
        "machine": machine_line(),
        "load_average_at_start": load_at_start,
        "model": "resnet18 (random weights)",
        "input": [3, args.size, args.size],
        "calibration_batches": args.batches,
        "skip_lists": SKIPS.split(","),
        "fresh_store": args.fresh_store,
        "cached": cached,
        "uncached": uncached,
    }
    if uncached:
        result["wall_time_ratio_uncached_over_cached"] = uncached["wall_seconds"] / cached["wall_seconds"]
    print(f"{'arm':<22}{'jobs':>6}{'calibrations':>14}{'calibrate s':>13}{'wall s':>9}")
    for name, arm in arms.items():
        name = f"cache.enabled={str(name == 'cached').lower()}"
        print(
            f"{name:<22}{arm['jobs']:>6}{arm['calibrations']:>14.0f}{arm['calibrate_stage_seconds']:>13.1f}"
            f"{arm['wall_seconds']:>9.1f}"
        )
    print(f"{result['machine']}; load average at start {load_at_start} (a shared machine: figures vary run to run)")
    if uncached:
        print(f"wall-time ratio (uncached / cached): {result['wall_time_ratio_uncached_over_cached']:.2f}x")
    print(
        f"cached sweep against its ideal C + N*E = {cached['ideal_seconds']:.1f} s (from its own stage times): "
        f"{cached['wall_seconds']:.1f} s, {cached['wall_over_ideal']:.2f}x"
    )
    print("stage seconds summed over jobs: " + ", ".join(cached["stage_seconds"]))
    for name, arm in arms.items():
        print(f"  {name:<9}" + " ".join(f"{seconds:8.1f}" for seconds in arm["stage_seconds"].values()))
    out = REPO / "outputs" / "bench" / "sweep_cache.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
