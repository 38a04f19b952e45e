"""Start-up validation of a run's spec, before any work: the schema's pure checks, the engine's checks of
the backend, mappings, skip-list and custom modules (every name and import path resolves), then the
stage plan and each planned stage's own checks (pipeline/registry.py). Raises ConfigError."""

from __future__ import annotations

from types import ModuleType

import torch

from pipeline import checks, registry
from pipeline.engine import get_engine
from pipeline.engine.qconfigs import QCONFIG_LIBRARY
from pipeline.errors import ConfigError, closest
from pipeline.paths import use_python_path
from pipeline.schema import PipelineSpec


def validate(spec: PipelineSpec) -> list[ModuleType]:
    """Check everything a run needs and return its planned stages."""
    checks.check(spec)
    supported = [engine for engine in torch.backends.quantized.supported_engines if engine != "none"]
    if spec.backend.engine not in supported:
        raise ConfigError(
            f"backend.engine='{spec.backend.engine}' is not supported by this torch build on this CPU; "
            f"supported engines here are {supported}."
        )
    if spec.backend.default_qconfig not in QCONFIG_LIBRARY:  # before the mappings that resolve "default" to it
        raise ConfigError(
            f"backend.default_qconfig='{spec.backend.default_qconfig}' is not valid; choose one of the named qconfigs "
            f"{list(QCONFIG_LIBRARY)}.{closest(spec.backend.default_qconfig, list(QCONFIG_LIBRARY))}"
        )
    # custom_config's classes may live beside the model's factory: its python_path first (load does it again).
    use_python_path(list(spec.model.python_path), str(spec.model.factory.get("_target_", "")))
    get_engine(spec.engine).check(spec.backend, spec.qconfig_mapping, spec.skip, spec.custom_config)
    return registry.check(spec)
