"""Stage `calibrate`: prepare_fx with the base mapping, backend config and custom prepare config,
then run the calibration batches through the observers.

Config keys read: backend.*, qconfig_mapping.*, custom_config.prepare, calibrate.max_batches.
"""

from __future__ import annotations

import logging

import torch

from pipeline.engine import UntraceableModule, get_engine
from pipeline.engine.qconfigs import import_path, quantized_engine
from pipeline.errors import ConfigError, error_summary
from pipeline.schema import BackendSpec, CalibrateSpec, CustomConfigSpec, QConfigMappingSpec
from stages.types import Calibrated, Loaded, progress

log = logging.getLogger(__name__)


def prepare(loaded: Loaded, backend: BackendSpec, mapping: QConfigMappingSpec, custom: CustomConfigSpec):
    """The prepared, not yet calibrated model (also how the cache rebuilds a calibrated one)."""
    engine = get_engine()
    try:
        prepared = engine.prepare(loaded.model, loaded.data.example_inputs, backend, mapping, custom)
    except Exception as error:
        untraceable = engine.untraceable_module(error)
        if untraceable is None:
            raise
        raise not_traceable_error(loaded.model_name, custom.name, untraceable) from error

    if mapping.clamp_bounded_activations:
        clamped = engine.clamp_bounded_activations(prepared, loaded.model, backend, custom)
        if clamped:
            log.info(
                "qconfig_mapping=%s: %d conv/linear outputs feed only ReLU6/hardtanh and observe the clipped range: %s",
                mapping.name,
                len(clamped),
                ", ".join(f"{name} [{low:g}, {high:g}]" for name, (low, high) in clamped.items()),
            )
        else:
            log.info(
                "qconfig_mapping=%s: clamp_bounded_activations is on, but no conv or linear of model=%s feeds only "
                "ReLU6/hardtanh; nothing clamped",
                mapping.name,
                loaded.model_name,
            )
    return prepared


def not_traceable_error(model_name: str, custom_name: str, failed: UntraceableModule) -> ConfigError:
    """Which module FX could not trace, and the custom_config setting that lets FX step around it."""
    cause = error_summary(failed.error, limit=None)
    path = import_path(failed.cls)
    if not failed.name:
        return ConfigError(
            f"prepare_fx cannot symbolically trace model={model_name}: its own top-level forward ({path}) raised "
            f"{cause}. FX records only code whose control flow does not depend on tensor values; move the "
            f"data-dependent part into a submodule and list that submodule in "
            f"custom_config.prepare.non_traceable_module_name (it then stays float), or quantize it as a custom "
            f"module (see README 'Custom modules')."
        )
    return ConfigError(
        f"prepare_fx cannot symbolically trace model={model_name} (custom_config={custom_name}): submodule "
        f"'{failed.name}' ({path}) raised {cause}. FX records only code whose control flow does not depend on "
        f"tensor values; let FX call that module as a leaf (it then stays float) with "
        f"`custom_config.prepare.non_traceable_module_name: [{failed.name}]` or "
        f"`custom_config.prepare.non_traceable_module_class: [{path}]`, or quantize it as a custom module with "
        f"custom_config.prepare.float_to_observed_custom_module_class (see README 'Custom modules')."
    )


def calibrate(
    loaded: Loaded,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    custom: CustomConfigSpec,
    spec: CalibrateSpec,
) -> Calibrated:
    prepared = prepare(loaded, backend, mapping, custom)
    batches = loaded.data.calibration[: spec.max_batches]
    with quantized_engine(backend.engine), torch.no_grad():
        for inputs, _ in progress(batches, len(batches), "calibrate", log):
            prepared(inputs)
    return Calibrated(
        model=prepared,
        num_batches=len(batches),
        num_samples=sum(int(inputs.shape[0]) for inputs, _ in batches),
    )
