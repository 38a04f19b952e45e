"""Bad input, faults and interruptions: each case is injected and its outcome asserted (README's
"When things go wrong"). Pure config errors are in tests/test_config.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import stages.calibrate
import stages.evaluate
from pipeline import runner
from pipeline.batch import ModelInputs
from pipeline.engine import mappings, qconfigs
from pipeline.errors import ConfigError
from pipeline.tracking import cli as tracking_cli
from pipeline.tracking import mlflow as mlflow_tracking
from pipeline.validation import validate
from stages.calibrate import calibrate
from stages.load import load, load_checkpoint
from stages.reference_convert import reference_convert
from stages.sources.digits import digits_cnn
from tests.conftest import REPO_ROOT, compose_config, to_spec
from tests.helpers import check_one_failing_job, seed_store

SLOW_MODEL = "model.factory._target_=tests.slow_model.slow_digits_cnn"
NO_EXPORT = ["export.onnx=false", "export.torchscript=none"]


@pytest.fixture
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite file with its tables created (copied from the session's template)."""
    return seed_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def store(tmp_path: Path) -> MlflowClient:
    """A store at the path the default tracking config uses for output_dir=tmp_path."""
    seed_store(tmp_path)
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


def _runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("fx-ptq")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Bad input: checkpoints, data, shapes, the convert-time mapping


@pytest.mark.parametrize("case", ["missing", "truncated", "pickled_module", "wrong_keys", "wrong_shapes"])
def test_a_bad_checkpoint_is_a_config_error_naming_the_file_and_the_problem(tmp_path: Path, case: str) -> None:
    model = digits_cnn(checkpoint=None)
    path = tmp_path / "model.pt"
    state = model.state_dict()
    expected = {
        "missing": "does not exist",
        "truncated": "cannot be read as a torch file with weights_only=True",
        # weights_only=True refuses the pickled class: no code from the file runs.
        "pickled_module": "holds pickled Python objects (e.g. a whole nn.Module), which torch.load(weights_only=True) "
        "refuses so that no code from the file runs; the pipeline has no option to load it anyway.",
        "wrong_keys": "2 missing keys (first: ['fc.weight', 'fc.bias']) and 1 unexpected keys (first: ['head.weight'])",
        "wrong_shapes": "size mismatch for fc.bias",
    }[case]
    if case == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "pickled_module":
        torch.save(model, path)
    elif case == "wrong_keys":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")} | {"head.weight": torch.zeros(1)}
        torch.save(state, path)
    elif case == "wrong_shapes":
        torch.save({**state, "fc.bias": torch.zeros(3)}, path)
    with pytest.raises(ConfigError) as error:
        load_checkpoint(model, str(path))
    assert f"model.checkpoint='{path}'" in str(error.value)
    assert expected in str(error.value)


def _patch_digits_data(monkeypatch: pytest.MonkeyPatch, change) -> None:
    from stages.sources import digits

    real = digits.digits_data
    monkeypatch.setattr(digits, "digits_data", lambda **kwargs: change(real(**kwargs)))


@pytest.mark.parametrize("part", ["calibration", "evaluation"])
def test_empty_data_fails_in_load_naming_the_part(monkeypatch: pytest.MonkeyPatch, part: str) -> None:
    _patch_digits_data(monkeypatch, lambda data: replace(data, **{part: []}))
    spec = to_spec(compose_config([]))
    with pytest.raises(ConfigError, match=f"load: data=digits gave no {part} samples"):
        load(spec.model, spec.data, spec.seed)


def test_inputs_the_model_rejects_fail_in_load_naming_stage_and_shape() -> None:
    spec = to_spec(compose_config(["data=synthetic", "data.factory.shape=[3,16,16]"]))
    validate(spec)
    with pytest.raises(ConfigError) as error:
        load(spec.model, spec.data, spec.seed)
    assert (
        "load: model=digits_cnn rejects the inputs of data=synthetic (example inputs {'input_0': [1, 3, 16, 16]})"
        in str(error.value)
    )


def test_a_batch_shaped_unlike_the_example_inputs_fails_in_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def odd_batch(data):
        data.evaluation[3] = (ModelInputs((data.evaluation[3][0].args[0][:, :, :4, :],)), data.evaluation[3][1])
        return data

    _patch_digits_data(monkeypatch, odd_batch)
    spec = to_spec(compose_config([]))
    with pytest.raises(
        ConfigError, match=r"load: data=digits evaluation batch 3 has inputs \(input_0 \[1, 4, 8\] float32\)"
    ):
        load(spec.model, spec.data, spec.seed)


@pytest.fixture(scope="module")
def calibrated_minmax():
    spec = to_spec(compose_config(["qconfig_mapping=minmax_per_channel", "calibrate.max_batches=2"]))
    loaded = load(spec.model, spec.data, spec.seed)
    return spec, calibrate(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.calibrate)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["qconfig_mapping.object_type=[{object_type:torch.nn.Linear,qconfig:histogram_per_channel}]"],
            "object_type entry torch.nn.Linear is new at convert time with QConfig(activation=HistogramObserver",
        ),
        (
            ["qconfig_mapping.global_qconfig=histogram_per_channel"],
            "the global qconfig differs between prepare (QConfig(activation=MinMaxObserver(torch.quint8, "
            "torch.per_tensor_affine), weight=PerChannelMinMaxObserver(torch.qint8, torch.per_channel_symmetric))) "
            "and convert (QConfig(activation=HistogramObserver",
        ),
    ],
)
def test_a_convert_mapping_breaking_convert_fx_rule_is_named_before_converting(
    calibrated_minmax, overrides: list[str], expected: str
) -> None:
    spec, calibrated = calibrated_minmax
    other = to_spec(compose_config(["qconfig_mapping=minmax_per_channel", *overrides]))
    with pytest.raises(ConfigError) as error:
        reference_convert(calibrated, other.backend, other.qconfig_mapping, spec.skip, spec.custom_config)
    assert expected in str(error.value)
    assert "same qconfig or None" in str(error.value)  # the rule


def test_a_changed_prepare_entry_names_the_entry_and_both_qconfigs(calibrated_minmax) -> None:
    spec, calibrated = calibrated_minmax
    backend = spec.backend
    prepare_mapping = calibrated.model.meta["_observed_graph_module_attrs"].qconfig_mapping
    convert_mapping = mappings.build_qconfig_mapping(spec.qconfig_mapping, backend)
    changed = [t for t in prepare_mapping.object_type_qconfigs if prepare_mapping.object_type_qconfigs[t]][0]
    convert_mapping.set_object_type(changed, qconfigs.named_qconfig("histogram_per_tensor", backend, "test"))
    with pytest.raises(ConfigError) as error:
        mappings.check_convert_mapping(prepare_mapping, convert_mapping)
    message = str(error.value)
    assert f"object_type entry {qconfigs.import_path(changed)} has QConfig(" in message
    assert "at prepare but QConfig(activation=HistogramObserver(torch.quint8, torch.per_tensor_affine)" in message
    # A skip-list (None values only) passes, and converts.
    skip = to_spec(compose_config(["skip=conv"])).skip
    assert len(reference_convert(calibrated, backend, spec.qconfig_mapping, skip, spec.custom_config).left_float) == 6


# --------------------------------------------------------------------------------------------------
# Faults: the store, a failing stage


def test_an_unreachable_store_fails_before_anything_is_written(run_pipeline, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ConfigError) as error:
        run_pipeline([f"tracking.tracking_uri={uri}"])
    message = str(error.value)
    assert f"tracking.tracking_uri='{uri}' does not answer (ConnectionError)" in message
    assert "tracking=offline and log the run later with `python -m pipeline.tracking sync <run dir> " in message
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "load").exists()


@pytest.mark.slow
def test_offline_run_then_sync_logs_everything_to_a_store(run_pipeline, empty_store: Path, tmp_path: Path) -> None:
    _, state, run_dir = run_pipeline(["tracking=offline", *NO_EXPORT])
    assert not (tmp_path / "mlflow.db").exists()  # no store touched during the run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval/lowered/accuracy"] > 0.9

    synced = tmp_path / "synced" / "mlflow.db"
    synced.parent.mkdir()
    shutil.copy(empty_store, synced)
    tracking_cli.main(["sync", str(run_dir), "--tracking-uri", f"sqlite:///{synced}"])
    client = MlflowClient(tracking_uri=f"sqlite:///{synced}")
    (run,) = _runs(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["backend.engine"] == "x86" and run.data.params["tracking.enabled"] == "False"
    assert run.data.tags["synced_from"] == str(run_dir) and run.data.tags["skip"] == "none"
    assert run.data.metrics == pytest.approx(metrics)
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "machine.json", "load", "calibrate", "lower", "evaluate"} <= top
    assert {a.path for a in client.list_artifacts(run.info.run_id, "lower")} == {
        "lower/lowered_graph.py",
        "lower/lowered_model.txt",
        "lower/node_counts.json",
    }


@pytest.mark.slow
def test_a_failing_stage_keeps_earlier_outputs_and_the_rerun_hits_the_cache(
    run_pipeline, store: MlflowClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken_evaluate(*args: object) -> dict[str, float]:
        raise RuntimeError("injected evaluate failure")

    monkeypatch.setattr(stages.evaluate, "evaluate", broken_evaluate)
    with pytest.raises(runner.StageFailed) as error:
        run_pipeline(NO_EXPORT)
    run_dir = tmp_path / "run"
    assert str(error.value) == (
        f"stage 'evaluate' failed: RuntimeError: injected evaluate failure Outputs of the stages before it are in "
        f"{run_dir}; the traceback is in {run_dir / 'error.txt'}."
    )
    assert (run_dir / "lower" / "lowered_graph.py").is_file()
    assert (run_dir / "calibrate" / "observer_state.pt").is_file()
    assert "stage: evaluate\nRuntimeError: injected evaluate failure" in (run_dir / "error.txt").read_text()
    (failed,) = _runs(store)
    assert failed.info.status == "FAILED" and failed.data.tags["failed_stage"] == "evaluate"
    assert failed.data.metrics["calibrate/calibrations"] == 1.0 and "nodes/quantized" in failed.data.metrics
    logged = {a.path for a in store.list_artifacts(failed.info.run_id)}
    assert {"error.txt", "lower", "calibrate", "config.yaml"} <= logged

    monkeypatch.undo()
    _, state, _ = run_pipeline(NO_EXPORT)
    assert state.metrics["cache/hit"] == 1.0 and state.metrics["calibrate/calibrations"] == 0.0
    statuses = sorted(run.info.status for run in _runs(store))
    assert statuses == ["FAILED", "FINISHED"]


# --------------------------------------------------------------------------------------------------
# Interruptions


def test_a_signal_swallowed_by_library_code_still_stops_the_run_before_caching(
    run_pipeline, store: MlflowClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_calibrate = stages.calibrate.calibrate

    def calibrate_swallowing_sigterm(*args: object, **kwargs: object):
        with contextlib.suppress(BaseException):  # like the library code that ate a real SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)  # the run's handler raises KeyboardInterrupt here
        return real_calibrate(*args, **kwargs)

    monkeypatch.setattr(stages.calibrate, "calibrate", calibrate_swallowing_sigterm)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        run_pipeline(["stages=[load,calibrate]", "calibrate.max_batches=2"])
    (run,) = _runs(store)
    assert run.info.status == "KILLED"
    assert _cache_entries(tmp_path) == []  # nothing cached
    monkeypatch.undo()
    # The remembered signal does not leak into the next run.
    _, state, _ = run_pipeline(["stages=[load,calibrate]", "calibrate.max_batches=2"])
    assert state.metrics["calibrate/calibrations"] == 1.0


def _start_slow_run(tmp_path: Path, name: str, pause: float = 0.3) -> tuple[subprocess.Popen[str], Path]:
    """The CLI on the slow model (calibration lasts 8 * `pause` seconds), returned once calibration started."""
    run_dir = tmp_path / name
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            SLOW_MODEL,
            "stages=[load,calibrate]",
            f"output_dir={tmp_path}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "FXQ_TEST_PAUSE": str(pause)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = run_dir / "__main__.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "[2/2] calibrate ..." in log.read_text()):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "calibration did not start"
        time.sleep(0.1)
    return process, run_dir


def _cache_entries(tmp_path: Path) -> list[str]:
    cache = tmp_path / "cache"  # absent when the signal came before the cache was opened
    return [p.name for p in cache.iterdir() if not p.name.startswith(".")] if cache.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_calibration_ends_the_run_killed_and_caches_nothing(
    run_pipeline, store: MlflowClient, tmp_path: Path, signum: int, exit_code: int
) -> None:
    process, run_dir = _start_slow_run(tmp_path, "killed")
    process.send_signal(signum)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == exit_code, output[-2000:]
    assert f"Interrupted ({signal.Signals(signum).name}): the MLflow run is marked KILLED" in output
    assert "Traceback" not in output
    (killed,) = _runs(store)
    assert killed.info.status == "KILLED"
    assert _cache_entries(tmp_path) == []
    assert not (run_dir / "calibrate").exists() and (run_dir / "load" / "data.json").is_file()

    _, state, _ = run_pipeline([SLOW_MODEL, "stages=[load,calibrate]"])  # FXQ_TEST_PAUSE unset: no pause
    assert state.metrics["calibrate/calibrations"] == 1.0 and state.metrics["cache/hit"] == 0.0
    assert len(_cache_entries(tmp_path)) == 1
    assert sorted(run.info.status for run in _runs(store)) == ["FINISHED", "KILLED"]


# Runs the CLI with a real SIGTERM sent to itself from inside CalibrationCache.store, after the entry's
# files are written and before the rename: the moment a scheduler's kill is most harmful.
SIGTERM_DURING_CACHE_WRITE = """
import os, runpy, signal, sys
import pipeline.cache

real_fsync = pipeline.cache.os.fsync

def fsync_then_sigterm(fd):
    real_fsync(fd)
    os.kill(os.getpid(), signal.SIGTERM)

pipeline.cache.os.fsync = fsync_then_sigterm
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_a_sigterm_during_the_cache_write_leaves_no_entry_and_the_run_killed(
    run_pipeline, store: MlflowClient, tmp_path: Path
) -> None:
    run_dir = tmp_path / "killed-writing"
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            SIGTERM_DURING_CACHE_WRITE,
            "stages=[load,calibrate]",
            "calibrate.max_batches=2",
            f"output_dir={tmp_path}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 143, output[-2000:]
    assert "Interrupted (SIGTERM): the MLflow run is marked KILLED" in output
    (killed,) = _runs(store)
    assert killed.info.status == "KILLED"
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [name for name in left if not name.endswith(".lock")] == []  # no entry, no temporary folder

    _, state, _ = run_pipeline(["stages=[load,calibrate]", "calibrate.max_batches=2"])
    assert state.metrics["cache/hit"] == 0.0 and state.metrics["calibrate/calibrations"] == 1.0
    assert len(_cache_entries(tmp_path)) == 1


@pytest.mark.slow
def test_a_hard_kill_leaves_running_and_close_stale_marks_it_killed(store: MlflowClient, tmp_path: Path) -> None:
    process, _ = _start_slow_run(tmp_path, "hard-killed", pause=2.0)  # calibration lasts until the kill
    # The store opens on a worker thread while the stages start (tracking/background.py): kill once the run
    # is open (a kill before that leaves nothing in the store to close).
    deadline = time.monotonic() + 120
    while not _runs(store):
        assert process.poll() is None and time.monotonic() < deadline, "the run did not open"
        time.sleep(0.1)
    process.kill()
    process.communicate(timeout=60)
    (run,) = _runs(store)
    assert run.info.status == "RUNNING"  # no exit handler ran
    assert _cache_entries(tmp_path) == []
    tracking_cli.main(["close-stale", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    run = store.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["closed_by"] == "stale-run-check"


def test_the_next_run_closes_runs_whose_process_is_gone_and_only_those(run_pipeline, store: MlflowClient) -> None:
    experiment_id = mlflow_tracking.ensure_experiment(store, to_spec(compose_config([])).tracking)
    finished = subprocess.Popen(["true"])
    finished.wait()
    host = socket.gethostname()
    dead = store.create_run(experiment_id, tags={"pipeline.host": host, "pipeline.pid": str(finished.pid)})
    alive = store.create_run(experiment_id, tags={"pipeline.host": host, "pipeline.pid": str(os.getpid())})
    elsewhere = store.create_run(experiment_id, tags={"pipeline.host": "other-host", "pipeline.pid": "1"})
    run_pipeline(["stages=[load]"])
    statuses = {run.info.run_id: run.info.status for run in _runs(store)}
    assert statuses[dead.info.run_id] == "KILLED"
    assert store.get_run(dead.info.run_id).data.tags["closed_by"] == "stale-run-check"
    assert statuses[alive.info.run_id] == "RUNNING" and statuses[elsewhere.info.run_id] == "RUNNING"


def test_a_stage_failure_survives_pickling_to_the_sweep_launcher() -> None:
    import pickle

    error = runner.StageFailed("lower", Path("/runs/1"), RuntimeError("nothing was quantized"))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is runner.StageFailed and copy.stage == "lower" and str(copy) == str(error)


@pytest.mark.slow
def test_a_failing_job_in_a_parallel_sweep_loses_no_other_job(tmp_path: Path) -> None:
    check_one_failing_job(tmp_path, "hydra/launcher=parallel")


# --------------------------------------------------------------------------------------------------
# Safety notes the README makes


def _readme() -> str:
    return (REPO_ROOT / "README.md").read_text()


def _section(readme: str, title: str) -> str:
    """The text under `## title`, up to the next `## ` heading (wherever the section sits)."""
    after = readme.split(f"\n## {title}\n", 1)[1]
    return after.split("\n## ", 1)[0]


def test_readme_mlflow_ui_binds_localhost_and_says_configs_run_code() -> None:
    readme = _readme()
    (command,) = [line for line in readme.splitlines() if " mlflow ui " in f" {line} " and "--host" in line]
    assert "--host 127.0.0.1" in command
    section = _section(readme, "When things go wrong")
    assert "code execution by design" in section
    assert "weights_only=True" in section and "no opt-in" in section
    for command in ("pipeline.tracking sync", "pipeline.tracking close-stale", "rm -rf outputs/cache"):
        assert command in section
