"""Start-up validation of a run's spec: the schema's pure checks, then those that need the engine or a
stage (supported engines, numeric-suite blockers, import paths, model and data factories). Raises
ConfigError before any work starts."""

from __future__ import annotations

import torch

from pipeline import schema
from pipeline.engine import get_engine
from pipeline.errors import ConfigError
from pipeline.schema import PipelineSpec
from stages.load import resolve_factory


def validate(spec: PipelineSpec) -> None:
    schema.check(spec)
    supported = [engine for engine in torch.backends.quantized.supported_engines if engine != "none"]
    if spec.backend.engine not in supported:
        raise ConfigError(
            f"backend.engine='{spec.backend.engine}' is not supported by this torch build on this CPU; "
            f"supported engines here are {supported}."
        )
    engine = get_engine()
    if spec.search.strategy != "none":
        blocker = engine.numerics_blocker(spec.custom_config)
        if blocker is not None:
            raise ConfigError(
                f"search.strategy='{spec.search.strategy}' ranks layers with torch's FX numeric suite, but {blocker}. "
                f"Use search.strategy=none and sweep skip-lists instead (python -m pipeline -m skip=...)."
            )
    # Names and import paths in the mappings and factories resolve now, not halfway through a run.
    engine.check(spec.backend, spec.qconfig_mapping, spec.skip, spec.custom_config)
    resolve_factory(spec.model.factory, "model.factory", spec.model.python_path)  # imports the user's module
    resolve_factory(spec.data.factory, "data.factory", spec.data.python_path)
