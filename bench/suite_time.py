"""How long the whole test suite takes, quiet and under a background load of this script's own making.

Runs `python -m pytest` (the README's command, so pyproject's addopts: every core, `--durations=15`) once
per requested load. A load of N is N extra processes that each spin a core flat out (pure-Python busy
loops, started before pytest and stopped after it), on top of whatever else the machine runs; the
load average at start and end is printed so the figure says what the machine really carried.

    python bench/suite_time.py [--loads 0,5] [-- <extra pytest args>]

Prints a table (load, wall time, passed/failed, the ten slowest tests) and writes
outputs/bench/suite_time.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import machine, machine_line, write_report  # noqa: E402

DURATION = re.compile(r"^\s*([\d.]+)s (call|setup|teardown)\s+(\S+)")
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|error).*) in ([\d.]+)s")


def _spin() -> None:
    while True:
        pass


def run_suite(load: int, pytest_args: list[str]) -> dict[str, object]:
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(load)]
    for spinner in spinners:
        spinner.start()
    try:
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", *pytest_args], cwd=ROOT, capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        load_after = os.getloadavg()[0]
    finally:
        for spinner in spinners:
            spinner.terminate()
    lines = done.stdout.splitlines()
    slowest = [
        {"seconds": float(m.group(1)), "phase": m.group(2), "test": m.group(3)} for m in map(DURATION.match, lines) if m
    ][:10]
    summary = next((m.group(1) for m in map(SUMMARY.search, reversed(lines)) if m), "no summary (see exit code)")
    return {
        "background_processes": load,
        "load_average_start": round(load_before, 2),
        "load_average_end": round(load_after, 2),
        "wall_seconds": round(wall, 1),
        "exit_code": done.returncode,
        "summary": summary,
        "slowest": slowest,
        "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default="0,5", help="background busy processes per run, comma-separated")
    args, pytest_args = parser.parse_known_args()
    pytest_args = [a for a in pytest_args if a != "--"]
    info = machine("x86")
    print(machine_line(info), f"| {os.cpu_count()} cores")
    runs = []
    for load in (int(x) for x in args.loads.split(",")):
        print(f"suite with {load} background busy processes ...", flush=True)
        result = run_suite(load, pytest_args)
        runs.append(result)
        print(
            f"  {result['wall_seconds'] / 60:.1f} min ({result['wall_seconds']} s), load average "
            f"{result['load_average_start']} -> {result['load_average_end']}: {result['summary']}"
        )
        for row in result["slowest"]:  # type: ignore[union-attr]
            print(f"    {row['seconds']:7.1f} s  {row['phase']:8s} {row['test']}")
    print("\n| background processes | load average (start -> end) | wall | result |\n|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['background_processes']} | {r['load_average_start']} -> {r['load_average_end']} | "
            f"{r['wall_seconds'] / 60:.1f} min | {r['summary']} |"  # type: ignore[operator]
        )
    print("wrote", write_report("suite_time", {"machine": info, "cores": os.cpu_count(), "runs": runs}))


if __name__ == "__main__":
    main()
