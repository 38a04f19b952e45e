"""How the search scales with its scoring set: max RSS and the search stage's time for folders of generated
JPEGs (bench/data_scale.py's images, made once under outputs/bench/images_<n>_<px>/), MobileNetV2 shape
(random weights), x86, SQNR criterion with a bar no trial meets (so every run ranks the layers and runs
search.max_trials trials), calibration on its own 32 images, tracking off.

    PYTHONPATH=$PWD python -m bench.search_scale [--sizes 288 1056] [--px 64] [--trials 4] [--root DIR]

--root runs another checkout's pipeline on the same folders (e.g. --root ../main, before the search
streamed: it joined the set, and its layer sensitivity recorded every layer's activations for all of it;
keep its sizes small). Each run is a separate `python -m pipeline` process whose max RSS is its own.
Prints a table and writes outputs/bench/search_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_OUT = Path("outputs/bench")
CALIBRATION = 32


def _search(root: Path, overrides: list[str], out: Path) -> dict[str, Any]:
    """One `python -m pipeline` under `root` with its max RSS; the search stage's time and trial count parsed
    from the log."""
    from bench.data_scale import run_measured

    log, wall, max_rss_mb = run_measured(overrides, out, root, OMP_NUM_THREADS="1")
    stage = re.search(r"search done in ([\d.]+)s", log)
    if stage is None:
        raise RuntimeError(f"no search stage in the run under {root}: {' '.join(overrides)}\n{log[-4000:]}")
    return {
        "max_rss_mb": round(max_rss_mb),
        "search_s": float(stage.group(1)),
        "trials": len(re.findall(r"search trial (\d+):", log)),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[288, 1056], help="images per folder")
    parser.add_argument("--px", type=int, default=64, help="image size (no resize or crop)")
    parser.add_argument("--trials", type=int, default=4, help="search.max_trials")
    parser.add_argument("--model", default="mobilenet_v2", help="model config group option")
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose pipeline runs")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.data_scale import generate_images
    from pipeline.machine import cpu_model

    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    root = args.root.resolve()
    common = [
        f"model={args.model}",
        "data=image_folder",
        "data.factory.resize=null",
        "data.factory.crop=null",
        f"data.factory.calibration_size={CALIBRATION}",
        "data.factory.batch_size=32",
        f"data.num_workers={args.workers}",
        "search=greedy",
        "search.criterion=sqnr",
        "search.min_sqnr_db=90",
        f"search.max_trials={args.trials}",
        "search.fail_on_miss=false",
        "evaluate.latency.batch_sizes=[1]",
        "stages=[load,calibrate,search]",
        "tracking=off",
        "cache.enabled=false",
    ]
    rows = []
    for size in args.sizes:
        folder = generate_images((BENCH_OUT / f"images_{size}_{args.px}").resolve(), size, args.px)
        out = (BENCH_OUT / f"search_scale_run_{size}").resolve()
        shutil.rmtree(out, ignore_errors=True)
        run = _search(root, [*common, f"data.factory.root={folder}"], out)
        row = {"images": size, "scored": size - CALIBRATION, **run}
        rows.append(row)
        print(row, flush=True)
    report = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end",
        "root": str(root),
        "model": args.model,
        "px": args.px,
        "rows": rows,
    }
    print(f"\n{root}: {args.model}, {args.px} px, {args.trials} trials")
    print("| scored images | max RSS MB | search stage s | trials | run wall s |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        figures = [f"{row['scored']:,}", *(str(row[key]) for key in ("max_rss_mb", "search_s", "trials", "wall_s"))]
        print(f"| {' | '.join(figures)} |")
    print(report["machine"])
    (BENCH_OUT / "search_scale.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
