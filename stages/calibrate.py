"""Stage `calibrate`: prepare_fx with the base mapping, backend config and custom prepare config,
then run the calibration batches through the observers.

Config keys read: backend.*, qconfig_mapping.*, custom_config.prepare, calibrate.max_batches, cache.*,
recovery.* (those that act before calibration: activation_bits, bounded_activations, smoothquant_alpha).
With cache.enabled, a calibration whose key (weights, code, calibration data and settings) was seen
before is rebuilt from the cached observer state instead of run again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import metric_keys
from pipeline.cache import CalibrationCache, cache_key
from pipeline.engine import custom_modules, get_engine, steps
from pipeline.engine.qconfigs import quantized_engine
from pipeline.progress import progress
from pipeline.schema import (
    BackendSpec,
    CalibrateSpec,
    CustomConfigSpec,
    EngineSpec,
    PipelineSpec,
    QConfigMappingSpec,
    RecoverySpec,
    SkipSpec,
)
from stages.types import Calibrated, Loaded, StageContext

log = logging.getLogger(__name__)

NAME = "calibrate"
CONSUMES = ("loaded",)
USES: tuple[str, ...] = ()
PRODUCES = ("calibrated",)
READS = ("engine", "backend", "qconfig_mapping", "skip", "custom_config", "calibrate", "cache", "recovery")
OPTIONAL = False


def prepare(
    loaded: Loaded,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    custom: CustomConfigSpec,
    recovery: RecoverySpec | None = None,
    max_batches: int | None = None,
    flow: EngineSpec | None = None,
    skip: SkipSpec | None = None,
) -> nn.Module:
    """The prepared, not yet calibrated model of `loaded` (also how the cache rebuilds a calibrated one).
    `flow` is the engine group (None: FX); pt2e applies `skip` here, at prepare time."""
    calibration = [inputs for inputs, _ in loaded.data.calibration[:max_batches]]
    return steps.prepare(
        loaded.model,
        loaded.data.example_inputs,
        loaded.model_name,
        backend,
        mapping,
        custom,
        recovery,
        calibration,
        flow=flow,
        skip=skip,
    )


def calibrate(
    loaded: Loaded,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    custom: CustomConfigSpec,
    spec: CalibrateSpec,
    recovery: RecoverySpec | None = None,
    flow: EngineSpec | None = None,
    skip: SkipSpec | None = None,
) -> Calibrated:
    prepared = prepare(loaded, backend, mapping, custom, recovery, spec.max_batches, flow, skip)
    batches = loaded.data.calibration[: spec.max_batches]
    with quantized_engine(backend.engine), torch.no_grad():
        for inputs, _ in progress(batches, len(batches), "calibrate", log):
            inputs.call(prepared)
    return Calibrated(
        model=prepared,
        num_batches=len(batches),
        num_samples=batches.num_samples,
    )


def check(spec: PipelineSpec) -> None:
    """Warn (not fail) where the backend is known to lose accuracy on this CPU."""
    if spec.backend.engine == "onednn" and not torch.cpu._is_vnni_supported():
        log.warning(
            "backend=onednn on a CPU without VNNI: onednn's default qconfig uses full 8-bit activations, which "
            "these CPUs compute with possible overflow, so accuracy may drop (pytorch#103646); backend=x86 or "
            "fbgemm use 7-bit activations and are exact here."
        )


def calibrate_or_load(spec: PipelineSpec, loaded: Loaded, ctx: StageContext | None = None) -> Calibrated:
    """Calibrate, or rebuild the calibrated model from the cache when its key has an entry."""
    run = (
        spec.backend,
        spec.qconfig_mapping,
        spec.custom_config,
        spec.calibrate,
        spec.recovery,
        spec.engine,
        spec.skip,
    )
    if not spec.cache.enabled:
        return calibrate(loaded, *run)
    cache = CalibrationCache(Path(spec.cache.dir), spec.engine)
    batches = loaded.data.calibration[: spec.calibrate.max_batches]
    key = cache_key(spec, loaded.model, (inputs for inputs, _ in batches))
    with cache.lock(key):
        cached = cache.load(
            key,
            lambda: prepare(
                loaded,
                spec.backend,
                spec.qconfig_mapping,
                spec.custom_config,
                spec.recovery,
                spec.calibrate.max_batches,
                spec.engine,
                spec.skip,
            ),
        )
        if cached is not None:
            log.info("calibrate: cache hit %s (cache.dir=%s): no calibration batches run", key, spec.cache.dir)
            return Calibrated(cached, len(batches), batches.num_samples, True, key)
        calibrated = calibrate(loaded, *run)
        if ctx is not None:
            ctx.check_stop()  # a swallowed signal must not leave an entry that a later run trusts
        details = {"batches": calibrated.num_batches, "backend": spec.backend.engine, "engine": spec.engine.name}
        entry = cache.store(key, calibrated.model, details)
        log.info("calibrate: cached as %s", entry)
        return Calibrated(calibrated.model, calibrated.num_batches, calibrated.num_samples, False, key)


def compute(ctx: StageContext) -> dict[str, Any]:
    return {"calibrated": calibrate_or_load(ctx.spec, ctx.artifacts["loaded"], ctx)}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """prepared_graph.py, prepare_custom_config.yaml and observer_state.pt (what can be saved of a
    prepared model: the module itself cannot be pickled)."""
    out = ctx.out_dir
    calibrated: Calibrated = produced["calibrated"]
    (out / "prepared_graph.py").write_text(calibrated.model.code)
    prepare_custom_config, _ = custom_modules.build_custom_configs(ctx.spec.custom_config)
    (out / "prepare_custom_config.yaml").write_text(custom_modules.custom_config_yaml(prepare_custom_config))
    torch.save(get_engine(ctx.spec.engine).observer_state(calibrated.model), out / "observer_state.pt")
    ctx.set_tags({"cache_key": calibrated.cache_key or "disabled", "cache_hit": str(calibrated.cache_hit).lower()})
    spec = ctx.spec
    ctx.set_tags(steps.activation_settings(spec.recovery, spec.backend, spec.qconfig_mapping))
    return {
        metric_keys.CALIBRATIONS: 0.0 if calibrated.cache_hit else 1.0,  # a sweep or search sums them
        metric_keys.CACHE_HIT: float(calibrated.cache_hit),
        metric_keys.CALIBRATE_BATCHES: float(calibrated.num_batches),
        metric_keys.CALIBRATE_SAMPLES: float(calibrated.num_samples),
    }
