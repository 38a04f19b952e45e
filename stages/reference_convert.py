"""Stage `reference_convert`: convert_to_reference_fx with the convert-time mapping (the base mapping
with the skip-list's entries set to None), keeping what the lowering needs.

Config keys read: backend.*, qconfig_mapping.*, skip.*, custom_config.convert, recovery.bias_correction*.
When the search ran, its winning skip-list (the `searched_skip` artifact) replaces skip.*. Bias
correction (recovery.bias_correction) shifts the reference model's biases here, before lowering, on the
calibration data.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline import metric_keys
from pipeline.engine import custom_modules, get_engine, steps
from pipeline.errors import ConfigError
from pipeline.schema import BackendSpec, CustomConfigSpec, EngineSpec, QConfigMappingSpec, RecoverySpec, SkipSpec
from stages.types import Calibrated, Loaded, ReferenceModel, StageContext, write_json

log = logging.getLogger(__name__)

NAME = "reference_convert"
CONSUMES = ("calibrated", "loaded")
USES = ("searched_skip",)
PRODUCES = ("reference",)
READS = ("engine", "backend", "qconfig_mapping", "skip", "custom_config", "recovery", "calibrate")
OPTIONAL = False


def reference_convert(
    calibrated: Calibrated,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    skip: SkipSpec,
    custom: CustomConfigSpec,
    recovery: RecoverySpec | None = None,
    calibration: list[Any] | None = None,
    flow: EngineSpec | None = None,
) -> ReferenceModel:
    """The reference model; with recovery.bias_correction and the calibration inputs, bias-corrected."""
    flow = flow or EngineSpec()
    engine = get_engine(flow)
    unmatched = engine.unmatched_skip_entries(calibrated.model, skip)
    if unmatched and skip.strict:
        raise ConfigError(f"skip={skip.name} (skip.strict=true): " + " ".join(unmatched))
    for problem in unmatched:
        log.warning("skip=%s: %s", skip.name, problem)
    conversion = steps.convert_reference(calibrated.model, backend, mapping, skip, custom, flow=flow)
    if conversion.left_float:
        log.info("skip=%s left %d nodes float: %s", skip.name, len(conversion.left_float), conversion.left_float)
    if recovery is not None and recovery.bias_correction and calibration:
        steps.correct_bias(conversion, calibrated.model, calibration, recovery, flow)
    return conversion


def compute(ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec
    skip = ctx.artifacts.get("searched_skip") or spec.skip
    loaded: Loaded = ctx.artifacts["loaded"]
    calibration = [inputs for inputs, _ in loaded.data.calibration[: spec.calibrate.max_batches]]
    reference = reference_convert(
        ctx.artifacts["calibrated"],
        spec.backend,
        spec.qconfig_mapping,
        skip,
        spec.custom_config,
        spec.recovery,
        calibration,
        spec.engine,
    )
    return {"reference": reference}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """reference_graph.py, convert_custom_config.yaml and left_float.json (the nodes the skip-list left float)."""
    out = ctx.out_dir
    reference: ReferenceModel = produced["reference"]
    (out / "reference_graph.py").write_text(reference.model.code)
    _, convert_custom_config = custom_modules.build_custom_configs(ctx.spec.custom_config)
    (out / "convert_custom_config.yaml").write_text(custom_modules.custom_config_yaml(convert_custom_config))
    write_json(out / "left_float.json", reference.left_float)
    return {metric_keys.LEFT_FLOAT_NODES: float(len(reference.left_float))}
