"""Stage `reference_convert`: convert_to_reference_fx with the convert-time mapping (the base mapping
with the skip-list's entries set to None), keeping what the lowering needs.

Config keys read: backend.*, qconfig_mapping.*, skip.*, custom_config.convert.
"""

from __future__ import annotations

import logging

from pipeline.engine import get_engine
from pipeline.errors import ConfigError
from pipeline.schema import BackendSpec, CustomConfigSpec, QConfigMappingSpec, SkipSpec
from stages.types import Calibrated, ReferenceModel

log = logging.getLogger(__name__)


def reference_convert(
    calibrated: Calibrated,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    skip: SkipSpec,
    custom: CustomConfigSpec,
) -> ReferenceModel:
    engine = get_engine()
    unmatched = engine.unmatched_skip_entries(calibrated.model, skip)
    if unmatched and skip.strict:
        raise ConfigError(f"skip={skip.name} (skip.strict=true): " + " ".join(unmatched))
    for problem in unmatched:
        log.warning("skip=%s: %s", skip.name, problem)
    conversion = engine.convert_reference(calibrated.model, backend, mapping, skip, custom)
    if conversion.left_float:
        log.info("skip=%s left %d nodes float: %s", skip.name, len(conversion.left_float), conversion.left_float)
    return ReferenceModel(
        model=conversion.model,
        engine_state=conversion.engine_state,
        left_float=conversion.left_float,
    )
