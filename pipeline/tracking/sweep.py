"""Sweeps: one parent run per `python -m pipeline -m ...`, each job a nested child run, and the
comparison report (CSV, Markdown, an accuracy-vs-speedup plot) on the parent when the sweep ends.

Works through the Tracker Protocol: with tracking off there is no parent run and no report.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.schema import TrackingSpec
from pipeline.tracking import make_tracker
from pipeline.tracking.base import RunRecord, Tracker

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run_id"


def sweep_parent_run_id(job_dir: Path) -> str | None:
    """The parent run a sweep job nests under: the callback writes its id into the sweep folder,
    which every job, in this process or a launcher's worker, can read. (MLFLOW_RUN_ID would make
    the job resume the parent instead of nesting under it.)"""
    path = job_dir.parent / PARENT_RUN_FILE
    return path.read_text().strip() if path.is_file() else None


class SweepCallback(Callback):
    """Opens the sweep's parent run before any job starts (which also creates the SQLite store
    once, before parallel workers could race to create it), and closes it with the comparison
    report when the sweep ends. Hydra skips on_multirun_end when a job fails, so an exit handler
    closes the parent too: FAILED, with the report marking the failed jobs."""

    def __init__(self) -> None:
        self.tracker: Tracker | None = None
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        spec = TrackingSpec(**OmegaConf.to_container(config.tracking, resolve=True))  # type: ignore[arg-type]
        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = list(config.hydra.overrides.task)
        tracker = make_tracker(spec)
        tracker.start(
            {},
            {"sweep": "true", "sweep_dir": str(sweep_dir.resolve()), "overrides": " ".join(overrides)},
            run_name=f"sweep-{sweep_dir.name}",
        )
        if tracker.run_id is None:
            return  # nothing tracked: no parent for the jobs to nest under
        self.tracker, self.sweep_dir = tracker, sweep_dir
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(tracker.run_id)
        atexit.register(self._close, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        if self.tracker is None or self.sweep_dir is None:
            return
        tracker, self.tracker = self.tracker, None
        try:
            rows = write_report(tracker, self.sweep_dir / "report")
            if any(row["status"] != "FINISHED" for row in rows):
                status = "FAILED"
        finally:
            tracker.end(status)


# --------------------------------------------------------------------------------------------------
# The comparison report of a sweep: a table and an accuracy-vs-speedup plot, one row per job.

REPORT_COLUMNS = [
    ("job", None),
    ("backend", None),
    ("skip", None),
    ("qconfig_mapping", None),
    ("status", None),
    ("float_acc", "eval/float/accuracy"),
    ("lowered_acc", "eval/lowered/accuracy"),
    ("acc_delta", "eval/accuracy_delta"),
    ("sqnr_db", "eval/lowered/sqnr_db"),
    ("latency_b1_ms", "latency/lowered/b1_ms"),
    ("speedup_b1", "latency/speedup_b1"),
    ("size_ratio", "size/ratio"),
    ("cache_hit", "cache/hit"),
    ("calibrations", "calibrate/calibrations"),
]


def sweep_rows(children: list[RunRecord]) -> list[dict[str, Any]]:
    """One report row per job (child run), in job order."""
    rows = []
    for run in sorted(children, key=lambda r: int(r.tags.get("job_num", 0))):
        row: dict[str, Any] = {
            "job": run.tags.get("job_num", run.name),
            "backend": run.tags.get("backend", ""),
            "skip": run.tags.get("skip", ""),
            "qconfig_mapping": run.tags.get("qconfig_mapping", ""),
            "status": run.status,
        }
        for column, metric in REPORT_COLUMNS:
            if metric is not None:
                row[column] = run.metrics.get(metric)
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(parent: Tracker, out_dir: Path) -> list[dict[str, Any]]:
    """report.csv, report.md and report.png in out_dir from the parent's child runs, logged to the
    parent run; also printed."""
    import csv

    rows = sweep_rows(parent.children())
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [column for column, _ in REPORT_COLUMNS]
    with (out_dir / "report.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(markdown)
    _plot_report(rows, out_dir / "report.png")
    parent.log_artifacts(out_dir, "report")
    log.info("sweep report (%d jobs, %s):\n%s", len(rows), out_dir, markdown)
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (higher is better on both)."""
    return [
        i
        for i, (x, y) in enumerate(points)
        if not any(ox >= x and oy >= y and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
    ]


def _plot_report(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [row for row in rows if row["speedup_b1"] is not None and row["acc_delta"] is not None]
    figure, axis = plt.subplots(figsize=(8, 5))
    points = [(row["speedup_b1"], row["acc_delta"] * 100) for row in plotted]
    front = set(pareto_front(points))
    for i, (row, (x, y)) in enumerate(zip(plotted, points, strict=True)):
        axis.scatter(x, y, s=60, color="tab:orange" if i in front else "tab:blue", zorder=3)
        axis.annotate(
            f"{row['backend']}/{row['skip']}",
            (x, y),
            textcoords="offset points",
            xytext=(5, 5 + 9 * (i % 3)),
            fontsize=8,
        )
    if front:
        ordered = sorted((points[i] for i in front), key=lambda p: p[0])
        axis.plot([p[0] for p in ordered], [p[1] for p in ordered], "o--", color="tab:orange", label="Pareto front")
        axis.legend(loc="best")
    failed = [row for row in rows if row["status"] != "FINISHED"]
    title = "accuracy delta vs speedup at batch 1, one point per job"
    if failed:
        title += f" ({len(failed)} failed job(s) not shown)"
    axis.set_title(title)
    axis.set_xlabel("speedup over float (batch 1, fastest form)")
    axis.set_ylabel("lowered - float accuracy (points)")
    axis.axhline(0, color="0.7", linewidth=1)
    axis.grid(alpha=0.3)
    axis.margins(x=0.12, y=0.2)  # room for the labels above the points, inside the axes
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
