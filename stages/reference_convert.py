"""Stage `reference_convert`: convert_to_reference_fx with the convert-time mapping (the base mapping
with the skip-list's entries set to None), keeping what the lowering needs.

Config keys read: backend.*, qconfig_mapping.*, skip.*, custom_config.convert.
"""

from __future__ import annotations

import logging

from pipeline import quantization
from pipeline.schema import BackendSpec, ConfigError, CustomConfigSpec, QConfigMappingSpec, SkipSpec
from stages.types import Calibrated, ReferenceModel

log = logging.getLogger(__name__)


def reference_convert(
    calibrated: Calibrated,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    skip: SkipSpec,
    custom: CustomConfigSpec,
) -> ReferenceModel:
    unmatched = quantization.unmatched_skip_entries(calibrated.model, skip)
    if unmatched and skip.strict:
        raise ConfigError(f"skip={skip.name} (skip.strict=true): " + " ".join(unmatched))
    for problem in unmatched:
        log.warning("skip=%s: %s", skip.name, problem)
    _, convert_custom_config = quantization.build_custom_configs(custom)
    with quantization.quantized_engine(backend.engine):
        conversion = quantization.convert_reference(
            calibrated.model,
            quantization.build_convert_mapping(mapping, skip, backend, calibrated.model),
            quantization.get_backend_config(backend.backend_config),
            convert_custom_config,
        )
    if conversion.left_float:
        log.info("skip=%s left %d nodes float: %s", skip.name, len(conversion.left_float), conversion.left_float)
    return ReferenceModel(
        model=conversion.model,
        node_name_to_qconfig=conversion.node_name_to_qconfig,
        node_name_to_scope=conversion.node_name_to_scope,
        left_float=conversion.left_float,
    )
