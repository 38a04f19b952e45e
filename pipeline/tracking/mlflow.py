"""The MLflow tracker: one run per pipeline run, params from the resolved config, metrics per stage,
artifacts from the run directory, and an end status that is never left RUNNING.

Uses MlflowClient with explicit run ids rather than mlflow's fluent global run, because a sweep
runs many jobs in one process (Hydra's basic launcher) and nested runs must not leak between them.
Only pipeline.tracking.make_tracker (tracking on) and the CLI import this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# mlflow configures its own logger (which then bypasses Hydra's job log) unless told not to.
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH  # noqa: E402

from pipeline import metric_keys  # noqa: E402
from pipeline.errors import error_summary  # noqa: E402
from pipeline.schema import TrackingSpec  # noqa: E402
from pipeline.tracking.base import RunRecord, require_server  # noqa: E402

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


class MlflowTracker:
    """Implements pipeline.tracking.base.Tracker with one MLflow run."""

    def __init__(self, spec: TrackingSpec) -> None:
        self.spec = spec
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self.nested = False
        self.kind = "run"  # how the log lines name it: "sweep parent run" for a sweep's (tag sweep=true)
        self.experiment_id: str | None = None
        self.experiment_tags: dict[str, str] = {}  # as start() found them: share_view writes only a change
        self.last_run_id: str | None = None  # the run's id after end(), for the closing summary

    @classmethod
    def attach(cls, spec: TrackingSpec, run_id: str) -> MlflowTracker:
        """A tracker on a run that already exists (a past sweep's parent, to rebuild its report)."""
        tracker = cls(spec)
        tracker.client = MlflowClient(tracking_uri=spec.tracking_uri)
        tracker.run_id = tracker.last_run_id = run_id
        tracker.experiment_id = tracker.client.get_run(run_id).info.experiment_id
        return tracker

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def start(
        self,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        run_name: str | None = None,
    ) -> None:
        self.client = connect(self.spec)
        experiment_id, self.experiment_tags = _ensure_experiment(self.client, self.spec)
        close_stale_runs(self.client, experiment_id)
        all_tags = {**tags, **process_tags()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, tags=all_tags, run_name=self.spec.run_name or run_name)
        self.run_id = self.last_run_id = run.info.run_id
        self.experiment_id = experiment_id
        self.nested = parent_run_id is not None
        self.kind = "sweep parent run" if tags.get("sweep") == "true" else "run"
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flatten(params).items()])
        log.info(
            "MLflow %s %s in experiment '%s' (%s)",
            self.kind,
            self.run_id,
            self.spec.experiment_name,
            self.spec.tracking_uri,
        )

    def child(self, params: Mapping[str, Any], tags: Mapping[str, str], run_name: str | None = None) -> MlflowTracker:
        child = MlflowTracker(replace(self.spec, run_name=None))  # a trial keeps its own name
        child.start(params, tags, parent_run_id=self.run_id, run_name=run_name)
        return child

    def children(self) -> list[RunRecord]:
        if not self.active:
            return []
        assert self.client is not None and self.run_id is not None
        parent = self.client.get_run(self.run_id)
        runs = self.client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'", max_results=5000
        )
        return [
            RunRecord(run.info.run_name, run.info.status, run.data.tags, run.data.metrics, run.info.run_id)
            for run in runs
        ]

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        assert self.client is not None and self.run_id is not None
        timestamp = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp, 0) for k, v in metrics.items()])

    def log_batch(
        self, metrics: Sequence[tuple[str, float, int]], params: Mapping[str, Any], tags: Mapping[str, str]
    ) -> None:
        """Metrics as (key, value, timestamp ms), in the order logged (a key twice: both, as its history),
        params (flattened as log_params does) and tags in one store call."""
        if not self.active:
            return
        assert self.client is not None and self.run_id is not None
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, float(value), timestamp, 0) for key, value, timestamp in metrics],
            params=[Param(k, str(v)) for k, v in flatten(params).items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

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

    def log_params(self, params: Mapping[str, str]) -> None:
        if not self.active:
            return
        assert self.client is not None and self.run_id is not None
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in flatten(params).items()])

    def log_dataset(self, name: str, digest: str, source: str, profile: Mapping[str, Any], context: str) -> None:
        """The data as an MLflow dataset input (the run list's Dataset column): name, digest, where it came
        from (the data factory), and its sizes as the profile."""
        if not self.active:
            return
        assert self.client is not None and self.run_id is not None
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest,
            source_type="code",
            source=json.dumps({"factory": source}),
            profile=json.dumps(dict(profile)),
        )
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        # Jobs of a parallel sweep (submitit, joblib) log the same dataset at once: the store inserts it once
        # and the loser's INSERT fails a UNIQUE constraint (seen against an `mlflow server`); by the retry the
        # row exists and the run only links to it. The dataset input describes the run, so a failure to log it
        # is a warning, never the load stage's failure.
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, inputs)
                return
            except Exception as error:  # the store's own exception types differ by backend (SQLAlchemy, REST)
                if "UNIQUE constraint" in str(error) and attempt < 2:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                log.warning("MLflow: the dataset input '%s' was not logged: %s", name, error_summary(error, 200))
                return

    def log_model(
        self, torchscript: Path, engine: str, example: Sequence[Any], output: Any
    ) -> Callable[[], str | None]:
        """The exported int8 TorchScript file as an MLflow pyfunc model of this run (the run list's Models
        column), with its signature (and its input example when small); returns a function giving its models:/ URI."""
        uri = self.logged_model(torchscript, engine, example, output)
        return lambda: uri

    def logged_model(self, torchscript: Path, engine: str, example: Sequence[Any], output: Any) -> str | None:
        """log_model's work, on the calling thread: the models:/ URI, or None with no run open."""
        if not self.active:
            return None
        assert self.client is not None and self.run_id is not None
        model_uri = log_torchscript_model(self.spec.tracking_uri, self.run_id, torchscript, engine, example, output)
        self.set_tags({"model_uri": model_uri})
        log.info("MLflow: logged the int8 model as %s", model_uri)
        return model_uri

    def register_model(self, model_uri: str, tags: Mapping[str, str], run_id: str | None = None) -> str | None:
        """model_uri as a new version of tracking.register, with tags and tracking.register_alias; returns
        `models:/<name>@<alias>`."""
        name = self.spec.register
        if name is None or self.client is None:
            return None
        # The registry of this store: without registry_uri, mlflow takes the process's (fluent) tracking URI.
        uri = self.spec.tracking_uri
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        with fluent_store(uri):  # the registry resolves the models:/ source through the fluent store
            return register_model(client, name, self.spec.register_alias, model_uri, tags, run_id or self.run_id)

    def share_view(self, key: str, search_filter: str = "") -> str | None:
        """An experiment view (headline columns selected, runs filtered by search_filter) that the UI opens
        with ?viewStateShareKey=<key>; returns the key."""
        if self.client is None or self.experiment_id is None:
            return None
        state = {
            "searchFilter": search_filter,
            "orderByKey": "attributes.start_time",
            "orderByAsc": False,
            "selectedColumns": headline_columns(),
            "columnOrder": [],
            "columnWidths": {"attributes.`Run Name`": 330},
            # Grouped by backend: the groups open expanded, where a sweep's parent run would hide its jobs.
            "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": "Backend"}]},
        }
        tag, value = f"{SHARED_VIEW_TAG}{key}", json.dumps(state)
        if self.experiment_tags.get(tag) != value:  # every run shares the same view: a store write once
            self.client.set_experiment_tag(self.experiment_id, tag, value)
            self.experiment_tags[tag] = value
        return key

    def synchronous(self, on: bool = True) -> None:
        pass  # every call is recorded before it returns

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED; safe to call twice."""
        if not self.active:
            return
        assert self.client is not None and self.run_id is not None
        self.client.set_terminated(self.run_id, status=status)
        log.log(logging.DEBUG if self.nested else logging.INFO, "MLflow %s %s ended %s", self.kind, self.run_id, status)
        self.run_id = None


def connect(spec: TrackingSpec) -> MlflowClient:
    """A client for the store, failing fast (before any work) when an http store does not answer."""
    require_server(spec)
    _make_sqlite_folder(spec.tracking_uri)
    return open_store(spec.tracking_uri)


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


# MLflow 3's UI opens an experiment on what its kind says: without the tag it guesses, and opened this
# pipeline's experiments on the GenAI traces overview. "custom_model_development" opens on the runs (the
# UI's "Custom model development"; mlflow/server/js, ExperimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A kind the UI guessed (or none) is replaced; one a user chose in the UI (genai_development, ...) is kept.
GUESSED_KINDS = (None, "", "genai_development_inferred", "custom_model_development_inferred", "no_inferred_type")
CREATED_BY_TAG = "pipeline.created_by"
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # the UI's shared views: ?viewStateShareKey=<key>


def ensure_experiment(client: MlflowClient, spec: TrackingSpec) -> str:
    """The experiment's id, creating it with artifacts under outputs/ (with a SQLite store, mlflow
    otherwise puts them in ./mlruns of whatever folder the process runs in) and the kind that makes the
    UI open it on its runs; an existing experiment without a chosen kind gets that kind too."""
    return _ensure_experiment(client, spec)[0]


def _ensure_experiment(client: MlflowClient, spec: TrackingSpec) -> tuple[str, dict[str, str]]:
    """ensure_experiment, and the experiment's tags as found (or created)."""
    experiment = client.get_experiment_by_name(spec.experiment_name)
    if experiment is not None:
        tags = dict(experiment.tags)
        if tags.get(EXPERIMENT_KIND_TAG) in GUESSED_KINDS:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            tags[EXPERIMENT_KIND_TAG] = EXPERIMENT_KIND
        return experiment.experiment_id, tags
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, CREATED_BY_TAG: "fx-quant-pipeline"}
    try:
        created = client.create_experiment(
            spec.experiment_name, artifact_location=artifact_uri(spec.artifact_location), tags=tags
        )
        return created, dict(tags)
    except Exception:
        # Another process created it between our lookup and create.
        experiment = client.get_experiment_by_name(spec.experiment_name)
        if experiment is None:
            raise
        return experiment.experiment_id, dict(experiment.tags)


def headline_columns() -> list[str]:
    """The run list's columns in the UI's ids: Dataset, Models, the headline params and metrics."""
    columns = ["attributes.`Dataset`", "attributes.`Models`"]
    columns += [f"params.`{key}`" for key in metric_keys.HEADLINE_PARAMS]
    return columns + [f"metrics.`{key}`" for key in metric_keys.HEADLINE_METRICS]


MODEL_CODE = Path(__file__).with_name("torchscript_model.py")


@contextlib.contextmanager
def fluent_store(tracking_uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """mlflow's global (fluent) tracking URI, and experiment, for a block: model logging and the registry's
    `models:/` sources read them rather than a client's. set_tracking_uri also exports MLFLOW_TRACKING_URI,
    which later subprocesses would inherit: the variables are put back as they were."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    mlflow.set_tracking_uri(tracking_uri)
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


MAX_INPUT_EXAMPLE_ELEMENTS = 4096  # an input example up to this many numbers is logged with the model (see below)


def log_torchscript_model(
    tracking_uri: str, run_id: str, torchscript: Path, engine: str, example: Sequence[Any], output: Any
) -> str:
    """Log the TorchScript file as a pyfunc model from code (pipeline/tracking/torchscript_model.py) linked
    to run_id. mlflow's model logging reads the fluent tracking URI, so it is set for the call."""
    import mlflow
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    arrays = [np.asarray(value) for value in example]
    names = [f"input_{i}" for i in range(len(arrays))] if len(arrays) > 1 else [None]
    inputs = Schema([TensorSpec(a.dtype, (-1, *a.shape[1:]), n) for a, n in zip(arrays, names, strict=True)])
    result = np.asarray(output)
    signature = ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(result.dtype, (-1, *result.shape[1:]))]))
    # The input example is written as JSON, read back and run by mlflow's serving check, all in pure Python:
    # for one 224 x 224 image (150,528 floats, 3 MB of JSON) that was 0.55 s of the ResNet-18 shape's run, with
    # the GIL held against the stage running meanwhile. A larger example is left out; the signature keeps the
    # shapes and dtypes, and export has reloaded and checked the file itself.
    small = sum(array.size for array in arrays) <= MAX_INPUT_EXAMPLE_ELEMENTS
    input_example = (arrays[0] if len(arrays) == 1 else dict(zip(names, arrays, strict=True))) if small else None
    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    # The logged model belongs to an experiment, which mlflow takes from the fluent API, not from run_id: the
    # run's own, so that the UI's Models column and the experiment's Models tab show it.
    with fluent_store(tracking_uri, experiment_id):
        info = Model.log(
            artifact_path=None,
            name="int8_model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(MODEL_CODE),  # run, not imported, by mlflow: it calls mlflow.models.set_model
            artifacts={"torchscript": str(torchscript)},  # torchscript_model.ARTIFACT
            model_config={"engine": engine},
            signature=signature,
            input_example=input_example,
            pip_requirements=[f"torch=={_version('torch')}", f"numpy=={_version('numpy')}"],
        )
    return info.model_uri


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def register_model(
    client: MlflowClient, name: str, alias: str, model_uri: str, tags: Mapping[str, str], run_id: str | None
) -> str:
    """A new version of registered model `name` from model_uri, tagged, with `alias` moved to it."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="int8 models from the FX post-training quantization pipeline")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(
        name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, model_id=model_id
    )
    client.set_registered_model_alias(name, alias, version.version)
    log.info(
        "MLflow Model Registry: %s version %s, alias %s (models:/%s@%s)", name, version.version, alias, name, alias
    )
    return f"models:/{name}@{alias}"


def _make_sqlite_folder(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# Store creation under concurrent independent processes (issue 17). Self-contained: moves as a unit.

STORE_CREATION_ATTEMPTS = 5


def open_store(uri: str) -> MlflowClient:
    """A client whose store exists. MlflowClient creates (and migrates) a new SQLite store as it is
    built; here that happens under an exclusive file lock beside the store (`<file>.lock`), so processes
    started at once do not all run MLflow's migrations on the same new file (seen: `duplicate column
    name: step`, `table alembic_version already exists`). A creator that takes no lock (`mlflow ui`,
    another tool) can still win the race: then the half-made schema is retried until it settles.
    MLflow caches the store per URI in a process, so only a process's first call does any work."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)  # a server migrates its own store
    import fcntl

    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or when the holder dies
        try:
            for attempt in range(1, STORE_CREATION_ATTEMPTS + 1):
                try:
                    return MlflowClient(tracking_uri=uri)  # builds the store: creates or migrates the tables
                except Exception as error:  # sqlalchemy's, alembic's or mlflow's: told apart by the text
                    if attempt == STORE_CREATION_ATTEMPTS or not _lost_creation_race(error):
                        raise
                    log.info("MLflow store %s: another process was creating it (%s); retrying", uri, error)
                    time.sleep(0.5 * attempt)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    raise AssertionError("unreachable")


def _lost_creation_race(error: BaseException) -> bool:
    text = str(error).lower()
    signs = ("already exists", "duplicate column", "database is locked", "no such table", "expected to match one row")
    return any(sign in text for sign in signs)


def _now_ms() -> int:
    return int(time.time() * 1000)
