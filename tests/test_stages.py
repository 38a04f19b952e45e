"""Each stage on its own, on the embedded default (x86 unless a test says otherwise)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.engine.steps import NothingQuantizedError
from pipeline.measure import sqnr_db
from pipeline.schema import ExportSpec
from stages.calibrate import calibrate
from stages.evaluate import evaluate
from stages.export import export
from stages.load import load
from stages.lower import lower, module_listing
from stages.reference_convert import reference_convert
from tests.conftest import FAST, compose_config, to_spec


def _spec(*overrides: str):
    return to_spec(compose_config([*FAST, *overrides]))


@pytest.fixture(scope="module")
def chain():
    """load -> calibrate -> reference_convert -> lower, once for the module's tests."""
    spec = _spec()
    loaded = load(spec.model, spec.data, spec.seed)
    calibrated = calibrate(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.calibrate)
    reference = reference_convert(calibrated, spec.backend, spec.qconfig_mapping, spec.skip, spec.custom_config)
    lowered = lower(reference, spec.backend, loaded.data.example_inputs)
    return spec, loaded, calibrated, reference, lowered


def test_load_gives_eval_mode_model_with_at_least_97_percent_float_accuracy(chain) -> None:
    _, loaded, *_ = chain
    assert not loaded.model.training
    data = loaded.data
    assert data.num_calibration_samples == 256 and data.num_evaluation_samples == 450
    with torch.no_grad():
        correct = sum((x.call(loaded.model).argmax(1) == y).sum().item() for x, y in data.evaluation)
    assert correct / data.num_evaluation_samples >= 0.97
    assert data.example_inputs.args[0].shape == (1, 1, 8, 8)


def test_load_splits_never_overlap() -> None:
    from stages.sources.digits import _split_indices

    split = _split_indices(seed=0, calibration_size=256, evaluation_size=450)
    parts = [set(part.tolist()) for part in split.values()]
    assert sum(len(p) for p in parts) == 1797
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def test_calibrate_runs_every_batch_through_observers(chain) -> None:
    _, loaded, calibrated, *_ = chain
    # Counted by the model's input observer, not by calibrate: its histogram holds one count per value it
    # saw, so every one of the 256 calibration images (8x8 values each) went through it exactly once.
    input_observer = calibrated.model.activation_post_process_0
    assert loaded.data.num_calibration_samples == 256
    assert float(input_observer.histogram.sum()) == pytest.approx(256 * 64, rel=1e-3)  # a batch more or less: 12%
    assert calibrated.num_batches == 8 and calibrated.num_samples == 256
    observers = [m for n, m in calibrated.model.named_modules() if "activation_post_process" in n]
    assert observers, "prepare_fx inserted no observers"
    # Histogram observers that saw data have a finite, non-empty range.
    assert all(float(obs.max_val) > float(obs.min_val) for obs in observers if hasattr(obs, "max_val"))


def test_calibrate_max_batches_caps_the_batches() -> None:
    spec = _spec("calibrate.max_batches=2")
    loaded = load(spec.model, spec.data, spec.seed)
    calibrated = calibrate(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.calibrate)
    assert calibrated.num_batches == 2 and calibrated.num_samples == 64
    assert float(calibrated.model.activation_post_process_0.histogram.sum()) == pytest.approx(64 * 64, rel=1e-3)


def test_reference_convert_applies_the_skip_list_at_convert_time(chain) -> None:
    spec, loaded, calibrated, reference, _ = chain
    assert reference.left_float == []
    skipped = reference_convert(
        calibrated, spec.backend, spec.qconfig_mapping, _spec("skip=add").skip, spec.custom_config
    )
    assert skipped.left_float == ["add", "add_1"]
    # The reference model simulates int8 in float: close to float, not identical.
    x = loaded.data.evaluation[0][0].args[0]
    with torch.no_grad():
        db = sqnr_db(loaded.model(x), reference.model(x))
    assert 20 < db < math.inf


def test_lower_produces_quantized_kernels_and_counts_them(chain) -> None:
    _, _, _, _, lowered = chain
    kinds = {type(m).__module__ for m in lowered.model.modules()}
    assert any(k.startswith("torch.ao.nn.intrinsic.quantized") for k in kinds)
    assert lowered.node_counts["quantized"] >= 8 and lowered.node_counts["float"] == 0


def test_lowered_model_txt_lists_the_module_tree_and_counts_each_module_type(chain) -> None:
    _, _, _, _, lowered = chain
    text = module_listing(lowered.model)
    tree, table = text.split("\n\n# Submodules by type (")
    assert tree == str(lowered.model)
    rows = {line.split()[1]: int(line.split()[0]) for line in table.splitlines()[1:]}
    expected: dict[str, int] = {}
    for _, module in list(lowered.model.named_modules())[1:]:
        name = f"{type(module).__module__}.{type(module).__qualname__}"
        expected[name] = expected.get(name, 0) + 1
    assert rows == expected
    assert any(name.startswith("torch.ao.nn.intrinsic.quantized") for name in rows)
    assert table.startswith(f"{sum(expected.values())} in all):")


def test_lower_refuses_a_model_where_nothing_was_quantized(chain) -> None:
    spec, loaded, calibrated, *_ = chain
    everything = _spec("skip.module_name_regex=[.*]", "skip.object_type=[operator.add]")
    reference = reference_convert(calibrated, spec.backend, spec.qconfig_mapping, everything.skip, spec.custom_config)
    with pytest.raises(NothingQuantizedError, match="Nothing was quantized"):
        lower(reference, spec.backend, loaded.data.example_inputs)


def test_evaluate_reports_every_figure(chain) -> None:
    spec, loaded, _, reference, lowered = chain
    report = evaluate(loaded, {"reference": reference.model, "lowered": lowered.model}, "x86", spec.evaluate)
    m = report.metrics
    assert m["eval/float/accuracy"] >= 0.97
    assert abs(m["eval/accuracy_delta"]) <= 0.01
    assert m["eval/lowered/sqnr_db"] > 20 and m["eval/lowered/agreement"] > 0.97
    assert 0.2 < m["size/ratio"] < 0.5  # int8 weights, with per-channel scales and the float bias
    for model in ("float", "lowered"):
        for size in (1, 8):
            # Every form is timed at batch 1; at 8 only those not clearly slower at 1 (evaluate.latency.prune).
            timed = [form for form in ("eager", "traced", "frozen") if f"latency/{model}/{form}/b{size}_median_ms" in m]
            assert timed == ["eager", "traced", "frozen"] if size == 1 else timed
            for form in timed:
                key = f"latency/{model}/{form}/b{size}"
                assert m[f"{key}_p90_ms"] >= m[f"{key}_median_ms"] > 0
                assert m[f"{key}_ci_low_ms"] <= m[f"{key}_median_ms"] <= m[f"{key}_ci_high_ms"]  # its 95% interval
                assert m[f"{key}_runs"] >= 3  # evaluate.latency.repeats=3 at least
            best = report.fastest_form[f"{model}/b{size}"]
            assert m[f"latency/{model}/b{size}_ms"] == m[f"latency/{model}/{best}/b{size}_median_ms"]
            assert m[f"latency/{model}/b{size}_ci_low_ms"] == m[f"latency/{model}/{best}/b{size}_ci_low_ms"]
    assert "latency/reference/b1_ms" not in m  # a reference model is not deployable
    assert m["latency/speedup_b1"] == m["latency/float/b1_ms"] / m["latency/lowered/b1_ms"]
    assert m["latency/speedup_b1_ci_low"] <= m["latency/speedup_b1"] <= m["latency/speedup_b1_ci_high"]


def test_evaluate_without_labels_reports_sqnr_and_agreement_only(chain) -> None:
    spec, loaded, _, _, lowered = chain
    from dataclasses import replace

    unlabeled = replace(loaded, data=replace(loaded.data, has_labels=False))
    no_latency = replace(spec.evaluate, latency=replace(spec.evaluate.latency, enabled=False))
    m = evaluate(unlabeled, {"lowered": lowered.model}, "x86", no_latency).metrics
    assert not any(k.endswith("accuracy") for k in m)
    assert m["eval/lowered/sqnr_db"] > 20


def test_evaluate_without_the_float_model_reports_no_metric_against_float(chain) -> None:
    """evaluate.models=[lowered]: accuracy (labels) but no SQNR, agreement or cosine (nothing to compare
    with), rather than an SQNR of inf and an agreement of 0."""
    spec, loaded, _, _, lowered = chain
    from dataclasses import replace

    only_lowered = replace(spec.evaluate, models=["lowered"], latency=replace(spec.evaluate.latency, enabled=False))
    m = evaluate(loaded, {"lowered": lowered.model}, "x86", only_lowered).metrics
    assert m["eval/lowered/accuracy"] >= 0.97
    assert not any(key.startswith("eval/float/") for key in m)
    for name in ("sqnr_db", "agreement", "cosine_mean", "cosine_min"):
        assert f"eval/lowered/{name}" not in m
    with_float = replace(only_lowered, models=["float", "lowered"])
    assert 20 < evaluate(loaded, {"lowered": lowered.model}, "x86", with_float).metrics["eval/lowered/sqnr_db"] < 100


def test_export_torchscript_and_onnx_reload_and_match(chain, tmp_path: Path) -> None:
    _, loaded, _, _, lowered = chain
    bundle = export(lowered, loaded, ExportSpec(), tmp_path)
    assert bundle.form == "frozen"  # export.form=auto with no measurement: frozen
    assert set(bundle.files) == {"torchscript", "onnx"}  # the FX code is lower's lowered_graph.py
    assert "lite_interpreter" in bundle.skipped
    reloaded = torch.jit.load(str(bundle.files["torchscript"]))
    x = loaded.data.evaluation[1][0].args[0]
    with torch.no_grad():
        assert torch.equal(reloaded(x), lowered.model(x))
    assert bundle.metrics["export/onnx/sqnr_db"] > 25
    assert bundle.metrics["export/onnx/agreement"] >= 0.95


@pytest.mark.slow
def test_export_qnnpack_writes_a_lite_interpreter_file(tmp_path: Path) -> None:
    spec = _spec("backend=qnnpack")
    loaded = load(spec.model, spec.data, spec.seed)
    calibrated = calibrate(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.calibrate)
    reference = reference_convert(calibrated, spec.backend, spec.qconfig_mapping, spec.skip, spec.custom_config)
    lowered = lower(reference, spec.backend, loaded.data.example_inputs)
    bundle = export(lowered, loaded, ExportSpec(onnx=False, torchscript="script"), tmp_path)
    assert bundle.files["lite_interpreter"].stat().st_size > 1000
    assert bundle.metrics["export/lite_interpreter/max_abs_diff"] == 0.0
    assert bundle.skipped == {}


def _measured(fastest: str, traced_ms: float, frozen_ms: float, size: int = 1):
    """An evaluate report saying `fastest` won for the lowered model at batch `size`."""
    from stages.types import EvaluationReport

    metrics = {
        f"latency/lowered/traced/b{size}_median_ms": traced_ms,
        f"latency/lowered/frozen/b{size}_median_ms": frozen_ms,
        f"latency/lowered/eager/b{size}_median_ms": 9.0,
    }
    return EvaluationReport(metrics=metrics, fastest_form={f"lowered/b{size}": fastest})


def _is_frozen(path: Path) -> bool:
    """A frozen TorchScript module keeps no submodules (their weights are inlined as constants)."""
    return not list(torch.jit.load(str(path)).named_children())


def test_export_writes_the_form_evaluate_measured_fastest(chain, tmp_path: Path) -> None:
    """export.form=auto follows the measurement: frozen measured slower here, so the file is not frozen."""
    _, loaded, _, _, lowered = chain
    bundle = export(lowered, loaded, ExportSpec(onnx=False), tmp_path / "traced", _measured("traced", 0.30, 0.45))
    assert bundle.form == "unfrozen" and not _is_frozen(bundle.files["torchscript"])
    assert bundle.metrics["export/torchscript/frozen"] == 0.0
    assert bundle.metrics["export/torchscript/latency_ms"] == 0.30
    assert "traced measured fastest at batch 1" in bundle.form_reason

    bundle = export(lowered, loaded, ExportSpec(onnx=False), tmp_path / "frozen", _measured("frozen", 0.45, 0.30))
    assert bundle.form == "frozen" and _is_frozen(bundle.files["torchscript"])
    assert bundle.metrics["export/torchscript/latency_ms"] == 0.30

    forced = ExportSpec(onnx=False, form="frozen")
    bundle = export(lowered, loaded, forced, tmp_path / "forced", _measured("traced", 0.30, 0.45))
    assert bundle.form == "frozen" and _is_frozen(bundle.files["torchscript"])


def test_export_form_auto_reads_the_nearest_measured_batch_size_and_skips_eager() -> None:
    from stages.export import choose_form

    spec = ExportSpec(target_batch_size=4)
    frozen, why, ms = choose_form(spec, _measured("traced", 0.30, 0.45, size=8))
    assert (frozen, ms) == (False, 0.30) and "batch 8, nearest to export.target_batch_size=4" in why
    frozen, why, ms = choose_form(ExportSpec(), _measured("eager", 0.50, 0.40))
    assert (frozen, ms) == (True, 0.40) and "eager fastest but not saveable" in why
    assert choose_form(ExportSpec(), None)[0] is True


def test_export_saves_the_module_evaluate_traced_and_froze(chain, tmp_path: Path, monkeypatch) -> None:
    """evaluate's latency traced and froze the lowered model on a batch of the example's shape (1 x 1 x 8 x 8):
    export saves that frozen module and exports ONNX from that trace: it never traces the GraphModule itself."""
    from dataclasses import replace

    from pipeline.schema import LatencySpec

    spec, loaded, _, _, lowered = chain
    latency = LatencySpec(batch_sizes=[1, 4], budget_s=0.05, repeats=3, warmup=1)
    report = evaluate(loaded, {"lowered": lowered.model}, "x86", replace(spec.evaluate, latency=latency))
    assert set(report.lowered_forms) == {"traced", "frozen"} and report.lowered_forms_shapes == [(1, 1, 8, 8)]
    traced_by_export = []
    real_trace = torch.jit.trace

    def counting(module, *args, **kwargs):
        if not isinstance(module, torch.jit.ScriptModule):  # ONNX's exporter re-traces a quantized ScriptModule
            traced_by_export.append(type(module).__name__)
        return real_trace(module, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", counting)
    bundle = export(lowered, loaded, ExportSpec(form="frozen"), tmp_path, report)
    assert traced_by_export == [] and bundle.form == "frozen" and _is_frozen(bundle.files["torchscript"])
    assert bundle.metrics["export/torchscript/max_abs_diff"] == 0.0
    assert "onnx" in bundle.files or "onnx" in bundle.skipped
