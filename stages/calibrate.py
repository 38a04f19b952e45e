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
        return quantization.prepare(
            loaded.model,
            quantization.build_qconfig_mapping(mapping, backend),
            loaded.data.example_inputs,
            quantization.get_backend_config(backend.backend_config),
            prepare_custom_config,
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
    with quantization.quantized_engine(backend.engine), torch.no_grad():
        for inputs, _ in progress(batches, len(batches), "calibrate", log):
            prepared(inputs)
    return Calibrated(
        model=prepared,
        num_batches=len(batches),
        num_samples=sum(int(inputs.shape[0]) for inputs, _ in batches),
    )
