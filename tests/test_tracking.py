"""The tracking package: make_tracker picks MLflow or the no-op tracker from the config, the no-op one
touches no store, importing the package with tracking off does not import mlflow, and the background
tracker a run uses opens its store on a worker thread, keeps the calls in order and names a store
that fails to open."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.tracking import Tracker, make_tracker
from pipeline.tracking.background import BackgroundTracker
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


class _Recorder:
    """A Tracker that records its calls and the thread each was made on; its start can wait or raise."""

    def __init__(self, spec: object, gate: threading.Event | None = None, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gate, self.fail = gate, fail
        self.run_id = self.last_run_id = self.experiment_id = None

    def _record(self, name: str) -> None:
        self.calls.append((name, threading.current_thread().name))

    def start(self, params, tags, parent_run_id=None, run_name=None) -> None:
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail is not None:
            raise self.fail
        self._record("start")
        self.run_id = self.last_run_id = "run-1"

    def log_metrics(self, metrics) -> None:
        self._record(f"log_metrics {sorted(metrics)}")

    def end(self, status: str) -> None:
        self._record(f"end {status}")
        self.run_id = None

    def synchronous(self, on: bool = True) -> None:
        pass

    def logged_model(self, torchscript, engine, example, output) -> str:
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail is not None:
            raise self.fail
        self._record("log_model")
        return "models:/m-1"


def _background(tmp_path: Path, **recorder: object) -> tuple[BackgroundTracker, list[_Recorder]]:
    spec = to_spec(compose_config(["tracking=sqlite"], output_dir=tmp_path)).tracking
    made: list[_Recorder] = []

    def opener(spec: object) -> _Recorder:
        made.append(_Recorder(spec, **recorder))  # type: ignore[arg-type]
        return made[-1]

    return BackgroundTracker(spec, opener=opener), made


def test_the_background_tracker_opens_the_run_on_its_worker_and_keeps_the_calls_in_order(tmp_path: Path) -> None:
    gate = threading.Event()
    tracker, made = _background(tmp_path, gate=gate)
    assert isinstance(tracker, Tracker)
    tracker.start({"a": 1}, {"t": "x"})  # returns while the store is still opening (the gate is shut)
    tracker.log_metrics({"m": 1.0})
    assert made == [] or made[0].calls == []
    gate.set()
    tracker.synchronous()  # waits for what was queued before it
    (real,) = made
    assert [name for name, _ in real.calls] == ["start", "log_metrics ['m']"]
    assert {thread for _, thread in real.calls} != {threading.current_thread().name}  # made on the worker
    tracker.log_metrics({"n": 2.0})  # after synchronous(): recorded before the call returns
    assert real.calls[-1][0] == "log_metrics ['n']"
    assert tracker.run_id == "run-1"
    tracker.end("FINISHED")
    tracker.end("FINISHED")
    assert real.calls[-1][0] == "end FINISHED" and tracker.last_run_id == "run-1"


class _BatchRecorder(_Recorder):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[tuple[list[tuple[str, float]], dict, dict]] = []

    def log_batch(self, metrics, params, tags) -> None:
        self._record("log_batch")
        self.batches.append(([(key, value) for key, value, _ in metrics], dict(params), dict(tags)))


def test_metrics_params_and_tags_logged_while_the_store_opens_are_one_store_call(tmp_path: Path) -> None:
    """What the stages log before the worker gets to it goes to the store in one log_batch (each store
    write is a commit); a NaN placeholder still waiting is replaced in place by its value."""
    spec = to_spec(compose_config(["tracking=sqlite"], output_dir=tmp_path)).tracking
    gate, made = threading.Event(), []
    tracker = BackgroundTracker(spec, opener=lambda spec: made.append(_BatchRecorder(spec, gate=gate)) or made[-1])
    tracker.start({}, {})
    tracker.log_metrics({"sqnr": float("nan")})
    tracker.log_metrics({"load/seconds": 1.0})
    tracker.set_tags({"t": "x"})
    tracker.log_params({"p": "1"})
    tracker.log_metrics({"sqnr": 30.0})
    tracker.set_tags({"t": "y"})
    gate.set()
    tracker.synchronous()
    (real,) = made
    assert [name for name, _ in real.calls] == ["start", "log_batch"]
    assert real.batches == [([("sqnr", 30.0), ("load/seconds", 1.0)], {"p": "1"}, {"t": "y"})]
    tracker.log_metrics({"n": 2.0})  # synchronous: sent before the call returns
    assert real.batches[-1] == ([("n", 2.0)], {}, {})
    tracker.end("FINISHED")
    assert real.calls[-1][0] == "end FINISHED"


def test_a_batch_waits_up_to_flush_seconds_for_more_unless_the_run_ends(tmp_path: Path, monkeypatch) -> None:
    from pipeline.tracking import background

    spec = to_spec(compose_config(["tracking=sqlite"], output_dir=tmp_path)).tracking
    made: list[_BatchRecorder] = []
    tracker = BackgroundTracker(spec, opener=lambda spec: made.append(_BatchRecorder(spec)) or made[-1])
    tracker.start({}, {})
    tracker.log_metrics({"a": 1.0})
    time.sleep(0.3)  # the store is open; the batch waits for more
    tracker.log_metrics({"b": 2.0})
    tracker.end("FINISHED")  # sends it at once
    assert made[0].batches == [([("a", 1.0), ("b", 2.0)], {}, {})]

    monkeypatch.setattr(background, "FLUSH_SECONDS", 0.05)
    made.clear()
    tracker = BackgroundTracker(spec, opener=lambda spec: made.append(_BatchRecorder(spec)) or made[-1])
    tracker.start({}, {})
    tracker.log_metrics({"a": 1.0})
    deadline = time.monotonic() + 10
    while not (made and made[0].batches) and time.monotonic() < deadline:  # sent without anything waiting
        time.sleep(0.01)
    assert made[0].batches == [([("a", 1.0)], {}, {})]
    tracker.end("FINISHED")


def test_tracking_goes_synchronous_before_evaluate_only_when_it_times_models() -> None:
    """The runner stops tracking work running beside a stage that measures latency, and only then: a run
    without latency keeps its MLflow calls on the worker thread while evaluate scores the models."""
    from pipeline import registry
    from stages import calibrate, evaluate, search

    timed, untimed = to_spec(compose_config([])), to_spec(compose_config(["evaluate.latency.enabled=false"]))
    assert registry.measures_time(evaluate, timed) and not registry.measures_time(evaluate, untimed)
    assert registry.measures_time(search, untimed)  # a search times its trials whatever evaluate does
    assert not registry.measures_time(calibrate, timed)


def test_a_store_that_fails_to_open_is_a_config_error_at_the_next_call_and_only_once(tmp_path: Path) -> None:
    tracker, made = _background(tmp_path, fail=RuntimeError("file is not a database"))
    tracker.start({}, {})
    with pytest.raises(ConfigError, match=r"tracking.tracking_uri='sqlite:///.*': the MLflow store could not"):
        tracker.synchronous()
    tracker.log_metrics({"m": 1.0})  # the error was raised once: nothing more is recorded, nothing raised
    tracker.end("FAILED")
    assert made[0].calls == [] and tracker.run_id is None


def test_a_run_on_a_store_that_is_not_one_fails_naming_the_store(run_pipeline, tmp_path: Path) -> None:
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db, db:  # an SQLite file MLflow refuses
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        db.execute("INSERT INTO alembic_version VALUES ('0000aaaa0000')")
    with pytest.raises(ConfigError, match=r"the MLflow store could not be opened \(.*0000aaaa0000"):
        run_pipeline(LOAD_ONLY)
    assert (tmp_path / "run" / "load" / "data.json").is_file()  # the stage before the store answered kept its files


class _RacingClient:
    """log_inputs fails like the loser of two jobs inserting the same dataset row, `failures` times."""

    def __init__(self, failures: int, message: str) -> None:
        self.failures, self.message, self.calls = failures, message, 0

    def log_inputs(self, run_id: str, inputs: list) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(self.message)


@pytest.mark.parametrize(
    ("failures", "message", "calls", "warned"),
    [
        (1, "UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest", 2, False),
        (5, "UNIQUE constraint failed: datasets.experiment_id", 3, True),
        (1, "BAD_REQUEST: the store is read-only", 1, True),
    ],
)
def test_a_dataset_logged_by_two_jobs_at_once_is_retried_and_never_fails_the_run(
    failures: int, message: str, calls: int, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Seen in a submitit sweep against an mlflow server: job 0's load stage died on the dataset INSERT race.
    from pipeline.schema import TrackingSpec
    from pipeline.tracking.mlflow import MlflowTracker

    tracker = MlflowTracker(TrackingSpec())
    tracker.client, tracker.run_id = _RacingClient(failures, message), "run"  # type: ignore[assignment]
    tracker.log_dataset("digits", "abc", "stages.sources.digits.digits_data", {"samples": 1}, "evaluation")
    assert tracker.client.calls == calls  # type: ignore[union-attr]
    assert ("dataset input 'digits' was not logged" in caplog.text) is warned


# Two threads parse while a collector finalizer (run mid-parse) hands the GIL over: the race CPython < 3.13
# loses (gh-106905) and CI's run hit in evaluate (mlflow's imports on the worker, torch.jit on the main thread).
AST_RACE = """
import ast, gc, sys, threading
guard = sys.argv[1] == "guarded"
if guard:
    from pipeline.tracking.background import _Queue
    _Queue()  # what a run's tracker makes: the guard is installed with its worker
line = "def f{}(a, b=1, *c, d=[1, (2, {{3: 4}})], **e):\\n    return [x for x in a if x > b]"
source = "\\n".join(line.format(i) for i in range(30))
errors = []
class Cycle:
    def __init__(self): self.me = self
    def __del__(self):
        for _ in range(50): pass  # Python code run by the collector: a thread switch can happen here
def parse(times):
    for _ in range(times):
        for _ in range(5): Cycle()
        try:
            ast.parse(source)
        except SystemError as error:
            errors.append(str(error)); return
gc.set_threshold(10); sys.setswitchinterval(1e-6)
threads = [threading.Thread(target=parse, args=(300,)) for _ in range(2)]
[t.start() for t in threads]; [t.join() for t in threads]
print(errors[0] if errors else "no error")
"""


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="Python 3.13 counts each parse's recursion on its own")
def test_the_tracking_worker_serializes_ast_parse_so_two_threads_cannot_corrupt_it() -> None:
    def race(mode: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", AST_RACE, mode], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    assert "recursion depth mismatch" in race("bare")  # the race is real on this interpreter
    assert race("guarded") == "no error"


def test_a_logged_model_is_recorded_in_the_background_and_its_error_goes_to_who_asks_for_its_uri(
    tmp_path: Path,
) -> None:
    """log_model returns before the model is recorded (the next stages run meanwhile); the returned function
    waits for it. A failed logging raises there, not from the next tracker call, which goes on recording."""
    gate = threading.Event()
    tracker, made = _background(tmp_path)
    tracker.start({}, {})
    tracker.synchronous()
    tracker.synchronous(False)  # queued again (the runner's state after a stage that times models)
    (real,) = made
    real.gate = gate
    uri = tracker.log_model(tmp_path / "model.pt", "x86", [], None)  # returns while the logging waits
    tracker.log_metrics({"m": 1.0})
    assert "log_model" not in [name for name, _ in real.calls]
    gate.set()
    assert uri() == "models:/m-1"
    tracker.synchronous()
    assert [name for name, _ in real.calls][-2:] == ["log_model", "log_metrics ['m']"]

    real.gate, real.fail = None, RuntimeError("artifact store full")
    failed = tracker.log_model(tmp_path / "model.pt", "x86", [], None)
    tracker.log_metrics({"n": 2.0})  # not blamed for the model's error
    with pytest.raises(RuntimeError, match="artifact store full"):
        failed()
    real.fail = None
    tracker.end("FINISHED")
    assert [name for name, _ in real.calls][-2:] == ["log_metrics ['n']", "end FINISHED"]


def test_the_logged_model_keeps_a_small_input_example_and_leaves_a_large_one_out(tmp_path: Path) -> None:
    """A small example (the digits' 64 pixels) travels with the logged model; a 3 x 224 x 224 image, which
    mlflow would write as 3 MB of JSON and read back in pure Python to check it, does not: the signature
    still gives its shape."""
    import torch
    from mlflow import MlflowClient
    from mlflow.models import Model

    from pipeline.tracking.mlflow import MAX_INPUT_EXAMPLE_ELEMENTS, fluent_store, log_torchscript_model
    from tests.helpers import seed_store

    uri = f"sqlite:///{seed_store(tmp_path)}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("models", artifact_location=str(tmp_path / "artifacts"))
    found = {}
    for shape in ((1, 1, 8, 8), (1, 3, 224, 224)):
        module = torch.jit.trace(torch.nn.Flatten().eval(), torch.zeros(shape))
        path = tmp_path / f"{shape[-1]}.pt"
        module.save(str(path))
        example = torch.zeros(shape).numpy()
        run_id = client.create_run(experiment).info.run_id
        model_uri = log_torchscript_model(uri, run_id, path, "x86", [example], example.reshape(1, -1))
        with fluent_store(uri):
            model = Model.load(model_uri)
        found[shape[-1]] = (model.saved_input_example_info is not None, str(model.signature.inputs))
    assert 8 * 8 <= MAX_INPUT_EXAMPLE_ELEMENTS < 3 * 224 * 224
    assert found == {
        8: (True, "[Tensor('float32', (-1, 1, 8, 8))]"),
        224: (False, "[Tensor('float32', (-1, 3, 224, 224))]"),
    }
