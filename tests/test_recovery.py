"""Accuracy recovery (recovery: config group, pipeline/engine/recovery.py): each option changes what it
should, and the test models show the failure first and the fix after. Thresholds are the figures of
bench/accuracy_recovery.py on an AMD EPYC with VNNI (x86 backend), with margin."""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.ao.quantization import MinMaxObserver

from pipeline import checks
from pipeline.batch import ModelInputs
from pipeline.cache import cache_key
from pipeline.engine import bias_correction as bias_module
from pipeline.engine import recovery as recovery_module
from pipeline.engine import steps
from pipeline.engine.base import ReferenceConversion
from pipeline.engine.observers import MSEObserver, PercentileObserver
from pipeline.engine.qconfigs import quantized_engine
from pipeline.errors import ConfigError
from pipeline.measure import sqnr_db
from pipeline.schema import (
    BackendSpec,
    CustomConfigSpec,
    ObjectTypeEntry,
    QConfigMappingSpec,
    RecoverySpec,
    SkipSpec,
)
from stages.sources.digits import digits_data
from stages.sources.mobile_digits import mobile_digits
from stages.sources.outlier_transformer import outlier_transformer
from tests.conftest import compose_config, to_spec

X86 = BackendSpec(engine="x86", backend_config="x86")
DEFAULT_MAPPING = QConfigMappingSpec(name="backend_default")
LINEAR_ONLY = QConfigMappingSpec(
    name="static_linear", base="empty", global_qconfig=None, object_type=[ObjectTypeEntry("torch.nn.Linear", "default")]
)
OFF = RecoverySpec(activation_bits="7", bounded_activations="off", bias_correction=False, smoothquant_alpha=0.0)
DEFAULTS = RecoverySpec()
NO_VNNI = "this CPU has no VNNI: x86/fbgemm int8 kernels may saturate 8-bit activations, so 8 bits are not exact here"


@functools.cache
def mobile() -> tuple[nn.Module, object]:
    return mobile_digits(), digits_data(image_size=32)


@functools.cache
def transformer() -> tuple[nn.Module, object]:
    return outlier_transformer(), digits_data()


def quantize(
    model: nn.Module, data: object, recovery: RecoverySpec, mapping: QConfigMappingSpec = DEFAULT_MAPPING
) -> dict[str, float]:
    """The pipeline's steps in order (prepare with recovery, calibrate, reference convert, bias correction,
    lower) and the lowered model's figures on the evaluation part."""
    calibration = [x for x, _ in data.calibration]
    custom = CustomConfigSpec()
    prepared = steps.prepare(model, data.example_inputs, "m", X86, mapping, custom, recovery, calibration)
    recorder = bias_module.FloatMeansRecorder(prepared, recovery.bias_correction_samples)  # as the calibrate stage
    with quantized_engine("x86"), torch.no_grad():
        for x in calibration:
            recorder.batch(x)
            x.call(prepared)
    recorder.keep()
    conversion = steps.convert_reference(prepared, X86, mapping, SkipSpec(name="none"), custom)
    if recovery.bias_correction:
        steps.correct_bias(conversion, prepared, calibration, recovery)
    lowered, _ = steps.lower(conversion, X86, data.example_inputs)
    inputs = ModelInputs.cat([x for x, _ in data.evaluation])
    labels = torch.cat([y for _, y in data.evaluation])
    with quantized_engine("x86"), torch.no_grad():
        expected, actual = inputs.call(model), inputs.call(lowered)
    return {
        "float_accuracy": (expected.argmax(1) == labels).float().mean().item(),
        "accuracy": (actual.argmax(1) == labels).float().mean().item(),
        "agreement": (actual.argmax(1) == expected.argmax(1)).float().mean().item(),
        "sqnr": sqnr_db(expected, actual),
        "cosine": nn.functional.cosine_similarity(expected, actual, dim=1).mean().item(),
    }


# --------------------------------------------------------------------------------------------------
# Resolution of the auto choices and the config checks


def test_activation_bits_auto_follows_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    for vnni, expected in ((True, 8), (False, 7)):
        monkeypatch.setattr(recovery_module, "has_vnni", lambda vnni=vnni: vnni)
        assert recovery_module.activation_bits(DEFAULTS, "x86") == expected
        assert recovery_module.activation_bits(DEFAULTS, "fbgemm") == expected
        assert recovery_module.activation_bits(DEFAULTS, "qnnpack") == 8  # never overflows: its default
    assert recovery_module.activation_bits(replace(DEFAULTS, activation_bits="7"), "qnnpack") == 7
    assert recovery_module.activation_bits(None, "x86") is None  # no recovery: the library's qconfigs


def test_bounded_activations_default_on_except_qnnpack() -> None:
    assert recovery_module.clamps_bounded(DEFAULTS, "x86") and recovery_module.clamps_bounded(DEFAULTS, "onednn")
    assert not recovery_module.clamps_bounded(DEFAULTS, "qnnpack")  # its quantized ReLU6 is wrong regardless
    assert recovery_module.clamps_bounded(replace(DEFAULTS, bounded_activations="on"), "qnnpack")
    assert not recovery_module.clamps_bounded(replace(DEFAULTS, bounded_activations="off"), "x86")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("recovery.activation_bits=9", "recovery.activation_bits"),
        ("recovery.bounded_activations=maybe", "recovery.bounded_activations"),
        ("recovery.smoothquant_alpha=1.5", "recovery.smoothquant_alpha"),
        ("recovery.bias_correction_samples=0", "recovery.bias_correction_samples"),
        ("recovery.bias_correction_method=fast", "recovery.bias_correction_method"),
    ],
)
def test_bad_recovery_values_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        checks.check(to_spec(compose_config(["tracking=off", override])))


def test_cache_key_holds_what_changes_calibration_only() -> None:
    model, data = transformer()
    inputs = [x for x, _ in data.calibration]

    def key(*overrides: str) -> str:
        return cache_key(to_spec(compose_config(["experiment=outlier_transformer", *overrides])), model, inputs)

    base = key()
    assert key("recovery.bias_correction=false") == base  # acts after calibration
    assert key("recovery.bias_correction_samples=256") == base
    assert key("recovery.smoothquant_alpha=0") != base
    assert key("recovery.activation_bits=7") != key("recovery.activation_bits=8")
    assert key("recovery.bounded_activations=off") != key("recovery.bounded_activations=on")


# --------------------------------------------------------------------------------------------------
# Activation bits


def test_eight_bit_activations_are_exact_on_vnni() -> None:
    """Worst case for the AVX2 16-bit saturation: activations at 255 beside positive weights at 127. With
    VNNI the lowered int8 model equals its reference (float simulation) bit for bit at 8 bits."""
    if not recovery_module.has_vnni():
        pytest.skip(NO_VNNI)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(), nn.Linear(512, 10)).eval()
    with torch.no_grad():
        model[0].weight.abs_()
        model[2].weight.abs_()
    inputs = torch.rand(16, 16, 8, 8)
    inputs[:, :, ::2] = 1.0
    for engine in ("x86", "fbgemm"):
        backend = BackendSpec(engine=engine, backend_config=engine)
        recovery = replace(OFF, activation_bits="8")
        example = ModelInputs((inputs[:1],))
        prepared = steps.prepare(model, example, "m", backend, DEFAULT_MAPPING, CustomConfigSpec(), recovery)
        assert prepared.meta["pipeline_activation_bits"] == 8
        with quantized_engine(engine), torch.no_grad():
            prepared(inputs)
            conversion = steps.convert_reference(
                prepared, backend, DEFAULT_MAPPING, SkipSpec(name="none"), CustomConfigSpec()
            )
            lowered, _ = steps.lower(conversion, backend, example)
            assert torch.equal(lowered(inputs), conversion.model(inputs)), engine


def test_eight_bits_beat_seven_on_vnni() -> None:
    if not recovery_module.has_vnni():
        pytest.skip(NO_VNNI)
    model, data = mobile()
    seven = quantize(model, data, replace(DEFAULTS, activation_bits="7", bias_correction=False))
    eight = quantize(model, data, replace(DEFAULTS, activation_bits="8", bias_correction=False))
    assert eight["sqnr"] > seven["sqnr"] + 1.5, (seven, eight)  # clamped ReLU6 ranges, no bias correction


# --------------------------------------------------------------------------------------------------
# The ReLU6 test model: failure first, then the fix


def test_mobile_digits_fails_with_old_defaults_and_recovers_with_new() -> None:
    model, data = mobile()
    before = quantize(model, data, OFF)
    assert before["sqnr"] < 10.0 and before["agreement"] < 0.92, before  # measured 6.5 dB, 0.871
    after = quantize(model, data, DEFAULTS)
    assert after["sqnr"] > 19.0 and after["agreement"] > 0.96, after  # measured 22.4 dB, 0.982
    assert after["accuracy"] >= after["float_accuracy"] - 0.01, after  # every layer int8, within one point


def test_bias_correction_raises_sqnr_on_mobile_digits() -> None:
    model, data = mobile()
    without = quantize(model, data, replace(DEFAULTS, bias_correction=False))
    with_correction = quantize(model, data, DEFAULTS)
    assert with_correction["sqnr"] > without["sqnr"] + 0.5, (without, with_correction)


def test_analytic_bias_correction_runs_no_model_pass_and_keeps_most_of_the_gain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """recovery.bias_correction_method=analytic corrects from the weights' error and the input means the
    calibration recorded: no reference-model pass (a forward would raise), and on mobile_digits most of the
    empirical correction's gain (measured +0.49 against +0.54 dB)."""
    model, data = mobile()
    without = quantize(model, data, replace(DEFAULTS, bias_correction=False))
    empirical = quantize(model, data, replace(DEFAULTS, bias_correction_method="empirical"))

    def no_pass(*args: object) -> None:
        raise AssertionError("a model pass ran")

    monkeypatch.setattr(bias_module, "_call", no_pass)
    analytic = quantize(model, data, replace(DEFAULTS, bias_correction_method="analytic"))
    gain, empirical_gain = analytic["sqnr"] - without["sqnr"], empirical["sqnr"] - without["sqnr"]
    assert gain > 0.3 and gain > 0.7 * empirical_gain, (without, empirical, analytic)


def test_auto_bias_correction_is_empirical_for_small_models_only() -> None:
    """auto: the empirical pass when samples x multiply-adds a sample is at most AUTO_EMPIRICAL_MACS."""
    limit = bias_module.AUTO_EMPIRICAL_MACS
    assert bias_module.resolve_method("auto", 1.8e6, 64) == "empirical"  # mobile_digits
    assert bias_module.resolve_method("auto", 1.8e9, 64) == "analytic"  # the ResNet-18 shape at 224 px
    assert bias_module.resolve_method("auto", limit / 64, 64) == "empirical"
    assert bias_module.resolve_method("auto", limit / 64, 65) == "analytic"
    assert bias_module.resolve_method("empirical", 1.8e9, 64) == "empirical"
    assert bias_module.resolve_method("analytic", 1.0, 1) == "analytic"


def test_bias_correction_changes_biases_only_of_quantized_layers() -> None:
    model, data = mobile()
    calibration = [x for x, _ in data.calibration]
    prepared = steps.prepare(model, data.example_inputs, "m", X86, DEFAULT_MAPPING, CustomConfigSpec(), DEFAULTS)
    with quantized_engine("x86"), torch.no_grad():
        calibration[0].call(prepared)
    skip = SkipSpec(name="head", module_name=["classifier"])
    conversion = steps.convert_reference(prepared, X86, DEFAULT_MAPPING, skip, CustomConfigSpec())
    before = {name: p.clone() for name, p in conversion.model.named_parameters()}
    shifts = steps.correct_bias(conversion, prepared, calibration[:1], DEFAULTS)
    assert "classifier" not in shifts and len(shifts) == 15  # 15 int8 convs; the float head is untouched
    changed = {name for name, p in conversion.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {f"{name}.bias" for name in shifts}


# --------------------------------------------------------------------------------------------------
# SmoothQuant on the outlier transformer


def test_smoothquant_keeps_float_outputs() -> None:
    model, data = transformer()
    calibration = [x for x, _ in data.calibration]
    smoothed = steps.smooth(model, calibration, 0.5, "outlier_transformer", CustomConfigSpec())
    assert smoothed is not model
    inputs = ModelInputs.cat([x for x, _ in data.evaluation])
    with torch.no_grad():
        expected, actual = inputs.call(model), inputs.call(smoothed)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() < 1e-5
    # ln1 -> q, k, v (past the x.shape read) and ln2 -> fc1, in both blocks
    assert not torch.equal(smoothed.blocks[0].ln1.weight, model.blocks[0].ln1.weight)
    assert not torch.equal(smoothed.blocks[1].fc1.weight, model.blocks[1].fc1.weight)


def test_transformer_fails_on_outliers_and_smoothquant_recovers() -> None:
    model, data = transformer()
    before = quantize(model, data, OFF, LINEAR_ONLY)
    assert before["cosine"] < 0.97 and before["sqnr"] < 14.0, before  # measured 0.956, 10.6 dB
    smoothed = quantize(model, data, replace(OFF, smoothquant_alpha=0.5), LINEAR_ONLY)
    assert smoothed["cosine"] > 0.995 and smoothed["sqnr"] > 28.0, smoothed  # measured 0.9997, 32.4 dB
    after = quantize(model, data, DEFAULTS, LINEAR_ONLY)
    assert after["cosine"] >= 0.98 and after["agreement"] > 0.98, after  # measured 0.9999, 1.000


def test_smoothquant_leaves_models_without_layernorm_linear_pairs_alone() -> None:
    model, data = mobile()
    assert steps.smooth(model, [data.calibration[0][0]], 0.5, "m", CustomConfigSpec()) is model


# --------------------------------------------------------------------------------------------------
# Observers


def _range_and_error(observer: torch.nn.Module, values: torch.Tensor) -> tuple[float, float]:
    observer(values)
    scale, zero_point = observer.calculate_qparams()
    restored = torch.fake_quantize_per_tensor_affine(
        values, float(scale), int(zero_point), observer.quant_min, observer.quant_max
    )
    return float(scale) * (observer.quant_max - observer.quant_min), float((restored - values).pow(2).mean())


def test_percentile_observer_drops_a_rare_outlier() -> None:
    torch.manual_seed(0)
    values = torch.rand(100_000)
    values[0] = 1000.0
    extent, _ = _range_and_error(PercentileObserver(dtype=torch.quint8), values)
    assert 0.9 < extent < 2.0  # the 99.99th percentile, not the 1000


def test_mse_observer_error_is_below_min_max() -> None:
    torch.manual_seed(0)
    values = torch.randn(100_000)  # tails beyond 4 sigma cost less clipped than spread over the range
    mse_extent, mse_error = _range_and_error(MSEObserver(dtype=torch.quint8), values)
    minmax_extent, minmax_error = _range_and_error(MinMaxObserver(dtype=torch.quint8), values)
    assert mse_extent < minmax_extent and mse_error < minmax_error


@pytest.mark.parametrize("name", ["percentile_per_channel", "mse_per_channel"])
def test_named_observer_qconfigs_run_by_name(name: str) -> None:
    model, data = transformer()
    mapping = replace(LINEAR_ONLY, object_type=[ObjectTypeEntry("torch.nn.Linear", name)])
    figures = quantize(model, data, replace(DEFAULTS, bias_correction=False), mapping)
    assert figures["cosine"] > 0.99, figures


def _old_channel_means(output: torch.Tensor, linear: bool) -> torch.Tensor:
    """Bias correction's per-channel means before they were reduced in place: through a transposed copy."""
    if linear:
        return output.reshape(-1, output.shape[-1]).mean(0)
    return output.transpose(0, 1).reshape(output.shape[1], -1).mean(1)


def test_channel_means_equal_the_transposed_copys() -> None:
    """Up to float32 rounding (the sum runs in another order); the linear case is the same code."""
    torch.manual_seed(0)
    conv = torch.randn(16, 32, 28, 28) * 3 + 1
    torch.testing.assert_close(bias_module._channel_means(conv, False), _old_channel_means(conv, False))
    linear = torch.randn(4, 7, 64)
    assert torch.equal(bias_module._channel_means(linear, True), _old_channel_means(linear, True))


def test_bias_correction_bypasses_observers_with_the_old_copys_numerics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float pass runs the calibrated model itself with its observers bypassed: its observer state is
    unchanged, and the corrected biases equal, bit for bit, those of the old way (a copy of the calibrated
    model run with its observers observing), with the same channel means."""
    model, data = mobile()
    calibration = [x for x, _ in data.calibration]
    prepared = steps.prepare(model, data.example_inputs, "m", X86, DEFAULT_MAPPING, CustomConfigSpec(), DEFAULTS)
    with quantized_engine("x86"), torch.no_grad():
        for x in calibration[:2]:
            x.call(prepared)
    state = {name: value.clone() for name, value in prepared.state_dict().items()}

    def converted() -> ReferenceConversion:
        return steps.convert_reference(prepared, X86, DEFAULT_MAPPING, SkipSpec(name="none"), CustomConfigSpec())

    new = converted()
    new_shifts = steps.correct_bias(new, prepared, calibration, DEFAULTS)
    after = prepared.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[name], state[name]) for name in state)
    assert not any("forward" in vars(module) for module in prepared.modules())  # every observer restored

    old = converted()
    monkeypatch.setattr(bias_module, "observers_bypassed", contextlib.nullcontext)  # observers observe ...
    unrecorded = copy.deepcopy(prepared)
    unrecorded.meta.pop(bias_module.FLOAT_MEANS)  # the means the first correction kept: a float pass again
    old_shifts = steps.correct_bias(old, unrecorded, calibration, DEFAULTS)  # ... on a copy
    assert new_shifts == old_shifts and len(new_shifts) == 16
    old_biases = dict(old.model.named_parameters())
    for name, bias in new.model.named_parameters():
        assert torch.equal(bias, old_biases[name]), name


def test_bias_correction_reuses_the_float_means_of_the_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrating with a FloatMeansRecorder (the calibrate stage does, with bias correction on FX) keeps the
    float layers' channel means on the first samples: bias correction on those samples runs no float pass and
    sets the biases the float pass would (up to rounding: sums in float64 per batch against one float32 mean).
    A correction's own float pass is kept too; other samples (their batches' digests differ) need a pass."""
    model, data = mobile()
    calibration = [x for x, _ in data.calibration]  # 8 batches of 32
    recovery = replace(DEFAULTS, bias_correction_samples=64)

    def calibrated(record: bool) -> torch.nn.Module:
        prepared = steps.prepare(model, data.example_inputs, "m", X86, DEFAULT_MAPPING, CustomConfigSpec(), recovery)
        recorder = bias_module.FloatMeansRecorder(prepared, 64) if record else None
        with quantized_engine("x86"), torch.no_grad():
            for x in calibration:
                if recorder is not None:
                    recorder.batch(x)
                x.call(prepared)
        if recorder is not None:
            recorder.keep()
        return prepared

    def converted(prepared: torch.nn.Module) -> ReferenceConversion:
        return steps.convert_reference(prepared, X86, DEFAULT_MAPPING, SkipSpec(name="none"), CustomConfigSpec())

    def no_float_pass(*args: object) -> None:
        raise AssertionError("float pass ran")

    recorded, plain = calibrated(True), calibrated(False)
    states = zip(recorded.state_dict().values(), plain.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in states)
    assert bias_module.FLOAT_MEANS not in plain.meta
    expected = converted(plain)
    expected_shifts = steps.correct_bias(expected, plain, calibration, recovery)  # a float pass, kept
    monkeypatch.setattr(bias_module, "_float_pass", no_float_pass)
    reused = converted(recorded)
    shifts = steps.correct_bias(reused, recorded, calibration, recovery)
    assert shifts.keys() == expected_shifts.keys() and len(shifts) == 16
    biases = dict(expected.model.named_parameters())
    for name, bias in reused.model.named_parameters():
        torch.testing.assert_close(bias, biases[name], rtol=1e-3, atol=1e-4)
    assert steps.correct_bias(converted(plain), plain, calibration, recovery) == expected_shifts  # kept, reused
    with pytest.raises(AssertionError, match="float pass ran"):
        steps.correct_bias(converted(recorded), recorded, calibration[1:], recovery)  # other samples
