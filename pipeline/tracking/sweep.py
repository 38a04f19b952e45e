"""Sweeps: one parent run per `python -m pipeline -m ...`, each job a nested child run, and the
comparison report (CSV, Markdown, an accuracy-vs-speedup plot) on the parent when the sweep ends.

Works through the Tracker Protocol: with tracking off there is no parent run and no report.
"""

from __future__ import annotations

import atexit
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline import metric_keys
from pipeline.schema import TrackingSpec
from pipeline.tracking import make_tracker
from pipeline.tracking.base import RunRecord, Tracker
from pipeline.tracking.headline import (
    HEADLINE_DECIMALS,
    best_row,
    delta_points,
    experiment_url,
    format_value,
    run_url,
    summary,
    sweep_view,
)

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
        self.spec: TrackingSpec | None = None
        self.name = ""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        spec = TrackingSpec(**OmegaConf.to_container(config.tracking, resolve=True))  # type: ignore[arg-type]
        spec = replace(spec, run_name=None)  # tracking.run_name names the jobs; the parent keeps the sweep's name
        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = list(config.hydra.overrides.task)
        self.name = sweep_name(sweep_dir.name, overrides)
        tracker = make_tracker(spec)
        tracker.start(
            swept_params(overrides),
            {"sweep": "true", "sweep_dir": str(sweep_dir.resolve()), "overrides": " ".join(overrides)},
            run_name=self.name,
        )
        if tracker.run_id is None:
            return  # nothing tracked: no parent for the jobs to nest under
        self.tracker, self.sweep_dir, self.spec = tracker, sweep_dir, spec
        tracker.share_view(sweep_view(tracker.run_id), f"tags.`mlflow.parentRunId` = '{tracker.run_id}'")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(tracker.run_id)
        atexit.register(self._close, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        if self.tracker is None or self.sweep_dir is None or self.spec is None:
            return
        tracker, self.tracker = self.tracker, None
        registered, rows, best = None, [], None
        try:
            children = tracker.children()
            rows = write_report(tracker, self.sweep_dir / "report", children)
            if any(row["status"] != "FINISHED" for row in rows):
                status = "FAILED"
            best = best_row(rows)
            if best is not None:
                tracker.log_metrics(best_metrics(best))
                tracker.set_tags({"best_job": str(best["job"]), "best_run": str(best["run"])})
                registered = self._register(tracker, best, children)
        finally:
            tracker.end(status)
        log.info("%s", self._summary(tracker, rows, best, registered))

    def _register(self, tracker: Tracker, best: dict[str, Any], children: list[RunRecord]) -> str | None:
        """The best job's model into the Model Registry (tracking.register), tagged like a run's."""
        if not self.spec or not self.spec.register:
            return None
        (run,) = [child for child in children if child.run_id == best["run_id"]]
        model_uri = run.tags.get("model_uri")
        if model_uri is None:
            log.warning(
                "sweep: the best job (%s) logged no model (export.torchscript=none?): nothing registered", run.name
            )
            return None
        metric = ", ".join(
            f"{key}={format_value(value)}" for key, value in best_metrics(best).items() if key in HEADLINE_TAGGED
        )
        tags = {"engine": best["engine"], "backend": best["backend"], "skip": best["skip"]}
        tags |= {"metric": metric or "none", "run": str(run.run_id)}
        return tracker.register_model(model_uri, {**tags, "sweep": self.name}, run_id=run.run_id)

    def _summary(
        self, tracker: Tracker, rows: list[dict[str, Any]], best: dict[str, Any] | None, registered: str | None
    ) -> str:
        assert self.spec is not None and self.sweep_dir is not None
        header = ["job", "run", *HEADLINE_REPORT_COLUMNS, "status"]
        table_rows = [
            [row["job"], row["run"], *(row[c] for c in HEADLINE_REPORT_COLUMNS), row["status"]] for row in rows
        ]
        links = []
        if tracker.experiment_id and tracker.last_run_id:
            uri, experiment = self.spec.tracking_uri, tracker.experiment_id
            links.append(
                ("the sweep's jobs, headline columns", experiment_url(uri, experiment, sweep_view(tracker.last_run_id)))
            )
            links.append(("the sweep's parent run", run_url(uri, experiment, tracker.last_run_id)))
            links.append(
                ("compare the jobs", "open the link above, tick the box left of 'Run Name' (all jobs), click Compare")
            )
        if registered:
            links.append(("best job registered as", registered))
        title = f"sweep done: {self.name}" + (f"; best: job {best['job']} ({best['run']})" if best else "")
        return summary(title, header, table_rows, str(self.sweep_dir), self.spec.tracking_uri, links)


def sweep_name(folder: str, overrides: list[str]) -> str:
    """`sweep backend=fbgemm,qnnpack skip=none,add 2026-12-01_10-00-00 evaluate.latency.threads=1`: the swept
    keys first (what the UI shows when it cuts a name), the folder's date and time, then the fixed overrides."""
    swept = [override for override in overrides if "," in override.split("=", 1)[-1]]
    fixed = [override for override in overrides if override not in swept]
    return " ".join(["sweep", *swept, folder, *fixed])


def swept_params(overrides: list[str]) -> dict[str, str]:
    """The sweep's overrides as params of its parent run: `backend` = `fbgemm,qnnpack`."""
    return dict(override.lstrip("+~").split("=", 1) for override in overrides if "=" in override)


def best_metrics(best: dict[str, Any]) -> dict[str, float]:
    """The best job's headline metrics, for the parent run."""
    values = {headline: best[column] for column, headline in REPORT_HEADLINES.items()}
    decimals = HEADLINE_DECIMALS  # rounded like the jobs' own headline metrics
    return {k: round(float(v), decimals.get(k, 6)) for k, v in values.items() if isinstance(v, int | float)}


# --------------------------------------------------------------------------------------------------
# The comparison report of a sweep: a table and an accuracy-vs-speedup plot, one row per job.

REPORT_COLUMNS = [
    ("job", None),
    ("run", None),  # the job's MLflow run name
    ("engine", None),  # fx or pt2e (the run's `engine` tag)
    ("backend", None),
    ("skip", None),
    ("qconfig_mapping", None),
    ("status", None),
    ("float_acc", metric_keys.FLOAT_ACCURACY),
    ("lowered_acc", metric_keys.LOWERED_ACCURACY),
    ("acc_delta_pts", metric_keys.ACCURACY_DELTA),  # in percentage points, like the plot (headline.delta_points)
    ("sqnr_db", metric_keys.LOWERED_SQNR_DB),
    ("latency_b1_ms", metric_keys.latency_ms("lowered", 1)),
    ("speedup_b1", metric_keys.speedup(1)),
    ("size_ratio", metric_keys.SIZE_RATIO),
    ("lowered_mb", metric_keys.LOWERED_BYTES),  # MB in the rows: evaluate's saved size of the int8 model's tensors
    ("cache_hit", metric_keys.CACHE_HIT),
    ("calibrations", metric_keys.CALIBRATIONS),
]
UNITS = (
    "acc_delta_pts: int8 (lowered) minus float accuracy in percentage points (-0.22 = 0.22 points lost); "
    "accuracies are fractions; speedup_b1: float / int8 latency at batch 1; size_ratio: int8 / float bytes; "
    "lowered_mb: the int8 model's weights and constants in MB; <form>_b<N>_ms: the int8 model's median latency "
    "in that form at batch N (fx: eager, traced, frozen TorchScript; pt2e: compiled, or qdq_eager); "
    "<format>_mb: the exported file's size in MB (fx: torchscript, onnx...; pt2e: pt2, aot_inductor, onnx)."
)
# Report columns found in the jobs' metrics (which forms and files a job has depends on its engine and settings):
# latency/lowered/<form>/b<N>_median_ms -> <form>_b<N>_ms; export/<format>/bytes -> <format>_mb.
FORM_LATENCY = re.compile(r"latency/lowered/(?P<form>[a-z0-9_]+)/b(?P<batch>\d+)_median_ms")
FILE_BYTES = re.compile(r"export/(?P<format>[a-z0-9_]+)/bytes")
# Report column -> the headline metric (metric_keys.HEADLINE_METRICS) it is: the parent run's best row.
REPORT_HEADLINES = {
    "sqnr_db": metric_keys.HEADLINE_SQNR_DB,
    "lowered_acc": metric_keys.HEADLINE_INT8_ACCURACY,
    "float_acc": metric_keys.HEADLINE_FLOAT_ACCURACY,
    "acc_delta_pts": metric_keys.HEADLINE_DELTA_POINTS,
    "speedup_b1": metric_keys.HEADLINE_SPEEDUP,
    "size_ratio": metric_keys.HEADLINE_SIZE_RATIO,
}
HEADLINE_REPORT_COLUMNS = ["engine", "backend", "skip", *REPORT_HEADLINES]
HEADLINE_TAGGED = (metric_keys.HEADLINE_INT8_ACCURACY, metric_keys.HEADLINE_DELTA_POINTS, metric_keys.HEADLINE_SQNR_DB)


def measured_columns(children: list[RunRecord]) -> tuple[list[str], list[str]]:
    """The per-form latency columns (`frozen_b1_ms`, `compiled_b1_ms`...: by batch size, then form) and
    per-file size columns (`pt2_mb`, `torchscript_mb`...) that any job's metrics have."""
    forms: set[tuple[int, str]] = set()
    files: set[str] = set()
    for run in children:
        for key in run.metrics:
            if match := FORM_LATENCY.fullmatch(key):
                forms.add((int(match["batch"]), match["form"]))
            elif match := FILE_BYTES.fullmatch(key):
                files.add(match["format"])
    return [f"{form}_b{batch}_ms" for batch, form in sorted(forms)], [f"{name}_mb" for name in sorted(files)]


def sweep_rows(children: list[RunRecord]) -> list[dict[str, Any]]:
    """One report row per job (child run), in job order; `run_id` rides along (not a report column)."""
    rows = []
    form_columns, file_columns = measured_columns(children)
    for run in sorted(children, key=lambda r: int(r.tags.get("job_num", 0))):
        row: dict[str, Any] = {
            "job": run.tags.get("job_num", run.name),
            "run": run.name,
            "engine": run.tags.get("engine", ""),
            "backend": run.tags.get("backend", ""),
            "skip": run.tags.get("skip", ""),
            "qconfig_mapping": run.tags.get("qconfig_mapping", ""),
            "status": run.status,
        }
        for column, metric in REPORT_COLUMNS:
            if metric is not None:
                row[column] = run.metrics.get(metric)
        if row["acc_delta_pts"] is not None:
            row["acc_delta_pts"] = delta_points(row["acc_delta_pts"])
        if row["lowered_mb"] is not None:
            row["lowered_mb"] = row["lowered_mb"] / 1e6
        for column in form_columns:
            form, _, batch = column.removesuffix("_ms").rpartition("_b")
            row[column] = run.metrics.get(metric_keys.form_latency_ms("lowered", form, int(batch), "median"))
        for column in file_columns:
            size = run.metrics.get(metric_keys.export_metric(f"{column.removesuffix('_mb')}/bytes"))
            row[column] = None if size is None else size / 1e6
        row["run_id"] = run.run_id
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    return format_value(value)


def write_report(parent: Tracker, out_dir: Path, children: list[RunRecord] | None = None) -> list[dict[str, Any]]:
    """report.csv, report.md and report.png in out_dir from the parent's child runs, logged to the
    parent run; also printed. report.md is narrow tables (MLflow's artifact viewer does not wrap): quality;
    speed, size and cache; and, when the jobs measured forms or wrote files, speed per form and file sizes."""
    import csv

    children = parent.children() if children is None else children
    rows = sweep_rows(children)
    form_columns, file_columns = measured_columns(children)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [column for column, _ in REPORT_COLUMNS] + form_columns + file_columns
    with (out_dir / "report.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    quality = ["job", "engine", "backend", "skip", "status", "float_acc", "lowered_acc", "acc_delta_pts", "sqnr_db"]
    rest = ["job", "run", "qconfig_mapping", "latency_b1_ms", "speedup_b1", "size_ratio", "lowered_mb"]
    tables = [_markdown(rows, quality), _markdown(rows, [*rest, "cache_hit", "calibrations"])]
    if form_columns or file_columns:  # speed per form and file sizes: what differs most between engines
        tables.append(_markdown(rows, ["job", "engine", *form_columns, *file_columns]))
    markdown = "\n\n".join([*tables, UNITS]) + "\n"
    (out_dir / "report.md").write_text(markdown)
    _plot_report(rows, out_dir / "report.png")
    parent.log_artifacts(out_dir, "report")
    log.info("sweep report (%d jobs, %s):\n%s", len(rows), out_dir, markdown)
    return rows


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows])


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

    plotted = [row for row in rows if row["speedup_b1"] is not None and row["acc_delta_pts"] is not None]
    figure, axis = plt.subplots(figsize=(8, 5))
    points = [(row["speedup_b1"], row["acc_delta_pts"]) for row in plotted]
    front = set(pareto_front(points))
    for i, (row, (x, y)) in enumerate(zip(plotted, points, strict=True)):
        axis.scatter(x, y, s=60, color="tab:orange" if i in front else "tab:blue", zorder=3)
        axis.annotate(
            "/".join(part for part in (row["engine"], row["backend"], row["skip"]) if part),  # pt2e/x86/first_last
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
    axis.set_ylabel("acc_delta_pts: int8 - float accuracy (percentage points)")
    axis.axhline(0, color="0.7", linewidth=1)
    axis.ticklabel_format(axis="y", useOffset=False, style="plain")  # never an offset such as `1e-17`
    if points and max(p[1] for p in points) - min(p[1] for p in points) < 0.01:
        middle = points[0][1]
        axis.set_ylim(middle - 1, middle + 1)  # every delta the same (often 0): one point above and below
    axis.grid(alpha=0.3)
    axis.margins(x=0.12, y=0.2)  # room for the labels above the points, inside the axes
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
