"""Stage `calibrate`: prepare_fx with the base mapping, backend config and custom prepare config,
then run the calibration batches through the observers.

Config keys read: backend.*, qconfig_mapping.*, custom_config.prepare, calibrate.max_batches.
"""

from __future__ import annotations

import logging

import torch

from pipeline import quantization
from pipeline.schema import BackendSpec, CalibrateSpec, CustomConfigSpec, QConfigMappingSpec
from stages.types import Calibrated, Loaded, progress

log = logging.getLogger(__name__)


def prepare(loaded: Loaded, backend: BackendSpec, mapping: QConfigMappingSpec, custom: CustomConfigSpec):
    """The prepared, not yet calibrated model (also how the cache rebuilds a calibrated one)."""
    prepare_custom_config, _ = quantization.build_custom_configs(custom)
    with quantization.quantized_engine(backend.engine):
        prepared = quantization.prepare(
            loaded.model,
            quantization.build_qconfig_mapping(mapping, backend),
            loaded.data.example_inputs,
            quantization.get_backend_config(backend.backend_config),
            prepare_custom_config,
        )
    if mapping.clamp_bounded_activations:
        clamped = quantization.clamp_bounded_activation_observers(
            prepared, loaded.model, prepare_custom_config, backend.engine
        )
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


def calibrate(
    loaded: Loaded,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    custom: CustomConfigSpec,
    spec: CalibrateSpec,
) -> Calibrated:
    prepared = prepare(loaded, backend, mapping, custom)
    batches = loaded.data.calibration[: spec.max_batches]
    with quantization.quantized_engine(backend.engine), torch.no_grad():
        for inputs, _ in progress(batches, len(batches), "calibrate", log):
            prepared(inputs)
    return Calibrated(
        model=prepared,
        num_batches=len(batches),
        num_samples=sum(int(inputs.shape[0]) for inputs, _ in batches),
    )
