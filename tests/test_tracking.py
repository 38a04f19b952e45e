"""The tracking package: make_tracker picks MLflow or the no-op tracker from the config, the no-op one
touches no store, and importing the package with tracking off does not import mlflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.tracking import Tracker, make_tracker
from pipeline.tracking.off import NoopTracker
from tests.conftest import REPO_ROOT, compose_config, to_spec

LOAD_ONLY = ["stages=[load]", "diagnose.enabled=false", "cache.enabled=false"]


def test_tracking_off_and_offline_give_the_no_op_tracker_and_sqlite_the_mlflow_one(tmp_path: Path) -> None:
    from pipeline.tracking.mlflow import MlflowTracker

    for choice in ("off", "offline"):
        tracker = make_tracker(to_spec(compose_config([f"tracking={choice}"], output_dir=tmp_path)).tracking)
        assert isinstance(tracker, NoopTracker) and isinstance(tracker, Tracker)
    tracker = make_tracker(to_spec(compose_config(["tracking=sqlite"], output_dir=tmp_path)).tracking)
    assert isinstance(tracker, MlflowTracker) and isinstance(tracker, Tracker)
    assert not (tmp_path / "mlflow.db").exists()  # nothing is connected before start()


def test_the_no_op_tracker_records_nothing_and_has_no_run(tmp_path: Path) -> None:
    tracker = NoopTracker()
    tracker.start({"a": {"b": 1}}, {"tag": "x"}, parent_run_id="parent", run_name="name")
    child = tracker.child({}, {}, run_name="trial-0")
    child.log_metrics({"m": 1.0})
    child.end("FINISHED")
    tracker.log_artifacts(tmp_path, "folder")
    tracker.set_tags({"t": "v"})
    assert tracker.run_id is None and child.run_id is None and tracker.children() == []
    tracker.end("FINISHED")
    tracker.end("FINISHED")
    assert list(tmp_path.iterdir()) == []


def test_a_run_with_tracking_off_creates_no_store(run_pipeline, tmp_path: Path) -> None:
    spec, _, run_dir = run_pipeline(["tracking=off", *LOAD_ONLY])
    assert isinstance(make_tracker(spec.tracking), NoopTracker)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_importing_tracking_does_not_import_mlflow() -> None:
    code = (
        "import sys, pipeline.tracking, pipeline.tracking.sweep, pipeline.tracking.off\n"
        "from pipeline.schema import TrackingSpec\n"
        "pipeline.tracking.make_tracker(TrackingSpec(enabled=False, tracking_uri='x', artifact_location=None))\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)
