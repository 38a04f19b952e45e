"""`python -m pipeline.tracking report|sync|close-stale ...`: rebuild a past sweep's report, log an
offline run to a store, or close runs left RUNNING by a hard-killed process."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.schema import PipelineSpec, TrackingSpec, from_config
from pipeline.tracking import make_tracker, run_tags
from pipeline.tracking.sweep import PARENT_RUN_FILE, write_report

DEFAULT_STORE = "sqlite:///outputs/mlflow.db"


def sync_offline_run(run_dir: Path, tracking_uri: str) -> str:
    """Log a run directory written with tracking=offline (or off) to a store: params and tags from its
    config.yaml, metrics from metrics.json, every file as an artifact, FAILED if it has error.txt."""
    resolved = OmegaConf.load(run_dir / "config.yaml")
    spec = from_config(OmegaConf.merge(OmegaConf.structured(PipelineSpec), resolved))
    tracker = make_tracker(replace(spec.tracking, enabled=True, tracking_uri=tracking_uri))
    tracker.start(OmegaConf.to_container(resolved, resolve=True), {**run_tags(spec), "synced_from": str(run_dir)})
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        tracker.log_metrics(json.loads(metrics_file.read_text()))
    run_id = tracker.run_id
    for path in sorted(run_dir.iterdir()):
        tracker.log_artifacts(path, path.name if path.is_dir() else None)
    tracker.end("FAILED" if (run_dir / "error.txt").exists() else "FINISHED")
    assert run_id is not None
    return run_id


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.tracking report|sync|close-stale ...`: rebuild a past sweep's report, log an
    offline run to a store, or close runs left RUNNING by a hard-killed process."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="rebuild a sweep's comparison report from the MLflow store")
    report.add_argument("sweep", help="the sweep's parent run id, or its folder (outputs/multirun/<date_time>)")
    report.add_argument("--tracking-uri", default=DEFAULT_STORE)
    report.add_argument("--out", type=Path, default=None, help="default: <sweep dir>/report, or ./report-<id>")
    stale = commands.add_parser("close-stale", help="mark KILLED the RUNNING runs whose process is gone")
    stale.add_argument("--tracking-uri", default=DEFAULT_STORE)
    sync = commands.add_parser("sync", help="log a run made with tracking=offline (or tracking=off) to a store")
    sync.add_argument("run_dir", type=Path)
    sync.add_argument("--tracking-uri", default=DEFAULT_STORE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The commands below talk to an MLflow store whatever the run's config said.
    from pipeline.tracking.mlflow import MlflowClient, MlflowTracker, close_stale_runs

    if args.command == "close-stale":
        client = MlflowClient(tracking_uri=args.tracking_uri)
        for experiment in client.search_experiments():
            close_stale_runs(client, experiment.experiment_id)
        return
    if args.command == "sync":
        run_id = sync_offline_run(args.run_dir, args.tracking_uri)
        print(f"logged {args.run_dir} as MLflow run {run_id} ({args.tracking_uri})")
        return
    sweep = Path(args.sweep)
    parent = (sweep / PARENT_RUN_FILE).read_text().strip() if sweep.is_dir() else args.sweep
    out = args.out or (sweep / "report" if sweep.is_dir() else Path(f"report-{parent}"))
    store = TrackingSpec(enabled=True, tracking_uri=args.tracking_uri, artifact_location=None)
    write_report(MlflowTracker.attach(store, parent), out)
