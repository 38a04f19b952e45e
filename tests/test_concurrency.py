"""Independent `python -m pipeline` processes started at once on a fresh output folder (issue 17).

Before: two of three died in MLflow's SQLite migrations (`duplicate column name: step`, `table
alembic_version already exists`), and all three shared one run folder (named to the second)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking.mlflow import open_store
from tests.conftest import REPO_ROOT

PROCESSES = 3
# Cheap and still the shared first-time state: the store, the artifact folder, the calibration cache.
CHEAP = [
    "stages=[load,calibrate,reference_convert,lower,evaluate]",
    "diagnose.enabled=false",
    "evaluate.latency.enabled=false",
    "evaluate.models=[float,lowered]",
]


@pytest.mark.slow
def test_processes_started_at_once_on_a_fresh_folder_all_finish(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline", f"output_dir={out}", *CHEAP],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        )
        for _ in range(PROCESSES)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
        assert "Traceback" not in output, output
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fx-ptq")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.status for run in runs) == ["FINISHED"] * PROCESSES
    assert all(run.data.metrics["eval/lowered/sqnr_db"] > 20 for run in runs)
    run_dirs = sorted((out / "runs").iterdir())
    assert len(run_dirs) == PROCESSES, run_dirs  # one folder each, even when started in the same second
    assert all((run_dir / "metrics.json").is_file() for run_dir in run_dirs)


def test_a_store_made_by_a_creator_that_won_the_race_is_opened(tmp_path: Path) -> None:
    """The lock only orders this pipeline's processes; a store someone else made (or is making) is used."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = open_store(uri)
    first.create_experiment("made-first")
    second = open_store(uri)  # the store exists and is migrated: no migration runs, the lock is free again
    assert second.get_experiment_by_name("made-first") is not None
    assert (tmp_path / "mlflow.db.lock").exists()


def test_a_lost_creation_race_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.tracking import mlflow as tracking

    calls = []

    class RacingClient:
        def __init__(self, tracking_uri: str) -> None:
            calls.append(tracking_uri)
            if len(calls) == 1:
                raise RuntimeError("(sqlite3.OperationalError) table alembic_version already exists")

    monkeypatch.setattr(tracking, "MlflowClient", RacingClient)
    monkeypatch.setattr(tracking.time, "sleep", lambda seconds: None)
    assert isinstance(open_store(f"sqlite:///{tmp_path / 'm.db'}"), RacingClient)
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setattr(tracking, "STORE_CREATION_ATTEMPTS", 1)
    with pytest.raises(RuntimeError, match="already exists"):
        open_store(f"sqlite:///{tmp_path / 'm.db'}")
