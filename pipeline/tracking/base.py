"""What the runner, the search and the sweep callback need from experiment tracking, as a Protocol,
and the one place that picks the implementation: MLflow when tracking.enabled, else a no-op.

Importing this module does not import mlflow; make_tracker does, only when tracking is on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pipeline.errors import ConfigError
from pipeline.machine import machine_tags
from pipeline.schema import PipelineSpec, TrackingSpec, is_tracking_server


@dataclass(frozen=True)
class RunRecord:
    """A finished (or failed) run as read back from the store: what a sweep report shows per job."""

    name: str
    status: str  # FINISHED, FAILED, KILLED or RUNNING
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    run_id: str | None = None


@runtime_checkable
class Tracker(Protocol):
    """One tracked run. Every method is safe to call on a tracker that tracks nothing."""

    @property
    def run_id(self) -> str | None:
        """The store's id of the open run; None before start, after end, or when nothing is tracked."""
        ...

    @property
    def last_run_id(self) -> str | None:
        """The id of the run this tracker opened, also after end (None when nothing is tracked)."""
        ...

    @property
    def experiment_id(self) -> str | None:
        """The experiment the run is in (None when nothing is tracked)."""
        ...

    def start(
        self,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        run_name: str | None = None,
    ) -> None:
        """Open the run (nested under parent_run_id if given). params may be nested (a resolved config);
        the implementation flattens it. Fails fast (ConfigError) when the store does not answer."""
        ...

    def child(self, params: Mapping[str, Any], tags: Mapping[str, str], run_name: str | None = None) -> Tracker:
        """A new run, started, nested under this one (a search trial)."""
        ...

    def children(self) -> list[RunRecord]:
        """The runs nested under this one, as the store has them (a sweep's jobs)."""
        ...

    def log_metrics(self, metrics: Mapping[str, float]) -> None: ...

    def log_artifacts(self, local_path: Path, artifact_path: str | None = None) -> None:
        """A file or a folder's contents, under artifact_path; a path that does not exist is skipped."""
        ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_params(self, params: Mapping[str, str]) -> None:
        """More params on the open run (a param, once logged, cannot change)."""
        ...

    def log_dataset(self, name: str, digest: str, source: str, profile: Mapping[str, Any], context: str) -> None:
        """The run's data as a dataset input: its name, digest, source and sizes."""
        ...

    def log_model(
        self, torchscript: Path, engine: str, example: Sequence[Any], output: Any
    ) -> Callable[[], str | None]:
        """The exported int8 TorchScript file as a loadable model of this run. Returns a function giving its
        URI (or None): a tracker that logs in the background returns at once, and the function waits for the
        logging and raises its error."""
        ...

    def register_model(self, model_uri: str, tags: Mapping[str, str], run_id: str | None = None) -> str | None:
        """model_uri into the Model Registry under tracking.register (None: not registered)."""
        ...

    def share_view(self, key: str, search_filter: str = "") -> str | None:
        """A saved view of the experiment's run list (headline columns, runs matching search_filter)."""
        ...

    def synchronous(self, on: bool = True) -> None:
        """on: return once every call made so far is recorded, and from then on record each call before it
        returns (a stage that times models runs with no tracking work beside it); off: queue calls again.
        A no-op for a tracker that records as it is called."""
        ...

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED; safe to call twice."""
        ...


def run_tags(spec: PipelineSpec) -> dict[str, str]:
    """The tags every pipeline run gets, to filter and compare runs by what they ran and on which CPU
    (pipeline.machine: cpu.model, cpu.capability, cpu.vnni, cpu.avx512, cpu.amx, torch.version)."""
    return {
        "engine": spec.engine.name,  # fx or pt2e: which quantization flow ran
        "backend": spec.backend.engine,
        "qconfig_mapping": spec.qconfig_mapping.name,
        "skip": spec.skip.name,
        "model": spec.model.name,
        "data": spec.data.name,
        "custom_config": spec.custom_config.name,
        "weights": "trained" if spec.model.trained else "random",
        **machine_tags(),
    }


def require_server(spec: TrackingSpec) -> None:
    """A ConfigError when tracking.tracking_uri is a server that does not answer: mlflow itself would retry
    for minutes, then lose the run's results at the first log call. Imports requests, not mlflow."""
    uri = spec.tracking_uri
    if not is_tracking_server(uri):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as error:
        raise ConfigError(
            f"tracking.tracking_uri='{uri}' does not answer ({type(error).__name__}). Start the MLflow "
            f"server, use the local SQLite store (tracking=sqlite), or run offline with tracking=offline "
            f"and log the run later with `python -m pipeline.tracking sync <run dir> --tracking-uri {uri}`."
        ) from None
