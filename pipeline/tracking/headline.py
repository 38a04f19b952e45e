"""What a user compares conversions by, in MLflow and on the console: the headline params and metrics
(pipeline/metric_keys.py names them), the dataset's digest, the closing summary and the `mlflow ui`
command and URL that open a run or a sweep.

Pure functions of plain values: no mlflow import, no stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline import metric_keys
from pipeline.schema import PipelineSpec, is_tracking_server

UI_HOST, UI_PORT = "127.0.0.1", 5000  # the README's `mlflow ui` command


def headline_params(spec: PipelineSpec, skip: str) -> dict[str, str]:
    """Model, Engine, Backend, Mapping, Skip: `skip` is the skip-list label (schema.skip_label), or
    search=<strategy>."""
    return {
        metric_keys.HEADLINE_MODEL: spec.model.name,
        metric_keys.HEADLINE_ENGINE: spec.engine.name,
        metric_keys.HEADLINE_BACKEND: spec.backend.engine,
        metric_keys.HEADLINE_MAPPING: spec.qconfig_mapping.name,
        metric_keys.HEADLINE_SKIP: f"search={spec.search.strategy}" if spec.search.enabled else skip,
    }


def headline_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The headline metrics that `metrics` (a run's, so far) can give, in HEADLINE_METRICS order."""
    found: dict[str, float] = {}
    for headline, key in metric_keys.HEADLINE_METRICS.items():
        if headline == metric_keys.HEADLINE_DELTA_POINTS and metric_keys.ACCURACY_DELTA in metrics:
            found[headline] = delta_points(metrics[metric_keys.ACCURACY_DELTA])
        elif key is not None and key in metrics:
            found[headline] = round(float(metrics[key]), HEADLINE_DECIMALS[headline])
    return found


# Headline metrics are for reading in a table: rounded (the exact values are in the eval/... metrics).
HEADLINE_DECIMALS = {
    metric_keys.HEADLINE_SQNR_DB: 2,
    metric_keys.HEADLINE_INT8_ACCURACY: 4,
    metric_keys.HEADLINE_FLOAT_ACCURACY: 4,
    metric_keys.HEADLINE_SPEEDUP: 3,
    metric_keys.HEADLINE_SIZE_RATIO: 4,
}


def delta_points(delta: float) -> float:
    """An accuracy delta (a fraction) in percentage points, rounded to 1e-6 points, so that a delta that
    is zero up to float noise is 0 (a plot of 1e-17s gets an axis reading `1e-17`)."""
    return round(float(delta) * 100, 6) + 0.0  # + 0.0: no -0.0


def first_headline_metric(spec: PipelineSpec) -> str | None:
    """The headline metric logged first (as NaN until evaluate measures it), so that MLflow's compare view,
    which plots the first metric the runs share in logging order, opens on it rather than on a constant
    such as data/calibration_samples. None when the run does not evaluate, or evaluates without the float
    model (evaluate.models): there is then no SQNR to replace the placeholder."""
    evaluates_against_float = "evaluate" in spec.stages and "float" in spec.evaluate.models
    return metric_keys.HEADLINE_SQNR_DB if evaluates_against_float else None


def best_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """A sweep's best finished job: the highest int8 accuracy (SQNR when no job has accuracy), ties to the
    higher speedup. It is on the accuracy-speedup Pareto front by construction."""
    finished = [row for row in rows if row.get("status") == "FINISHED"]
    column = "lowered_acc" if any(_number(row.get("lowered_acc")) for row in finished) else "sqnr_db"
    ranked = [row for row in finished if _number(row.get(column))]
    if not ranked:
        return None
    return max(ranked, key=lambda row: (row[column], _number(row.get("speedup_b1")) or 0.0))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not math.isnan(float(value)) else None


def ui_command(tracking_uri: str) -> str | None:
    """The README's `mlflow ui` command for this store; None for a tracking server (it is its own UI)."""
    if is_tracking_server(tracking_uri):
        return None
    return (
        f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {tracking_uri} "
        f"--host {UI_HOST} --port {UI_PORT} --workers 1"
    )


def ui_base(tracking_uri: str) -> str:
    return tracking_uri.rstrip("/") if is_tracking_server(tracking_uri) else f"http://{UI_HOST}:{UI_PORT}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_url(tracking_uri: str, experiment_id: str, view: str | None = None) -> str:
    """The experiment's run list; `view` a shared view's key (the headline columns, a sweep's runs)."""
    url = f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs"
    return f"{url}?viewStateShareKey={view}" if view else url


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, columns padded."""
    cells = [list(header), *[[format_value(value) for value in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


HEADLINE_VIEW = "fxq-headline"  # the shared view of every run with the headline columns


def sweep_view(parent_run_id: str) -> str:
    """The shared view of one sweep's jobs (runs nested under its parent), headline columns selected."""
    return f"fxq-sweep-{parent_run_id}"


def summary(
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    folder: str,
    tracking_uri: str | None,
    links: Sequence[tuple[str, str]],
) -> str:
    """A closing summary: a headline table, the folder, and the command and URLs that open what it
    describes in MLflow's UI (or that tracking was off)."""
    lines = [title, table(header, rows), f"folder: {folder}"]
    if tracking_uri is None or not links:
        lines.append("MLflow: tracking was off (the default, tracking=sqlite, logs to <output_dir>/mlflow.db)")
        return "\n".join(lines)
    command = ui_command(tracking_uri)
    if command is not None:
        lines.append(f"open it in MLflow's UI (from the folder you ran in): {command}")
    lines += [f"  {label}: {url}" for label, url in links]
    return "\n".join(lines)
