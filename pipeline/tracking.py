"""MLflow tracking: one run per pipeline run, params from the resolved config, metrics per stage,
artifacts from the run directory, and an end status that is never left RUNNING.

Uses MlflowClient with explicit run ids rather than mlflow's fluent global run, because a sweep
runs many jobs in one process (Hydra's basic launcher) and nested runs must not leak between them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# mlflow configures its own logger (which then bypasses Hydra's job log) unless told not to.
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH  # noqa: E402

from pipeline.schema import TrackingSpec  # noqa: E402

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


def artifact_uri(location: str) -> str:
    """A local folder as an absolute file URI (a relative one would follow the process's cwd)."""
    if "://" in location:
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
        _make_sqlite_folder(self.spec.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.spec.tracking_uri)
        experiment_id = ensure_experiment(self.client, self.spec)
        all_tags = dict(tags)
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
