"""How the pipeline scales with the evaluation set: max RSS, images per second of float and int8
evaluation, and a skip-list sweep's wall time with and without the float-output cache, for folders of
generated 224 px JPEGs (500, 5,000, 20,000 images by default; made once under outputs/bench/images_<n>/).

    PYTHONPATH=$PWD python -m bench.data_scale [--sizes 500 5000 20000] [--sweep-jobs 3] [--workers N]

Each measurement is a separate `python -m pipeline` process (so its max RSS is its own, read by
resource.getrusage(RUSAGE_CHILDREN) after it ends). The model is ResNet-18 (random weights: accuracy is
not the point here, speed and memory are), latency, diagnose, export and tracking off.
Prints a table and writes outputs/bench/data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_OUT = Path("outputs/bench")
CLASSES = 10


def generate_images(folder: Path, count: int, size: int = 224, seed: int = 0) -> Path:
    """`count` JPEGs of `size` px in `CLASSES` class folders (smooth colour fields plus noise, so they
    compress and decode like photographs rather than like pure noise). Made once: an existing complete
    folder is reused."""
    import numpy as np
    from PIL import Image

    marker = folder / ".complete"
    if marker.exists() and marker.read_text() == f"{count} {size} {seed}":
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for label in range(CLASSES):
        (folder / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            folder / f"class_{index % CLASSES:02d}" / f"{index:06d}.jpg", quality=90
        )
    marker.write_text(f"{count} {size} {seed}")
    return folder


def run_measured(overrides: list[str], out: Path, root: Path = ROOT, **env: str) -> tuple[str, float, float]:
    """One `python -m pipeline <overrides>` under the checkout `root` (extra environment `env`) in a wrapper
    process that reports its max RSS: (the run's log, its wall seconds, its max RSS in MB); raises with the
    log's tail when the run fails."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:]).returncode\n"
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code, file=sys.stderr)\n"
    )
    command = [sys.executable, "-c", wrapper, sys.executable, "-m", "pipeline", *overrides, f"output_dir={out}"]
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=root, env={**os.environ, "PYTHONPATH": str(root), **env}, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    log = result.stdout + result.stderr
    found = re.search(r"MAXRSS (\d+) (-?\d+)", log)
    if found is None or found.group(2) != "0":
        raise RuntimeError(f"pipeline failed under {root}: {' '.join(overrides)}\n{log[-4000:]}")
    return log, wall, int(found.group(1)) / 1024


def _run(overrides: list[str], out: Path) -> dict[str, Any]:
    """One run's max RSS, wall time and the evaluation pass times parsed from the progress lines."""
    log, wall, max_rss_mb = run_measured(overrides, out)

    def last_pass(label: str) -> float | None:
        times = re.findall(rf"{re.escape(label)}: (\d+)/(\d+) \(([\d.]+)s", log)
        return float(times[-1][2]) if times else None

    return {
        "wall_s": wall,
        "max_rss_mb": max_rss_mb,
        "float_pass_s": last_pass("evaluate float (cached)"),
        "main_pass_s": last_pass("evaluate"),
        "float_evaluations": len(re.findall(r"float evaluation of", log)),
    }


def _sweep(args: argparse.Namespace, common: list[str]) -> dict[str, float]:
    """Wall time of one -m sweep over skip-lists, with and without the float-output cache."""
    folder = generate_images((BENCH_OUT / f"images_{args.sweep_size}").resolve(), args.sweep_size)
    skips = ",".join(["none", "first_last", "conv", "linear", "first_add", "add"][: args.sweep_jobs])
    sweep: dict[str, float] = {}
    for cached in (True, False):
        out = (BENCH_OUT / f"data_scale_sweep_{'cached' if cached else 'uncached'}").resolve()
        shutil.rmtree(out, ignore_errors=True)
        run = _run(
            [
                "-m",
                f"skip={skips}",
                *common,
                f"data.factory.root={folder}",
                f"cache.float_outputs={str(cached).lower()}",
            ],
            out,
        )
        sweep["with_float_cache_s" if cached else "without_float_cache_s"] = round(run["wall_s"], 1)
        print({"sweep": skips, "float_outputs_cache": cached, "wall_s": round(run["wall_s"], 1)}, flush=True)
    return sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5000, 20000])
    parser.add_argument("--model", default="mobilenet_v2", help="model config group option (224 px inputs)")
    parser.add_argument("--sweep-jobs", type=int, default=3, help="skip-lists in the sweep (none, first_last, conv)")
    parser.add_argument("--sweep-size", type=int, default=500, help="images in the sweep's folder")
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers")
    args = parser.parse_args()
    from pipeline.machine import cpu_model  # the machine line of every bench

    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    common = [
        f"model={args.model}",
        "data=image_folder",
        "data.factory.calibration_size=32",
        "data.factory.batch_size=32",
        f"data.num_workers={args.workers}",
        "evaluate.models=[float,lowered]",
        "evaluate.latency.enabled=false",
        "diagnose.enabled=false",
        "tracking=off",
        "stages=[load,calibrate,reference_convert,lower,evaluate]",
    ]
    rows = []
    for size in args.sizes:
        folder = generate_images((BENCH_OUT / f"images_{size}").resolve(), size)
        out = (BENCH_OUT / f"data_scale_run_{size}").resolve()
        shutil.rmtree(out, ignore_errors=True)
        run = _run([*common, f"data.factory.root={folder}"], out)
        samples = size - 32
        row = {
            "images": size,
            "evaluated": samples,
            "max_rss_mb": round(run["max_rss_mb"]),
            "float_img_s": round(samples / run["float_pass_s"], 1) if run["float_pass_s"] else None,
            # the main pass reads float from the cache and runs the int8 (lowered) model
            "int8_img_s": round(samples / run["main_pass_s"], 1) if run["main_pass_s"] else None,
            "wall_s": round(run["wall_s"], 1),
        }
        rows.append(row)
        print(row, flush=True)
    sweep: dict[str, float] = _sweep(args, common) if args.sweep_jobs > 0 else {}
    report = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end",
        "model": args.model,
        "workers": args.workers,
        "rows": rows,
        "sweep": {"jobs": args.sweep_jobs, "images": args.sweep_size, **sweep},
    }
    print("\n| images | max RSS MB | float img/s | int8 img/s | run wall s |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        figures = [
            f"{row['images']:,}",
            *(str(row[key]) for key in ("max_rss_mb", "float_img_s", "int8_img_s", "wall_s")),
        ]
        print(f"| {' | '.join(figures)} |")
    if sweep:
        print(
            f"\nsweep of {args.sweep_jobs} skip-lists on {args.sweep_size} images: {sweep['with_float_cache_s']} s "
            f"with the float-output cache, {sweep['without_float_cache_s']} s without"
        )
    print(report["machine"])
    (BENCH_OUT / "data_scale.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
