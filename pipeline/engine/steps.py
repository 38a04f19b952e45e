"""Engine steps the stages share, taking the config's specs: prepare (with the untraceable-module error,
the recovery options that act before calibration: SmoothQuant, activation bits, the bounded-activation
clamp), reference-convert, bias correction, and lower with the nothing-quantized check. The calibrate,
inspect, reference_convert, lower and search stages call these, never each other."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pipeline.batch import ModelInputs
from pipeline.engine import UntraceableModule, get_engine, introspect
from pipeline.engine import recovery as recovery_options
from pipeline.engine.base import ReferenceConversion
from pipeline.engine.qconfigs import import_path, quantized_engine
from pipeline.errors import ConfigError, error_summary
from pipeline.schema import BackendSpec, CustomConfigSpec, EngineSpec, QConfigMappingSpec, RecoverySpec, SkipSpec

log = logging.getLogger(__name__)


class NothingQuantizedError(RuntimeError):
    """The lowered model runs no int8 op: the mapping, skip-list and backend config left all float."""


def prepare(
    model: nn.Module,
    example_inputs: ModelInputs,
    model_name: str,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    custom: CustomConfigSpec,
    recovery: RecoverySpec | None = None,
    calibration: list[Any] | None = None,
    *,
    flow: EngineSpec | None = None,
    skip: SkipSpec | None = None,
) -> nn.Module:
    """The prepared, not yet calibrated model (also how the cache rebuilds a calibrated one). With `recovery`:
    SmoothQuant on a copy of the float model first (it needs `calibration`, the calibration batches'
    inputs), the activation bit width, and the bounded-activation clamp where recovery turns it on. `flow` is
    the config's `engine` group (None: FX); an engine that skips at prepare time (pt2e) gets `skip` folded
    into the mapping."""
    flow = flow or EngineSpec()
    engine = get_engine(flow)
    if skip is not None and getattr(engine, "skips_at_prepare", False):
        from pipeline.engine.pt2e_quantizers import with_skip

        mapping = with_skip(mapping, skip)
    if recovery is not None and recovery.smoothquant_alpha > 0 and calibration:
        model = smooth(model, calibration, recovery.smoothquant_alpha, model_name, custom, flow)
    try:
        prepared = engine.prepare(model, example_inputs, backend, mapping, custom, recovery)
    except Exception as error:
        untraceable = engine.untraceable_module(error)
        if untraceable is None:
            raise
        raise not_traceable_error(model_name, custom.name, untraceable) from error
    engine.check_custom_modules(prepared, example_inputs, custom, backend.engine)

    by_recovery = recovery_options.clamps_bounded(recovery, backend.engine)
    if mapping.clamp_bounded_activations or by_recovery:
        source = (
            f"qconfig_mapping={mapping.name}" if mapping.clamp_bounded_activations else "recovery.bounded_activations"
        )
        clamped = engine.clamp_bounded_activations(prepared, model, backend, custom)
        if clamped:
            log.info(
                "%s: %d conv/linear outputs feed only ReLU6/hardtanh and observe the clipped range: %s",
                source,
                len(clamped),
                ", ".join(f"{name} [{low:g}, {high:g}]" for name, (low, high) in clamped.items()),
            )
        elif mapping.clamp_bounded_activations:
            log.info(
                "qconfig_mapping=%s: clamp_bounded_activations is on, but no conv or linear of model=%s feeds only "
                "ReLU6/hardtanh; nothing clamped",
                mapping.name,
                model_name,
            )
    return prepared


def recalibrate(
    model: nn.Module,
    example_inputs: ModelInputs,
    model_name: str,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    custom: CustomConfigSpec,
    recovery: RecoverySpec | None,
    calibration: list[Any],
    *,
    flow: EngineSpec | None = None,
    skip: SkipSpec | None = None,
) -> nn.Module:
    """`prepare`, then the calibration inputs through it: a calibration with other settings than the run's
    (the search's recovery phase; diagnose verifying a recovery option, or a pt2e skip-list)."""
    prepared = prepare(
        model, example_inputs, model_name, backend, mapping, custom, recovery, calibration, flow=flow, skip=skip
    )
    with quantized_engine(backend.engine), torch.no_grad():
        for inputs in calibration:
            ModelInputs.wrap(inputs).call(prepared)
    return prepared


def smooth(
    model: nn.Module,
    calibration: list[Any],
    alpha: float,
    model_name: str,
    custom: CustomConfigSpec,
    flow: EngineSpec | None = None,
) -> nn.Module:
    """SmoothQuant on a copy of the float model (recovery.smoothquant_alpha), logged."""
    smoothed, report = get_engine(flow or EngineSpec()).smooth_quant(model, calibration, alpha, custom)
    if report:
        log.info(
            "recovery.smoothquant_alpha=%g: %d activations smoothed into the Linears they feed (largest scale per "
            "producer: %s)",
            alpha,
            len(report),
            ", ".join(f"{name} {scale:.3g}" for name, scale in report.items()),
        )
    else:
        log.info(
            "recovery.smoothquant_alpha=%g: no Linear of model=%s is fed by a LayerNorm or Linear alone; nothing "
            "smoothed",
            alpha,
            model_name,
        )
    return smoothed


def activation_settings(recovery: RecoverySpec, backend: BackendSpec, mapping: QConfigMappingSpec) -> dict[str, str]:
    """What recovery resolved to for this backend and CPU, as run tags (auto choices made explicit)."""
    bits = recovery_options.activation_bits(recovery, backend.engine)
    clamp = mapping.clamp_bounded_activations or recovery_options.clamps_bounded(recovery, backend.engine)
    return {
        "recovery.activation_bits": str(bits),
        "recovery.bounded_activations": "on" if clamp else "off",
        "cpu_vnni": str(recovery_options.has_vnni()).lower(),
    }


def correct_bias(
    conversion: ReferenceConversion,
    prepared: nn.Module,
    calibration: list[Any],
    recovery: RecoverySpec,
    flow: EngineSpec | None = None,
) -> dict[str, float]:
    """recovery.bias_correction on the reference model, in place, before lowering; logged."""
    shifts = get_engine(flow or EngineSpec()).correct_bias(
        conversion, prepared, calibration, recovery.bias_correction_samples, recovery.bias_correction_method
    )
    if shifts:
        worst = max(shifts, key=shifts.__getitem__)
        log.info(
            "recovery.bias_correction: %d layers' biases corrected on %d calibration samples (largest mean shift "
            "%.3g at %s)",
            len(shifts),
            min(recovery.bias_correction_samples, sum(_batch_size(b) for b in calibration)),
            shifts[worst],
            worst,
        )
    return shifts


def _batch_size(batch: Any) -> int:
    return ModelInputs.wrap(batch).batch_size


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


def convert_reference(
    prepared: nn.Module,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    skip: SkipSpec,
    custom: CustomConfigSpec,
    *,
    flow: EngineSpec | None = None,
) -> ReferenceConversion:
    """The reference model with the skip-list's entries left float, plus what lowering needs."""
    return get_engine(flow or EngineSpec()).convert_reference(prepared, backend, mapping, skip, custom)


def lower(
    conversion: ReferenceConversion,
    backend: BackendSpec,
    example_inputs: ModelInputs,
    *,
    flow: EngineSpec | None = None,
) -> tuple[nn.Module, dict[str, int]]:
    """The backend's int8 model and its op counts; NothingQuantizedError when every op stayed float."""
    model, counts, _ = lower_with_report(conversion, backend, example_inputs, flow=flow)
    return model, counts


def lower_with_report(
    conversion: ReferenceConversion,
    backend: BackendSpec,
    example_inputs: ModelInputs,
    *,
    flow: EngineSpec | None = None,
) -> tuple[nn.Module, dict[str, int], list[str]]:
    """lower, plus one line per mapping entry the backend ignored: every node it gave a qconfig to
    stayed float (BackendConfig silently drops qconfigs with dtypes it has no config for)."""
    engine = get_engine(flow or EngineSpec())
    model = engine.lower(conversion.model, conversion.engine_state, backend.engine)
    kinds = engine.node_kinds(model, example_inputs, backend.engine)
    counts = {"quantized": 0, "float": 0, "quantize_dequantize": 0}
    for kind in kinds.values():
        counts[kind] += 1
    ignored = introspect.ignored_entries(conversion.mapping_entry_nodes, kinds)
    if counts["quantized"] == 0:
        # BackendConfig silently ignores qconfigs it does not support, so this is the only signal.
        raise NothingQuantizedError(
            f"Nothing was quantized with backend.backend_config='{backend.backend_config}': every op stayed "
            f"float. Either the skip-list covers everything, or the mapping's qconfigs use dtypes or ranges "
            f"this BackendConfig does not support (e.g. qnnpack needs quint8 activations); try "
            f"qconfig_mapping=backend_default." + "".join(f" {line}" for line in ignored)
        )
    return model, counts, ignored
