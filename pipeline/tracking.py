"""MLflow tracking: one run per pipeline run, params from the resolved config, metrics per stage,
artifacts from the run directory, and an end status that is never left RUNNING.

Uses MlflowClient with explicit run ids rather than mlflow's fluent global run, because a sweep
runs many jobs in one process (Hydra's basic launcher) and nested runs must not leak between them.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# mlflow configures its own logger (which then bypasses Hydra's job log) unless told not to.
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

from hydra.experimental.callback import Callback  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipeline.errors import ConfigError  # noqa: E402
from pipeline.schema import TrackingSpec, is_tracking_server  # noqa: E402

log = logging.getLogger(__name__)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists become their text; values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
            continue
        text = str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            marker = "...[truncated]"
            text = text[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
        flat[name[:MAX_ENTITY_KEY_LENGTH]] = text
    return flat


def artifact_uri(location: str | None) -> str | None:
    """A local folder as an absolute file URI (a relative one would follow the process's cwd); a URI
    (s3://..., mlflow-artifacts:/...) as it is; None leaves the choice to the tracking server."""
    if location is None or len(urlparse(location).scheme) > 1:  # one letter is a Windows drive
        return location
    return Path(location).resolve().as_uri()


class Tracker:
    """A run in MLflow, or nothing at all when tracking.enabled=false."""

    def __init__(self, spec: TrackingSpec) -> None:
        self.spec = spec
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self.nested = False

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def start(
        self,
        params: dict[str, str],
        tags: dict[str, str],
        parent_run_id: str | None = None,
        run_name: str | None = None,
    ) -> None:
        if not self.spec.enabled:
            return
        self.client = connect(self.spec)
        experiment_id = ensure_experiment(self.client, self.spec)
        close_stale_runs(self.client, experiment_id)
        all_tags = {**tags, **process_tags()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, tags=all_tags, run_name=run_name or self.spec.run_name)
        self.run_id = run.info.run_id
        self.nested = parent_run_id is not None
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        log.info(
            "MLflow run %s in experiment '%s' (%s)", self.run_id, self.spec.experiment_name, self.spec.tracking_uri
        )

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        assert self.client is not None and self.run_id is not None
        timestamp = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp, 0) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.active:
            return
        assert self.client is not None and self.run_id is not None
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, local_path: Path, artifact_path: str | None = None) -> None:
        if not self.active or not local_path.exists():
            return
        assert self.client is not None and self.run_id is not None
        if local_path.is_dir():
            self.client.log_artifacts(self.run_id, str(local_path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED; safe to call twice."""
        if not self.active:
            return
        assert self.client is not None and self.run_id is not None
        self.client.set_terminated(self.run_id, status=status)
        log.log(logging.DEBUG if self.nested else logging.INFO, "MLflow run %s ended %s", self.run_id, status)
        self.run_id = None


def connect(spec: TrackingSpec) -> MlflowClient:
    """A client for the store, failing fast (before any work) when an http store does not answer:
    mlflow itself would retry for minutes, then lose the run's results at the first log call."""
    uri = spec.tracking_uri
    if is_tracking_server(uri):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
        except requests.RequestException as error:
            raise ConfigError(
                f"tracking.tracking_uri='{uri}' does not answer ({type(error).__name__}). Start the MLflow "
                f"server, use the local SQLite store (tracking=sqlite), or run offline with tracking=offline "
                f"and log the run later with `python -m pipeline.tracking sync <run dir> --tracking-uri {uri}`."
            ) from None
    _make_sqlite_folder(uri)
    return MlflowClient(tracking_uri=uri)


def process_tags() -> dict[str, str]:
    """Who runs this run: lets a later run tell a crashed (hard-killed) run from a live one."""
    return {"pipeline.host": socket.gethostname(), "pipeline.pid": str(os.getpid())}


def close_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs whose process, on this host, is gone (SIGKILL, power loss):
    no exit handler ran for them, so nothing else ever would."""
    stale = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get("pipeline.host") != socket.gethostname() or not tags.get("pipeline.pid", "").isdigit():
            continue
        try:
            os.kill(int(tags["pipeline.pid"]), 0)
        except ProcessLookupError:
            client.set_tag(run.info.run_id, "closed_by", "stale-run-check")
            client.set_terminated(run.info.run_id, status="KILLED")
            stale.append(run.info.run_id)
        except PermissionError:
            pass  # alive, someone else's
    if stale:
        log.warning("closed %d stale RUNNING run(s) whose process is gone, as KILLED: %s", len(stale), stale)
    return stale


def ensure_experiment(client: MlflowClient, spec: TrackingSpec) -> str:
    """The experiment's id, creating it with artifacts under outputs/ (with a SQLite store, mlflow
    otherwise puts them in ./mlruns of whatever folder the process runs in)."""
    experiment = client.get_experiment_by_name(spec.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(spec.experiment_name, artifact_location=artifact_uri(spec.artifact_location))
    except Exception:
        # Another process created it between our lookup and create.
        experiment = client.get_experiment_by_name(spec.experiment_name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _make_sqlite_folder(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------------
# Sweeps: one parent run per `python -m pipeline -m ...`, each job a nested child run.

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
        self.client: MlflowClient | None = None
        self.parent_run_id: str | None = None
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = TrackingSpec(**OmegaConf.to_container(config.tracking, resolve=True))  # type: ignore[arg-type]
        if not tracking.enabled:
            return
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.client = connect(tracking)
        experiment_id = ensure_experiment(self.client, tracking)
        overrides = list(config.hydra.overrides.task)
        run = self.client.create_run(
            experiment_id,
            run_name=f"sweep-{self.sweep_dir.name}",
            tags={
                "sweep": "true",
                "sweep_dir": str(self.sweep_dir.resolve()),
                "overrides": " ".join(overrides),
                **process_tags(),
            },
        )
        self.parent_run_id = run.info.run_id
        (self.sweep_dir / PARENT_RUN_FILE).write_text(self.parent_run_id)
        atexit.register(self._close, "FAILED")
        log.info("MLflow sweep parent run %s (%s)", self.parent_run_id, tracking.tracking_uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        if self.client is None or self.parent_run_id is None or self.sweep_dir is None:
            return
        client, parent, self.client = self.client, self.parent_run_id, None
        try:
            rows = write_report(client, parent, self.sweep_dir / "report")
            if any(row["status"] != "FINISHED" for row in rows):
                status = "FAILED"
        finally:
            client.set_terminated(parent, status=status)
            log.info("MLflow sweep parent run %s ended %s", parent, status)


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


def sweep_rows(client: MlflowClient, parent_run_id: str) -> list[dict[str, Any]]:
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=5000
    )
    rows = []
    for run in sorted(children, key=lambda r: int(r.data.tags.get("job_num", 0))):
        row: dict[str, Any] = {
            "job": run.data.tags.get("job_num", run.info.run_name),
            "backend": run.data.tags.get("backend", ""),
            "skip": run.data.tags.get("skip", ""),
            "qconfig_mapping": run.data.tags.get("qconfig_mapping", ""),
            "status": run.info.status,
        }
        for column, metric in REPORT_COLUMNS:
            if metric is not None:
                row[column] = run.data.metrics.get(metric)
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(client: MlflowClient, parent_run_id: str, out_dir: Path) -> list[dict[str, Any]]:
    """report.csv, report.md and report.png in out_dir, logged to the parent run; also printed."""
    import csv

    rows = sweep_rows(client, parent_run_id)
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
    client.log_artifacts(parent_run_id, str(out_dir), "report")
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


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.tracking report|sync|close-stale ...`: rebuild a past sweep's report, log an
    offline run to a store, or close runs left RUNNING by a hard-killed process."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="rebuild a sweep's comparison report from the MLflow store")
    report.add_argument("sweep", help="the sweep's parent run id, or its folder (outputs/multirun/<date_time>)")
    report.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    report.add_argument("--out", type=Path, default=None, help="default: <sweep dir>/report, or ./report-<id>")
    stale = commands.add_parser("close-stale", help="mark KILLED the RUNNING runs whose process is gone")
    stale.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    sync = commands.add_parser("sync", help="log a run made with tracking=offline (or tracking=off) to a store")
    sync.add_argument("run_dir", type=Path)
    sync.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "close-stale":
        client = MlflowClient(tracking_uri=args.tracking_uri)
        for experiment in client.search_experiments():
            close_stale_runs(client, experiment.experiment_id)
        return
    if args.command == "sync":
        from pipeline.runner import sync_offline_run

        run_id = sync_offline_run(args.run_dir, args.tracking_uri)
        print(f"logged {args.run_dir} as MLflow run {run_id} ({args.tracking_uri})")
        return
    sweep = Path(args.sweep)
    parent = (sweep / PARENT_RUN_FILE).read_text().strip() if sweep.is_dir() else args.sweep
    out = args.out or (sweep / "report" if sweep.is_dir() else Path(f"report-{parent}"))
    write_report(MlflowClient(tracking_uri=args.tracking_uri), parent, out)


if __name__ == "__main__":
    main()
