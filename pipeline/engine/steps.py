"""Engine steps the stages share, taking the config's specs: prepare (with the untraceable-module error
and the bounded-activation clamp), and reference-convert + lower with the nothing-quantized check. The
calibrate, inspect, reference_convert, lower and search stages call these, never each other."""

from __future__ import annotations

import logging

from torch import nn

from pipeline.batch import ModelInputs
from pipeline.engine import UntraceableModule, get_engine
from pipeline.engine.base import ReferenceConversion
from pipeline.engine.qconfigs import import_path
from pipeline.errors import ConfigError, error_summary
from pipeline.schema import BackendSpec, CustomConfigSpec, EngineSpec, QConfigMappingSpec, SkipSpec

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
    *,
    flow: EngineSpec,
    skip: SkipSpec | None = None,
) -> nn.Module:
    """The prepared, not yet calibrated model (also how the cache rebuilds a calibrated one). `flow` is the
    config's `engine` group; an engine that skips at prepare time (pt2e) gets `skip` folded into the mapping."""
    engine = get_engine(flow)
    if skip is not None and getattr(engine, "skips_at_prepare", False):
        from pipeline.engine.pt2e import with_skip

        mapping = with_skip(mapping, skip)
    try:
        prepared = engine.prepare(model, example_inputs, backend, mapping, custom)
    except Exception as error:
        untraceable = engine.untraceable_module(error)
        if untraceable is None:
            raise
        raise not_traceable_error(model_name, custom.name, untraceable) from error
    engine.check_custom_modules(prepared, example_inputs, custom, backend.engine)

    if mapping.clamp_bounded_activations:
        clamped = engine.clamp_bounded_activations(prepared, model, backend, custom)
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
                model_name,
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


def convert_reference(
    prepared: nn.Module,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    skip: SkipSpec,
    custom: CustomConfigSpec,
    *,
    flow: EngineSpec,
) -> ReferenceConversion:
    """The reference model with the skip-list's entries left float, plus what lowering needs."""
    return get_engine(flow).convert_reference(prepared, backend, mapping, skip, custom)


def lower(
    conversion: ReferenceConversion, backend: BackendSpec, example_inputs: ModelInputs, *, flow: EngineSpec
) -> tuple[nn.Module, dict[str, int]]:
    """The backend's int8 model and its op counts; NothingQuantizedError when every op stayed float."""
    engine = get_engine(flow)
    model = engine.lower(conversion.model, conversion.engine_state, backend.engine)
    counts = engine.count_nodes(model, example_inputs, backend.engine)
    if counts["quantized"] == 0:
        # BackendConfig silently ignores qconfigs it does not support, so this is the only signal.
        raise NothingQuantizedError(
            f"Nothing was quantized with backend.backend_config='{backend.backend_config}': every op stayed "
            f"float. Either the skip-list covers everything, or the mapping's qconfigs use dtypes or ranges "
            f"this BackendConfig does not support (e.g. qnnpack needs quint8 activations); try "
            f"qconfig_mapping=backend_default."
        )
    return model, counts
