"""pipeline/engine (FX): mappings from YAML, skip-lists at convert time, and the two-stage
reference-convert + lower being the very model convert_fx builds."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from pipeline.engine import custom_modules, fx, fx_results, mappings, qconfigs
from pipeline.errors import ConfigError
from pipeline.schema import (
    BackendSpec,
    CustomConfigSpec,
    ModuleNameEntry,
    ModuleNameObjectTypeOrderEntry,
    ModuleNameRegexEntry,
    ObjectTypeEntry,
    QConfigMappingSpec,
    SkipSpec,
)
from stages.sources.digits import digits_cnn, digits_data

MAPPING = QConfigMappingSpec(name="backend_default")
BACKENDS = {
    "fbgemm": BackendSpec(engine="fbgemm", backend_config="fbgemm"),
    "x86": BackendSpec(engine="x86", backend_config="x86"),
    "qnnpack": BackendSpec(engine="qnnpack", backend_config="qnnpack"),
    "onednn": BackendSpec(engine="onednn", backend_config="onednn"),
}
SKIPS = {
    "none": SkipSpec(name="none"),
    "add": SkipSpec(name="add", object_type=["operator.add", "torch.add"]),
    "conv": SkipSpec(name="conv", object_type=["torch.nn.Conv2d"]),
    "first_last": SkipSpec(name="first_last", module_name=["stem.0", "fc"]),
}


@pytest.fixture(scope="module")
def digits():
    return digits_cnn(), digits_data(batch_size=64)


def _calibrated(model, data, backend: BackendSpec):
    prepare_config, _ = custom_modules.build_custom_configs(CustomConfigSpec())
    with qconfigs.quantized_engine(backend.engine), torch.no_grad():
        prepared = fx.prepare(
            model,
            mappings.build_qconfig_mapping(MAPPING, backend),
            data.example_inputs,
            qconfigs.get_backend_config(backend.backend_config),
            prepare_config,
        )
        for inputs, _ in data.calibration:
            inputs.call(prepared)
    return prepared


def _module_types(model: nn.Module) -> dict[str, str]:
    # GraphModule makes a class per instance, so compare class names, not class objects.
    return {name: f"{type(m).__module__}.{type(m).__qualname__}" for name, m in model.named_modules()}


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(BACKENDS))
def test_reference_then_lower_equals_convert_fx(digits, engine: str) -> None:
    model, data = digits
    backend = BACKENDS[engine]
    prepared = _calibrated(model, data, backend)
    _, convert_config = custom_modules.build_custom_configs(CustomConfigSpec())
    backend_config = qconfigs.get_backend_config(backend.backend_config)
    inputs = torch.cat([x.args[0] for x, _ in data.evaluation])
    for skip in SKIPS.values():
        conversion = fx.convert_reference(
            prepared,
            mappings.build_convert_mapping(MAPPING, skip, backend, prepared),
            backend_config,
            convert_config,
        )
        two_stage = fx.lower(conversion.model, conversion.engine_state, engine)
        one_step = fx.convert_in_one_step(
            prepared,
            mappings.build_convert_mapping(MAPPING, skip, backend, prepared),
            backend_config,
            convert_config,
            engine,
        )
        assert two_stage.code == one_step.code, f"{engine}/{skip.name}: generated code differs"
        # Same submodules at the same paths (their registration order may differ).
        assert _module_types(two_stage) == _module_types(one_step)
        with qconfigs.quantized_engine(engine), torch.no_grad():
            assert torch.equal(two_stage(inputs), one_step(inputs)), f"{engine}/{skip.name}: outputs differ"


def test_prepared_model_serves_many_skip_lists_without_being_consumed(digits) -> None:
    model, data = digits
    backend = BACKENDS["x86"]
    prepared = _calibrated(model, data, backend)
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    backend_config = qconfigs.get_backend_config("x86")
    _, convert_config = custom_modules.build_custom_configs(CustomConfigSpec())
    left = {}
    for name, skip in SKIPS.items():
        mapping = mappings.build_convert_mapping(MAPPING, skip, backend, prepared)
        left[name] = fx.convert_reference(prepared, mapping, backend_config, convert_config).left_float
    assert left["none"] == []
    assert set(left["add"]) == {"add", "add_1"}
    assert set(left["first_last"]) == {"stem_0", "fc"}
    # Every conv (fused with relu or not) is left float when nn.Conv2d is skipped.
    assert len(left["conv"]) == 6
    assert all(torch.equal(before[k], v) for k, v in prepared.state_dict().items())


def test_object_type_skip_covers_the_fused_types_built_from_it(digits) -> None:
    model, data = digits
    backend = BACKENDS["fbgemm"]
    prepared = _calibrated(model, data, backend)
    from torch.ao.nn.intrinsic import ConvReLU2d

    assert mappings.fused_types_of(prepared, [nn.Conv2d]) == [ConvReLU2d]
    mapping = mappings.build_convert_mapping(MAPPING, SKIPS["conv"], backend, prepared)
    assert mapping.object_type_qconfigs[nn.Conv2d] is None
    assert mapping.object_type_qconfigs[ConvReLU2d] is None


def test_skip_regex_goes_before_the_base_mappings_regexes() -> None:
    backend = BACKENDS["x86"]
    base = QConfigMappingSpec(name="r", module_name_regex=[ModuleNameRegexEntry(regex="block.*", qconfig="default")])
    skip = SkipSpec(name="s", module_name_regex=["block2\\..*"])
    mapping = mappings.build_convert_mapping(base, skip, backend, nn.Sequential())
    assert list(mapping.module_name_regex_qconfigs) == ["block2\\..*", "block.*"]
    assert mapping.module_name_regex_qconfigs["block2\\..*"] is None


def test_yaml_mapping_builds_every_kind_of_entry() -> None:
    backend = BACKENDS["fbgemm"]
    spec = QConfigMappingSpec(
        name="m",
        base="empty",
        global_qconfig="minmax_per_tensor",
        object_type=[ObjectTypeEntry("torch.nn.Linear", None), ObjectTypeEntry("operator.add")],
        module_name_regex=[ModuleNameRegexEntry("stem.*", "histogram_per_channel")],
        module_name=[ModuleNameEntry("fc", "default")],
        module_name_object_type_order=[ModuleNameObjectTypeOrderEntry("block1", "operator.add", 0, None)],
    )
    mapping = mappings.build_qconfig_mapping(spec, backend)
    assert mapping.object_type_qconfigs[nn.Linear] is None
    assert mapping.object_type_qconfigs[operator.add] is None
    assert mapping.module_name_regex_qconfigs["stem.*"].activation.p.func.__name__ == "HistogramObserver"
    assert mapping.module_name_qconfigs["fc"] is not None
    assert mapping.module_name_object_type_order_qconfigs[("block1", operator.add, 0)] is None
    # The global qconfig honours the engine: 7-bit activations on fbgemm.
    assert mapping.global_qconfig.activation.p.keywords["quant_max"] == 127


# name: (activation observer, weight observer, weight qscheme); backend_default is torch's per engine.
NAMED_QCONFIGS = {
    "minmax_per_tensor": ("MinMaxObserver", "MinMaxObserver", torch.per_tensor_symmetric),
    "minmax_per_channel": ("MinMaxObserver", "PerChannelMinMaxObserver", torch.per_channel_symmetric),
    "histogram_per_tensor": ("HistogramObserver", "MinMaxObserver", torch.per_tensor_symmetric),
    "histogram_per_channel": ("HistogramObserver", "PerChannelMinMaxObserver", torch.per_channel_symmetric),
    "backend_default": ("HistogramObserver", "PerChannelMinMaxObserver", torch.per_channel_symmetric),
    "percentile_per_channel": ("PercentileObserver", "PerChannelMinMaxObserver", torch.per_channel_symmetric),
    "mse_per_channel": ("MSEObserver", "PerChannelMinMaxObserver", torch.per_channel_symmetric),
}


@pytest.mark.parametrize("engine", list(BACKENDS))
@pytest.mark.parametrize("name", list(NAMED_QCONFIGS))
def test_named_qconfigs_follow_the_engine(name: str, engine: str) -> None:
    qconfig = qconfigs.named_qconfig(name, BACKENDS[engine], "k")
    activation, weight = qconfig.activation(), qconfig.weight()
    activation_class, weight_class, weight_scheme = NAMED_QCONFIGS[name]
    if name == "backend_default" and engine == "qnnpack":  # torch's qnnpack default: per-tensor weights
        weight_class, weight_scheme = "MinMaxObserver", torch.per_tensor_symmetric
    assert (type(activation).__name__, type(weight).__name__) == (activation_class, weight_class)
    # The library's own range (recovery.activation_bits rewrites it per CPU at prepare): fbgemm / x86
    # activations use 7 bits (reduce_range: no overflow without VNNI); qnnpack / onednn all 8.
    assert (activation.quant_min, activation.quant_max) == ((0, 127) if engine in ("fbgemm", "x86") else (0, 255))
    assert activation.dtype == torch.quint8 and activation.qscheme == torch.per_tensor_affine
    assert (weight.dtype, weight.qscheme, weight.quant_min, weight.quant_max) == (torch.qint8, weight_scheme, -128, 127)


def test_default_and_null_qconfig_names() -> None:
    static = {name for name, family in qconfigs.QCONFIG_FAMILY.items() if family == "static"}
    assert static == set(NAMED_QCONFIGS) and set(qconfigs.QCONFIG_FAMILY) == set(qconfigs.QCONFIG_LIBRARY)
    # the others (tests/test_qconfig_families.py): dynamic int8, weight-only int8, float16
    assert set(qconfigs.QCONFIG_LIBRARY) - static == {"dynamic", "dynamic_per_channel", "weight_only", "fp16_dynamic"}
    default = qconfigs.named_qconfig("default", BACKENDS["qnnpack"], "k")
    assert type(default.weight()).__name__ == "MinMaxObserver"  # the backend's default_qconfig: backend_default
    assert qconfigs.named_qconfig(None, BACKENDS["x86"], "k") is None


def test_count_nodes_sees_what_stayed_float(digits) -> None:
    model, data = digits
    backend = BACKENDS["x86"]
    prepared = _calibrated(model, data, backend)
    backend_config = qconfigs.get_backend_config("x86")
    _, convert_config = custom_modules.build_custom_configs(CustomConfigSpec())
    counts = {}
    for name in ("none", "first_last"):
        conversion = fx.convert_reference(
            prepared,
            mappings.build_convert_mapping(MAPPING, SKIPS[name], backend, prepared),
            backend_config,
            convert_config,
        )
        lowered = fx.lower(conversion.model, conversion.engine_state, "x86")
        counts[name] = fx_results.count_nodes(lowered, data.example_inputs, "x86")
    assert counts["none"]["float"] == 0 and counts["none"]["quantized"] > 0
    assert counts["first_last"]["float"] >= 2
    assert counts["first_last"]["quantized"] < counts["none"]["quantized"]


def test_unsupported_engine_is_refused_with_the_supported_list() -> None:
    with pytest.raises(ConfigError, match="supported engines are"), qconfigs.quantized_engine("tpu"):
        pass
