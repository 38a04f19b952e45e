"""Sweeps from the command line: one calibration per backend, a parent run with nested children
under both launchers, the comparison report, and an `mlflow server` receiving them (the README's `mlflow ui`
serving a sweep: tests/test_mlflow_ui.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.engine.pt2e_quantizers import torchao_available
from pipeline.tracking.mlflow import artifact_uri
from pipeline.tracking.sweep import pareto_front
from tests.conftest import REPO_ROOT
from tests.helpers import (
    SWEEP_FAST,
    SWEEP_UNTIMED,
    check_one_failing_job,
    mlflow_server,
    parent_and_children,
    report_rows,
    sweep,
)

SIX_SKIPS = "skip=none,add,first_last,block2_regex,linear,first_add"


@pytest.mark.slow
def test_six_skip_lists_on_one_backend_calibrate_once_with_the_basic_launcher(tmp_path: Path) -> None:
    result = sweep(tmp_path, "backend=fbgemm", SIX_SKIPS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED"
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    assert sum(c.data.metrics["calibrate/calibrations"] for c in children) == 1
    assert sum(c.data.metrics["cache/hit"] for c in children) == 5
    assert len({c.data.tags["cache_key"] for c in children}) == 1
    assert sorted(c.data.tags["override.skip"] for c in children) == sorted(SIX_SKIPS[5:].split(","))
    assert all(c.data.tags["override.backend"] == "fbgemm" for c in children)
    rows = report_rows(tmp_path)
    assert [row["skip"] for row in rows] == SIX_SKIPS[5:].split(",")
    assert {row["status"] for row in rows} == {"FINISHED"}
    report_dir = next(tmp_path.glob("multirun/*/report"))
    markdown_rows = [line for line in (report_dir / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert len(markdown_rows) == 21  # three tables (quality; speed and cache; per form), each a header + 6 jobs
    assert (report_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.csv", "report/report.md", "report/report.png"} <= logged
    assert "| fbgemm | first_add |" in result.stdout  # the table is printed too

    # The rebuild command gives the same table from the store alone.
    rebuilt = tmp_path / "rebuilt"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.tracking",
            "report",
            parent.info.run_id,
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--out",
            str(rebuilt),
        ],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert (rebuilt / "report.csv").read_text() == (report_dir / "report.csv").read_text()


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes_and_loses_no_run(tmp_path: Path) -> None:
    result = sweep(tmp_path, "hydra/launcher=parallel", "backend=fbgemm,qnnpack", "skip=none,add", fast=SWEEP_UNTIMED)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "database is locked" not in output and "duplicate column" not in output
    _, parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED"
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    # Jobs ran in worker processes, and the per-key lock made each backend calibrate once.
    assert len({c.data.params["backend.engine"] for c in children}) == 2
    assert sum(c.data.metrics["calibrate/calibrations"] for c in children) == 2
    assert len(report_rows(tmp_path)) == 4


@pytest.mark.slow
@pytest.mark.skipif(not torchao_available(), reason="engine=pt2e needs torchao (pip install --no-deps torchao==0.18.0)")
def test_an_engine_sweep_names_the_engine_in_runs_folders_and_report(tmp_path: Path) -> None:
    # TorchScript on (FX's file), no AOTInductor package (15 s a pt2e job): each engine writes one file.
    fast = [*(o for o in SWEEP_FAST if not o.startswith("export.torchscript")), "export.aot_inductor=false"]
    overrides = ["engine=fx,pt2e", "backend=x86", "skip=none,first_last"]
    result = sweep(tmp_path, *overrides, fast=fast)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and len(children) == 4
    jobs = {(c.data.tags["engine"], c.data.tags["skip"]): c for c in children}
    assert sorted(jobs) == [("fx", "first_last"), ("fx", "none"), ("pt2e", "first_last"), ("pt2e", "none")]
    for (engine, skip), child in jobs.items():  # the MLflow children say which engine ran
        assert child.data.params["Engine"] == child.data.params["engine.name"] == engine
        assert child.info.run_name == f"digits_cnn {engine} x86 backend_default skip={skip}"
    folders = sorted(path.name.split("_", 1)[1] for path in tmp_path.glob("multirun/*/*_digits_cnn_*"))
    assert folders == sorted(child.info.run_name.replace(" ", "_") for child in children)  # four distinct names

    rows = {(row["engine"], row["skip"]): row for row in report_rows(tmp_path)}
    assert sorted(rows) == sorted(jobs)
    for (engine, _), row in rows.items():
        assert float(row["lowered_acc"]) > 0.97 and float(row["sqnr_db"]) > 25, row
        assert float(row["speedup_b1"]) > 0 and 0 < float(row["size_ratio"]) < 0.5, row
        forms = ("eager", "traced", "frozen") if engine == "fx" else ("compiled",)
        assert all(float(row[f"{form}_b1_ms"]) > 0 for form in forms), row  # speed per form
        assert all(row[f"{form}_b1_ms"] == "" for form in {"eager", "traced", "frozen", "compiled"} - set(forms))
        own, other = ("torchscript_mb", "pt2_mb") if engine == "fx" else ("pt2_mb", "torchscript_mb")
        assert 0 < float(row[own]) < 1 and row[other] == "", row  # file size, MB
    report_dir = next(tmp_path.glob("multirun/*/report"))
    markdown = (report_dir / "report.md").read_text()
    assert "| job | engine | backend | skip |" in markdown and "| job | engine | compiled_b1_ms |" in markdown
    assert "| pt2e | x86 | first_last |" in result.stdout  # the printed table names the engine too


@pytest.mark.slow
def test_a_failing_job_fails_the_parent_and_the_report_marks_it(tmp_path: Path) -> None:
    check_one_failing_job(tmp_path)  # basic launcher; tests/test_faults.py runs it with joblib


def test_the_report_has_a_column_per_measured_form_and_exported_file(tmp_path: Path) -> None:
    from pipeline.tracking.base import RunRecord
    from pipeline.tracking.off import NoopTracker
    from pipeline.tracking.sweep import write_report

    common = {"eval/lowered/accuracy": 0.99, "eval/lowered/sqnr_db": 38.0, "size/lowered_bytes": 45_000.0}
    fx = {
        f"latency/lowered/{form}/b1_median_ms": ms for form, ms in [("eager", 0.3), ("traced", 0.12), ("frozen", 0.1)]
    }
    fx |= {"latency/lowered/frozen/b32_median_ms": 1.5, "export/torchscript/bytes": 46_000.0}
    pt2e = {"latency/lowered/compiled/b1_median_ms": 0.9, "export/pt2/bytes": 134_000.0, "export/onnx/bytes": 75_000.0}
    children = [
        RunRecord("a", "FINISHED", {"job_num": "0", "engine": "fx"}, {**common, **fx}),
        RunRecord("b", "FINISHED", {"job_num": "1", "engine": "pt2e"}, {**common, **pt2e}),
    ]
    rows = write_report(NoopTracker(), tmp_path, children)
    assert [row["engine"] for row in rows] == ["fx", "pt2e"]
    assert rows[0]["frozen_b1_ms"] == 0.1 and rows[0]["frozen_b32_ms"] == 1.5 and rows[0]["compiled_b1_ms"] is None
    assert rows[1]["compiled_b1_ms"] == 0.9 and rows[1]["pt2_mb"] == 0.134 and rows[1]["torchscript_mb"] is None
    assert rows[0]["lowered_mb"] == 0.045
    header = (tmp_path / "report.csv").read_text().splitlines()[0].split(",")
    forms = ["compiled_b1_ms", "eager_b1_ms", "frozen_b1_ms", "traced_b1_ms", "frozen_b32_ms"]  # by batch, form
    assert header[2] == "engine" and header[-8:] == [*forms, "onnx_mb", "pt2_mb", "torchscript_mb"]
    assert "| 1 | pt2e | 0.9 | - | - | - | - | 0.075 | 0.134 | - |" in (tmp_path / "report.md").read_text()


def test_pareto_front_keeps_points_nothing_beats_on_both_axes() -> None:
    points = [(1.0, 0.0), (2.0, -0.01), (1.5, -0.02), (0.5, 0.0), (2.0, -0.01)]
    assert pareto_front(points) == [0, 1, 4]


def test_artifact_locations_keep_uris_and_make_folders_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert artifact_uri("outputs/mlartifacts") == (tmp_path / "outputs/mlartifacts").as_uri()
    for uri in ("s3://bucket/mlflow", "mlflow-artifacts:/fx-ptq", "file:///shared/mlartifacts", None):
        assert artifact_uri(uri) == uri


@pytest.mark.slow
def test_submitit_sweep_logs_to_a_tracking_server_like_a_cluster(tmp_path: Path) -> None:
    """The README's cluster recipe with what runs here: Submitit's local executor (each job its own
    process, started by submitit as on Slurm) and an `mlflow server` over a database, with artifacts
    through the server's proxy (tracking.artifact_location=null)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the [submitit] extra is not installed")
    server_args = [
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/server.db",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--workers",
        "1",
    ]
    with mlflow_server(server_args, cwd=tmp_path) as base:
        result = sweep(
            tmp_path,
            "hydra/launcher=submitit_local",
            f"tracking.tracking_uri={base}",
            "tracking.artifact_location=null",
            # Two jobs of one backend (four of two backends before: the same checks, two processes fewer):
            # each its own process, and the second reuses the first's calibration across processes.
            "backend=fbgemm",
            "skip=none,add",
            fast=SWEEP_UNTIMED,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        client = MlflowClient(tracking_uri=base)
        runs = client.search_runs([client.get_experiment_by_name("fx-ptq").experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert parent.info.status == "FINISHED"
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        assert sum(c.data.metrics["calibrate/calibrations"] for c in children) == 1  # one for the backend
        assert len({c.data.tags["pipeline.pid"] for c in children}) == 2  # each job its own process
        report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.csv", "report/report.png"} <= report
    # Artifacts went through the server to its destination, not to a folder the jobs chose.
    assert any((tmp_path / "server-artifacts").rglob("report.csv"))
    assert not (tmp_path / "mlartifacts").exists()
