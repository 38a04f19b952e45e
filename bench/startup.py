"""Start and exit of `python -m pipeline`: process start to the first stage, and the summary to exit.

Runs the default run (digits, x86) as a user does, in a subprocess, and timestamps every line it prints
as it arrives: process start to the first log line, to the first stage (`[1/N] load ...`), to the
closing summary, and the summary's last line to the process's exit. Two cases: a fresh output folder
(the MLflow store is created) and the same folder again (an existing store). Median of N repeats each.

    python bench/startup.py [--repeats 3] [--checkout <another source tree>] [-- extra overrides]

Prints a table and writes outputs/bench/startup.json.
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

ROOT = Path(__file__).resolve().parents[1]
FIRST_STAGE = "[1/"
SUMMARY = "done: "


def timed_run(output_dir: Path, overrides: list[str], checkout: Path = ROOT) -> dict[str, float]:
    """One `python -m pipeline` run: seconds from process start to each landmark line and to exit."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "pipeline", f"output_dir={output_dir}", *overrides]
    start = time.perf_counter()
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    process = subprocess.Popen(command, cwd=checkout, env=env, **output)
    marks: dict[str, float] = {}
    last_line = start
    assert process.stdout is not None
    for line in process.stdout:
        now = time.perf_counter() - start
        last_line = now
        marks.setdefault("first_line", now)
        if FIRST_STAGE in line:
            marks.setdefault("first_stage", now)
        if SUMMARY in line:
            marks.setdefault("summary", now)
    code = process.wait()
    exited = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited {code}")
    return {**marks, "last_line": last_line, "exit": exited, "last_line_to_exit": exited - last_line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the pipeline's source tree (another branch's)")
    parser.add_argument("overrides", nargs="*", help="extra pipeline overrides")
    args = parser.parse_args()
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    rows: dict[str, list[dict[str, float]]] = {"new store": [], "existing store": []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            folder = Path(scratch) / f"out{repeat}"
            rows["new store"].append(timed_run(folder, args.overrides, args.checkout))
            rows["existing store"].append(timed_run(folder, args.overrides, args.checkout))
    keys = ["first_line", "first_stage", "summary", "exit", "last_line_to_exit"]
    medians = {case: {key: statistics.median(run[key] for run in runs) for key in keys} for case, runs in rows.items()}
    command = f"python -m pipeline {' '.join(args.overrides)}".rstrip()
    print(f"{args.checkout}: {command}; {args.repeats} repeats (medians); load at start {load}")
    print(f"{'seconds from process start':<18}" + "".join(f"{key:>19}" for key in keys))
    for case, values in medians.items():
        print(f"{case:<18}" + "".join(f"{values[key]:>19.2f}" for key in keys))
    out = Path("outputs/bench/startup.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"load_average_at_start": load, "medians": medians, "runs": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
