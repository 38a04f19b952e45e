"""The tracker for tracking=off and tracking=offline: records nothing, touches no store; the run
directory still has everything (and `python -m pipeline.tracking sync` can log it later)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.tracking.base import RunRecord


class NoopTracker:
    """Implements pipeline.tracking.base.Tracker by doing nothing."""

    run_id: str | None = None
    last_run_id: str | None = None
    experiment_id: str | None = None

    def start(
        self,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        run_name: str | None = None,
    ) -> None:
        pass

    def child(self, params: Mapping[str, Any], tags: Mapping[str, str], run_name: str | None = None) -> NoopTracker:
        return NoopTracker()

    def children(self) -> list[RunRecord]:
        return []

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        pass

    def log_artifacts(self, local_path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_params(self, params: Mapping[str, str]) -> None:
        pass

    def log_dataset(self, name: str, digest: str, source: str, profile: Mapping[str, Any], context: str) -> None:
        pass

    def log_model(
        self, torchscript: Path, engine: str, example: Sequence[Any], output: Any
    ) -> Callable[[], str | None]:
        return lambda: None

    def register_model(self, model_uri: str, tags: Mapping[str, str], run_id: str | None = None) -> str | None:
        return None

    def share_view(self, key: str, search_filter: str = "") -> str | None:
        return None

    def synchronous(self, on: bool = True) -> None:
        pass

    def end(self, status: str) -> None:
        pass
