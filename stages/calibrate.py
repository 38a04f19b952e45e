"""Stage `calibrate`: prepare_fx with the base mapping, backend config and custom prepare config,
then run the calibration batches through the observers.

Config keys read: backend.*, qconfig_mapping.*, custom_config.prepare, calibrate.max_batches, cache.*,
recovery.* (those that act before calibration: activation_bits, bounded_activations, smoothquant_alpha).
With cache.enabled, a calibration whose key (weights, code, calibration data and settings) was seen
before is rebuilt from the cached observer state instead of run again. engine=pt2e applies the skip-list at
prepare time: its model is filled from the model calibrated without the skip-list (the entry under the key)
when every observer finds a source there, and is calibrated on its own otherwise (the log line says which
observer had none).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import metric_keys
from pipeline.cache import CalibrationCache, cache_key, skip_list_key
from pipeline.engine import custom_modules, get_engine, steps
from pipeline.engine.base import MissingObserverSource
from pipeline.engine.bias_correction import FloatMeansRecorder
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
    return observe(prepared, loaded, backend, spec, recovery, flow)


def observe(
    prepared: nn.Module,
    loaded: Loaded,
    backend: BackendSpec,
    spec: CalibrateSpec,
    recovery: RecoverySpec | None = None,
    flow: EngineSpec | None = None,
) -> Calibrated:
    """Run the calibration batches through a prepared model's observers. With recovery.bias_correction on
    FX, the conv/linear outputs' per-channel means on the first recovery.bias_correction_samples samples are
    recorded on the way (FloatMeansRecorder): bias correction then needs no float pass of its own."""
    batches = loaded.data.calibration[: spec.max_batches]
    records = recovery is not None and recovery.bias_correction and (flow or EngineSpec()).name == "fx"
    recorder = FloatMeansRecorder(prepared, recovery.bias_correction_samples) if records and recovery else None
    try:
        with quantized_engine(backend.engine), torch.no_grad():
            for inputs, _ in progress(batches, len(batches), "calibrate", log):
                if recorder is not None:
                    recorder.batch(inputs)
                inputs.call(prepared)
        if recorder is not None:
            recorder.keep()
    finally:
        if recorder is not None:
            recorder.close()
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
    if _skips_at_prepare(spec):
        served = _serve_skip_list(spec, loaded, cache, key, ctx)
        if served is not None:
            return served
        key = skip_list_key(key, spec.skip)  # this skip-list's model is calibrated (and cached) on its own
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


def _skips_at_prepare(spec: PipelineSpec) -> bool:
    """A skip-list with entries on an engine that applies it at prepare time (pt2e)."""
    skip = spec.skip
    entries = skip.object_type or skip.module_name_regex or skip.module_name or skip.module_name_object_type_order
    return bool(entries) and getattr(get_engine(spec.engine), "skips_at_prepare", False)


def _serve_skip_list(
    spec: PipelineSpec, loaded: Loaded, cache: CalibrationCache, key: str, ctx: StageContext | None
) -> Calibrated | None:
    """engine=pt2e: the skip-list's model with every observer filled, by the tensors it observes, from the
    model calibrated without the skip-list (the entry under `key`, calibrated and stored here on a miss). None
    when some observer has no source there (logged): the caller calibrates the skip-list's model itself."""
    engine = get_engine(spec.engine)
    batches = loaded.data.calibration[: spec.calibrate.max_batches]
    settings = (spec.backend, spec.qconfig_mapping, spec.custom_config, spec.recovery, spec.calibrate.max_batches)

    def with_skip() -> nn.Module:
        return prepare(loaded, *settings, spec.engine, spec.skip)

    with cache.lock(key):
        try:
            cached = cache.load(key, with_skip)
        except MissingObserverSource as missing:
            _log_unserved(spec, key, missing.lines)
            return None
        if cached is not None:
            log.info(
                "calibrate: cache hit %s (cache.dir=%s), the calibration without the skip-list: skip=%s's observers "
                "filled from it by the tensors they observe; no calibration batches run",
                key,
                spec.cache.dir,
                spec.skip.name,
            )
            return Calibrated(cached, len(batches), batches.num_samples, True, key)
        prepared = with_skip()
        base = prepare(loaded, *settings, spec.engine)
        # Checked before calibrating: a skip-list it cannot serve would pay for two calibrations.
        missing_sources = engine.missing_observer_sources(prepared, engine.observer_state(base))
        if missing_sources:
            _log_unserved(spec, key, missing_sources)
            return None
        calibrated = observe(base, loaded, spec.backend, spec.calibrate)
        if ctx is not None:
            ctx.check_stop()  # a swallowed signal must not leave an entry that a later run trusts
        details = {"batches": calibrated.num_batches, "backend": spec.backend.engine, "engine": spec.engine.name}
        entry = cache.store(key, base, details)
        engine.load_observer_state(prepared, engine.observer_state(base))
        log.info(
            "calibrate: the model without the skip-list calibrated and cached as %s; skip=%s's observers filled "
            "from it by the tensors they observe",
            entry,
            spec.skip.name,
        )
        return Calibrated(prepared, calibrated.num_batches, calibrated.num_samples, False, key)


def _log_unserved(spec: PipelineSpec, key: str, lines: list[str]) -> None:
    log.info(
        "calibrate: skip=%s cannot reuse the calibration without the skip-list (engine=%s, cache key %s): %s. An "
        "observer's state is copied only from one that observed exactly the same tensors, and leaving a layer float "
        "can split an observer the model without the skip-list shares (x86 shares one across relu -> avgpool -> "
        "flatten); calibrating skip=%s on its own (cache key %s)",
        spec.skip.name,
        spec.engine.name,
        key,
        "; ".join(lines),
        spec.skip.name,
        skip_list_key(key, spec.skip),
    )


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
