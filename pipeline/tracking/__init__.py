"""Experiment tracking behind one Protocol: `make_tracker(spec)` gives the MLflow tracker
(tracking/mlflow.py) when tracking.enabled, else the no-op one (tracking/off.py). background.py
opens a run's store on a worker thread while the stages start; sweep.py holds the
Hydra sweep callback and the comparison report; cli.py the `python -m pipeline.tracking` commands.

Imports only pipeline.schema / pipeline.errors below it: never the runner, the stages or the engine.
"""

from pipeline.schema import TrackingSpec
from pipeline.tracking.base import RunRecord, Tracker, run_tags
from pipeline.tracking.off import NoopTracker


def make_tracker(spec: TrackingSpec, background: bool = False) -> Tracker:
    """The MLflow tracker when spec.enabled, else the no-op one (and mlflow is not imported). With
    `background`, mlflow is imported, the store opened and the calls that return nothing made on a
    worker thread (tracking/background.py): a run's stages start while that happens."""
    if spec.enabled and background:
        from pipeline.tracking.background import BackgroundTracker

        return BackgroundTracker(spec)
    if spec.enabled:
        from pipeline.tracking.mlflow import MlflowTracker

        return MlflowTracker(spec)
    return NoopTracker()


__all__ = ["RunRecord", "Tracker", "make_tracker", "run_tags"]
