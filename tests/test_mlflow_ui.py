"""What a user sees of a run and a sweep in MLflow (issue 14): run names, the experiment's kind, the headline
params and metrics, the dataset input, the int8 model logged and registered (reloaded in a fresh process),
the closing summary, the command-line errors, the sweep report's units, the README's `mlflow ui` command
serving the sweep, and the run list in a real browser. One small sweep (2 jobs) serves every test that needs a store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from pipeline import metric_keys
from pipeline.tracking import headline
from tests import browser
from tests.conftest import REPO_ROOT
from tests.helpers import mlflow_server, seed_store

REGISTERED = "fxq_test_int8"
JOB_NAMES = {"digits_cnn fx x86 backend_default skip=add", "digits_cnn fx qnnpack backend_default skip=add"}


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory: pytest.TempPathFactory):
    """Two jobs (x86, qnnpack) with skip=add, exporting TorchScript, the best registered."""
    out = tmp_path_factory.mktemp("sweep")
    seed_store(out)  # the tracking store's tables made once a session, not migrated again here
    args = [
        "-m",
        "backend=x86,qnnpack",
        "skip=add",
        f"tracking.register={REGISTERED}",
        "diagnose.enabled=false",
        "export.onnx=false",
        "evaluate.latency.repeats=3",
        "evaluate.latency.warmup=1",
        "evaluate.latency.batch_sizes=[1]",
        f"output_dir={out}",
    ]
    result = _cli(args, out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("fx-ptq")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("sweep") == "true"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return out, result.stdout + result.stderr, client, experiment, parent, children


@pytest.mark.slow
def test_runs_and_folders_are_named_by_what_distinguishes_them(small_sweep) -> None:
    out, _, _, _, parent, children = small_sweep
    assert {run.info.run_name for run in children} == JOB_NAMES
    assert parent.info.run_name.startswith("sweep backend=x86,qnnpack ")
    assert "skip=add" in parent.info.run_name and f"output_dir={out}" in parent.info.run_name
    folders = {path.name for path in out.glob("multirun/*/*_digits_cnn_*")}
    assert folders == {
        "0_digits_cnn_fx_x86_backend_default_skip=add",
        "1_digits_cnn_fx_qnnpack_backend_default_skip=add",
    }


@pytest.mark.slow
def test_the_experiment_opens_on_training_runs(small_sweep) -> None:
    _, _, _, experiment, _, _ = small_sweep
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_existing_experiment_gets_the_kind_unless_a_user_chose_one(tmp_path: Path) -> None:
    from pipeline.schema import TrackingSpec
    from pipeline.tracking.mlflow import ensure_experiment

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    old = client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("old", "chosen"):
        ensure_experiment(client, TrackingSpec(tracking_uri="", artifact_location=None, experiment_name=name))
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


@pytest.mark.slow
def test_headline_params_and_metrics_sort_first_and_the_parent_carries_the_best(small_sweep) -> None:
    _, _, client, _, parent, children = small_sweep
    for run in children:
        params, metrics = run.data.params, run.data.metrics
        assert params["Backend"] == run.data.tags["backend"] and params["Skip"] == "add"
        assert params["Mapping"] == "backend_default" and params["Model"] == "digits_cnn"
        assert params["Engine"] == run.data.tags["engine"] == "fx"
        # Capitals sort before every lowercase key (MLflow's UI sorts by code point).
        assert sorted(params)[: len(metric_keys.HEADLINE_PARAMS)] == sorted(metric_keys.HEADLINE_PARAMS)
        assert sorted(metrics)[: len(metric_keys.HEADLINE_METRICS)] == sorted(metric_keys.HEADLINE_METRICS)
        # The compare view plots the first metric the runs share, in logging order: SQNR, not a constant.
        assert next(iter(client.get_run(run.info.run_id).data.metrics)) == metric_keys.HEADLINE_SQNR_DB
        assert metrics["SQNR dB"] == pytest.approx(metrics["eval/lowered/sqnr_db"], abs=0.01)
        assert metrics["Int8 accuracy"] == pytest.approx(metrics["eval/lowered/accuracy"], abs=1e-4)
        assert metrics["Delta points"] == pytest.approx(metrics["eval/accuracy_delta"] * 100, abs=1e-5)
        assert metrics["Speedup"] == pytest.approx(metrics["latency/speedup_b1"], abs=1e-3)
        assert metrics["Size ratio"] == pytest.approx(metrics["size/ratio"], abs=1e-4)
    assert parent.data.params["backend"] == "x86,qnnpack" and parent.data.params["skip"] == "add"
    (best,) = [run for run in children if run.info.run_name == parent.data.tags["best_run"]]
    for key in metric_keys.HEADLINE_METRICS:
        assert parent.data.metrics[key] == pytest.approx(best.data.metrics[key], abs=1e-6), key


@pytest.mark.slow
def test_the_data_is_a_dataset_input_with_digest_and_sizes(small_sweep) -> None:
    _, _, _, _, _, children = small_sweep
    digests = set()
    for run in children:
        (entry,) = run.inputs.dataset_inputs
        assert entry.dataset.name == "digits" and len(entry.dataset.digest) == 16
        profile = json.loads(entry.dataset.profile)
        assert profile["calibration_samples"] == 256 and profile["evaluation_samples"] == 450
        assert {tag.key: tag.value for tag in entry.tags}["mlflow.data.context"] == "calibration+evaluation"
        digests.add(entry.dataset.digest)
    assert len(digests) == 1  # the same data in both jobs


@pytest.mark.slow
def test_the_best_model_is_registered_and_reloads_in_a_fresh_process(small_sweep) -> None:
    out, _, client, _, parent, children = small_sweep
    version = client.get_model_version_by_alias(REGISTERED, "candidate")
    (best,) = [run for run in children if run.info.run_name == parent.data.tags["best_run"]]
    assert version.run_id == best.info.run_id
    assert version.tags["backend"] == best.data.tags["backend"] and version.tags["skip"] == "add"
    assert "Int8 accuracy=" in version.tags["metric"] and "SQNR dB=" in version.tags["metric"]
    for run in children:  # every job logged its model (the run list's Models column)
        assert run.data.tags["model_uri"].startswith("models:/m-") and run.outputs.model_outputs
    engine = best.data.tags["backend"]
    (torchscript,) = out.glob(f"multirun/*/*_{engine}_*/export/lowered_{engine}.torchscript.pt")
    script = f"""
import json, mlflow, numpy as np, torch
mlflow.set_tracking_uri("sqlite:///{out}/mlflow.db")
x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
model = mlflow.pyfunc.load_model("models:/{REGISTERED}@candidate")
torch.backends.quantized.engine = "{engine}"
expected = torch.jit.load("{torchscript}")(torch.from_numpy(x)).numpy()
got = model.predict(x)
print(json.dumps({{"same": bool((got == expected).all()), "shape": list(got.shape),
                  "inputs": str(model.metadata.signature.inputs)}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=out, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer == {"same": True, "shape": [5, 10], "inputs": "[Tensor('float32', (-1, 1, 8, 8))]"}


@pytest.mark.slow
def test_every_run_and_the_sweep_end_with_a_summary(small_sweep) -> None:
    out, output, _, experiment, parent, _ = small_sweep
    for name in JOB_NAMES:
        assert f"done: {name}" in output
    assert "Model       Engine  Backend  Mapping          Skip  SQNR dB  Int8 accuracy" in output
    assert f"sweep done: {parent.info.run_name}; best: job " in output
    assert f"folder: {next(out.glob('multirun/*'))}" in output
    command = f"mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db --host 127.0.0.1 --port 5000 --workers 1"
    assert command in output
    view = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey=fxq-sweep-"
    assert view + parent.info.run_id in output
    assert f"best job registered as: models:/{REGISTERED}@candidate" in output


@pytest.mark.slow
def test_a_runs_model_is_registered_and_the_process_keeps_its_tracking_uri(run_pipeline, tmp_path: Path) -> None:
    before = os.environ.get("MLFLOW_TRACKING_URI")
    _, state, _ = run_pipeline(["tracking.register=one_run", "diagnose.enabled=false", "export.onnx=false"])
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # mlflow's set_tracking_uri exports it: put back
    assert state.registered == "models:/one_run@candidate" and state.model_uri.startswith("models:/m-")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version_by_alias("one_run", "candidate")
    assert version.run_id == state.run_id and version.tags["skip"] == "none" and version.tags["backend"] == "x86"


def test_a_summary_without_tracking_says_so() -> None:
    text = headline.summary("done: x", ["Backend"], [["x86"]], "/runs/1", None, [])
    assert text.splitlines()[-1].startswith("MLflow: tracking was off") and "folder: /runs/1" in text


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("backend=fbgem", "backend=fbgem: the config group 'backend' has no option 'fbgem'. Did you mean 'fbgemm'?"),
        ("skip=firstlast", "Did you mean 'first_last', 'first_add'? Its options are ['add', 'block2_regex', "),
        ("evaluate.latncy.threads=2", "evaluate has no 'latncy'. Did you mean 'latency'? The keys of evaluate"),
    ],
)
def test_an_unknown_option_or_key_gets_a_did_you_mean_and_never_plus(
    tmp_path: Path, override: str, expected: str
) -> None:
    result = _cli([override, f"output_dir={tmp_path}"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and expected in output, output
    assert "+" not in output.replace("+-", "") and "append" not in output and "Could not" not in output
    assert not any(tmp_path.iterdir())  # refused before Hydra made a run folder


def test_the_report_speaks_points_and_a_zero_delta_axis_has_no_offset(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    from pipeline.tracking import sweep

    row = {"job": "0", "run": "r", "engine": "fx", "backend": "x86", "skip": "none", "status": "FINISHED"}
    row["speedup_b1"] = 1.2
    rows = [{**row, "acc_delta_pts": headline.delta_points(1e-19)}, {**row, "speedup_b1": 1.5, "acc_delta_pts": 0.0}]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    sweep._plot_report(rows, tmp_path / "report.png")
    (axis,) = figures[0].axes
    figures[0].canvas.draw()
    assert axis.yaxis.get_offset_text().get_text() == ""
    assert axis.get_ylim() == (-1.0, 1.0) and "points" in axis.get_ylabel()
    assert (
        dict(sweep.REPORT_COLUMNS)["acc_delta_pts"] == metric_keys.ACCURACY_DELTA and "percentage points" in sweep.UNITS
    )
    assert not math.copysign(1, rows[0]["acc_delta_pts"]) < 0


@pytest.mark.slow
def test_the_run_list_in_a_browser_shows_the_pipelines_run_names(small_sweep, request, tmp_path_factory) -> None:
    if browser.chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does it when it can)")
    _, _, _, experiment, parent, _ = small_sweep
    base = request.getfixturevalue("readme_ui")  # the README's `mlflow ui`, started only when chromium is here
    url = headline.experiment_url(base, experiment.experiment_id, headline.sweep_view(parent.info.run_id))
    dom = browser.headless(url)
    artifacts = tmp_path_factory.mktemp("artifacts")
    browser.headless(url, screenshot=artifacts / "mlflow_ui_sweep.png")
    print(f"screenshot: {artifacts / 'mlflow_ui_sweep.png'}")
    assert "Training runs" in dom  # the experiment kind: the runs, not the GenAI overview
    for name in JOB_NAMES:
        assert name in dom, name
    for column in ("Backend", "SQNR dB", "Int8 accuracy", "Delta points", "digits"):
        assert column in dom, column
    assert (artifacts / "mlflow_ui_sweep.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def readme_ui(small_sweep) -> Iterator[str]:
    """The README's `mlflow ui` command, pointed at the small sweep's store, serving; its base URL. One server
    for the REST and the browser test (each start costs seconds)."""
    out = small_sweep[0]
    readme = (REPO_ROOT / "README.md").read_text()
    (command,) = [
        line for line in readme.splitlines() if line.startswith("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui")
    ]
    args = command.split()[2:]  # after the environment setting and `mlflow`
    args[args.index("sqlite:///outputs/mlflow.db")] = f"sqlite:///{out}/mlflow.db"
    with mlflow_server(args, cwd=out) as base:
        yield base


@pytest.mark.slow
def test_readme_mlflow_ui_command_serves_the_sweep(readme_ui: str) -> None:
    """The README's command serves the sweep's parent and children through MLflow's REST API (moved from
    tests/test_sweep.py, which ran a sweep of its own for it)."""
    base = readme_ui
    experiments = requests.post(f"{base}/api/2.0/mlflow/experiments/search", json={"max_results": 10}, timeout=10)
    (experiment,) = [e for e in experiments.json()["experiments"] if e["name"] == "fx-ptq"]
    runs = requests.post(
        f"{base}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment["experiment_id"]], "max_results": 100},
        timeout=10,
    ).json()["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    parent_ids = [run["info"]["run_id"] for run, t in zip(runs, tags, strict=True) if t.get("sweep") == "true"]
    assert len(parent_ids) == 1
    children = [t for t in tags if t.get("mlflow.parentRunId") == parent_ids[0]]
    assert sorted((t["backend"], t["skip"]) for t in children) == [("qnnpack", "add"), ("x86", "add")]


def test_the_shared_view_is_written_once_and_again_only_when_it_changes(tmp_path: Path) -> None:
    """Every run shares the headline view; a store write (a commit) only when the saved one differs."""
    from pipeline.schema import TrackingSpec
    from pipeline.tracking.mlflow import SHARED_VIEW_TAG, MlflowTracker

    spec = TrackingSpec(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "a"))
    writes: list[str] = []

    def tracked() -> MlflowTracker:
        tracker = MlflowTracker(spec)
        tracker.start({}, {})
        assert tracker.client is not None
        real = tracker.client.set_experiment_tag
        tracker.client.set_experiment_tag = lambda *args: writes.append(args[1]) or real(*args)  # type: ignore[method-assign]
        return tracker

    first = tracked()
    first.share_view("headline")
    saved = first.client.get_experiment(first.experiment_id).tags[f"{SHARED_VIEW_TAG}headline"]  # type: ignore[union-attr]
    assert json.loads(saved)["searchFilter"] == "" and writes == [f"{SHARED_VIEW_TAG}headline"]
    second = tracked()
    second.share_view("headline")  # the same view: nothing written
    assert len(writes) == 1
    second.share_view("headline", "tags.backend = 'x86'")  # changed: written
    assert len(writes) == 2
    for tracker in (first, second):
        tracker.end("FINISHED")
