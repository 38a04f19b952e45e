"""clamp_bounded_activations (qconfig_mapping=relu6_aware): convs / linears feeding only ReLU6 / hardtanh
observe the clipped range, which raises SQNR when pre-activations are much wider than the clip."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cache import CalibrationCache
from pipeline.engine import custom_modules, observers, qconfigs
from pipeline.measure import sqnr_db
from pipeline.schema import BackendSpec, CalibrateSpec, CustomConfigSpec, QConfigMappingSpec, SkipSpec
from stages.calibrate import calibrate, prepare
from stages.lower import lower
from stages.reference_convert import reference_convert
from stages.types import Calibrated, DataBundle, Loaded


class BoundedNet(nn.Module):
    """conv1 -> ReLU6; conv2 -> BN -> F.relu6; conv3 feeds a ReLU6 *and* an add (so it must not be
    picked); fc -> F.hardtanh(-2, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.act3 = nn.ReLU6()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = F.relu6(self.bn2(self.conv2(x)))
        y = self.conv3(x)
        x = (self.act3(y) + y).mean((2, 3))
        return F.hardtanh(self.fc(x), -2.0, 2.0)


def _chain() -> nn.Module:
    """conv -> ReLU6 -> conv -> ReLU6 -> conv: the ReLU6 ranges decide the output error."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 4, 1)
    )
    with torch.no_grad():
        model[0].weight.mul_(20.0)  # pre-activations reach about +-50, far past ReLU6's 6
        model[2].weight.mul_(10.0)
    return model


def _loaded(chain: bool = False) -> Loaded:
    torch.manual_seed(0)
    model = _chain() if chain else BoundedNet()
    if not chain:
        with torch.no_grad():
            model.conv1.weight.mul_(20.0)  # pre-activations reach about +-50, far past ReLU6's 6
            model.bn2.running_var.fill_(0.05)  # and +-20 after the BatchNorm
    model.eval()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 12, 12, generator=generator), None) for _ in range(6)]
    data = DataBundle("bounded", batches[:4], batches[4:], (batches[0][0][:1],), has_labels=False)
    return Loaded(model=model, data=data, model_name="bounded_net", trained_weights=False)


def _backend(engine: str) -> BackendSpec:
    return BackendSpec(engine=engine, backend_config=engine)


def _lowered_sqnr(loaded: Loaded, engine: str, clamp: bool, skip: SkipSpec | None = None) -> tuple[float, object]:
    mapping = QConfigMappingSpec(name="t", clamp_bounded_activations=clamp)
    backend = _backend(engine)
    calibrated = calibrate(loaded, backend, mapping, CustomConfigSpec(), CalibrateSpec())
    reference = reference_convert(calibrated, backend, mapping, skip or SkipSpec(name="none"), CustomConfigSpec())
    lowered = lower(reference, backend, loaded.data.example_inputs).model
    x = torch.cat([inputs.args[0] for inputs, _ in loaded.data.evaluation])
    with qconfigs.quantized_engine(engine), torch.no_grad():
        return sqnr_db(loaded.model(x), lowered(x)), reference


def test_picks_exactly_the_modules_feeding_only_bounded_activations() -> None:
    loaded = _loaded()
    found = observers.bounded_activation_producers(
        loaded.model, custom_modules.build_custom_configs(CustomConfigSpec())[0]
    )
    assert found == {"conv1": (0.0, 6.0), "conv2": (0.0, 6.0), "fc": (-2.0, 2.0)}
    prepared = prepare(
        loaded, _backend("x86"), QConfigMappingSpec(name="t", clamp_bounded_activations=True), CustomConfigSpec()
    )
    # The output observers of those three clamp; every other observer (the graph input's included,
    # which conv1's qconfig creates) is a plain histogram observer.
    clamped_after = set()
    for node in prepared.graph.nodes:
        if node.op == "call_module" and isinstance(
            prepared.get_submodule(str(node.target)), observers.ClampedHistogramObserver
        ):
            clamped_after.add(node.args[0].name)
    # ReLU6 / hardtanh share the observer of their input, so it follows them too.
    assert clamped_after == {"conv1", "act1", "conv2", "relu6", "fc", "hardtanh"}
    plain = [
        m
        for n, m in prepared.named_modules()
        if "activation_post_process" in n and type(m).__name__ == "HistogramObserver"
    ]
    assert len(plain) >= 3  # graph input, conv3 output, the add


# Measured here: x86 and fbgemm 21.8 -> 27.7 dB (+5.9 dB); the margin leaves room for other CPUs.
@pytest.mark.parametrize("engine", ["x86", "fbgemm"])
def test_clamped_ranges_raise_output_sqnr(engine: str) -> None:
    loaded = _loaded(chain=True)
    without, _ = _lowered_sqnr(loaded, engine, clamp=False)
    with_clamp, _ = _lowered_sqnr(loaded, engine, clamp=True)
    assert with_clamp >= without + 4.0, (without, with_clamp)


def test_a_skip_list_on_top_still_converts_and_skips() -> None:
    loaded = _loaded()
    skip = SkipSpec(name="conv1_and_linear", module_name=["conv1"], object_type=["torch.nn.Linear"])
    sqnr, reference = _lowered_sqnr(loaded, "x86", clamp=True, skip=skip)
    assert "conv1" in reference.left_float and "fc" in reference.left_float
    assert isinstance(reference.model.get_submodule("conv1"), nn.Conv2d)
    assert type(reference.model.get_submodule("conv2")).__module__.startswith("torch.ao.nn.quantized.reference")
    assert sqnr > 20.0


def test_cache_round_trip_rebuilds_the_identical_clamped_model(tmp_path: Path) -> None:
    loaded = _loaded()
    backend, mapping = _backend("x86"), QConfigMappingSpec(name="t", clamp_bounded_activations=True)
    calibrated = calibrate(loaded, backend, mapping, CustomConfigSpec(), CalibrateSpec())
    cache = CalibrationCache(tmp_path)
    cache.store("k", calibrated.model, {})
    rebuilt = cache.load("k", lambda: prepare(loaded, backend, mapping, CustomConfigSpec()))
    assert rebuilt is not None
    assert isinstance(rebuilt.get_submodule("activation_post_process_1"), observers.ClampedHistogramObserver)
    outputs = []
    for model in (calibrated.model, rebuilt):
        reference = reference_convert(
            Calibrated(model, 0, 0), backend, mapping, SkipSpec(name="none"), CustomConfigSpec()
        )
        lowered = lower(reference, backend, loaded.data.example_inputs).model
        with qconfigs.quantized_engine("x86"), torch.no_grad():
            outputs.append(lowered(loaded.data.evaluation[0][0].args[0]))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.slow
def test_relu6_aware_on_a_model_without_relu6_runs_and_says_nothing_was_clamped(run_pipeline, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pipeline.engine.steps"):
        spec, state, _ = run_pipeline(
            ["qconfig_mapping=relu6_aware", "tracking=off", "stages=[load,calibrate,reference_convert,lower,evaluate]"]
        )
    assert spec.qconfig_mapping.clamp_bounded_activations
    assert any("nothing clamped" in r.message and "digits_cnn" in r.message for r in caplog.records)
    assert state.metrics["eval/lowered/accuracy"] > 0.95
