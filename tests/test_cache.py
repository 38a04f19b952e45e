"""The calibration cache: a rebuilt model is the calibrated model, keys hash only what changes
calibration, and bad entries are never trusted."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.cache import CalibrationCache, cache_key
from pipeline.engine import qconfigs
from stages.calibrate import calibrate, prepare
from stages.load import load
from stages.lower import lower
from stages.reference_convert import reference_convert
from tests.conftest import compose_config, to_spec


@pytest.fixture(scope="module")
def calibrated_fbgemm():
    # fbgemm's default qconfig has per-channel weight observers, the case TORCH_FACTS warns about.
    spec = to_spec(compose_config(["backend=fbgemm"]))
    loaded = load(spec.model, spec.data, spec.seed)
    calibrated = calibrate(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.calibrate)
    return spec, loaded, calibrated


def _key(spec, loaded) -> str:
    return cache_key(spec, loaded.model, [x for x, _ in loaded.data.calibration[: spec.calibrate.max_batches]])


def test_model_rebuilt_from_cache_is_identical_per_channel_observers_included(calibrated_fbgemm, tmp_path) -> None:
    spec, loaded, calibrated = calibrated_fbgemm
    cache = CalibrationCache(tmp_path)
    key = _key(spec, loaded)
    entry = cache.store(key, calibrated.model, {})
    # The entry holds the observers only; the weights come back from the float model.
    stored = torch.load(entry / "observer_state.pt", weights_only=True)
    assert stored and all("activation_post_process" in k for k in stored)
    assert not any(k.endswith(".weight") and "activation_post_process" not in k for k in stored)
    # The module versions travel with the state (observers that see no version assume an old layout,
    # torchao's reset eps): the saved state carries state_dict()'s _metadata, through torch.save too.
    expected_metadata = calibrated.model.state_dict()._metadata
    observer = next(k for k in stored).rsplit(".", 1)[0]
    assert stored._metadata[observer] == expected_metadata[observer]
    assert "version" in stored._metadata[observer]
    rebuilt = cache.load(key, lambda: prepare(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config))
    assert rebuilt is not None
    assert rebuilt.code == calibrated.model.code
    original_state, rebuilt_state = calibrated.model.state_dict(), rebuilt.state_dict()
    assert original_state.keys() == rebuilt_state.keys()
    assert all(torch.equal(original_state[k], rebuilt_state[k]) for k in original_state)
    x = torch.cat([x.args[0] for x, _ in loaded.data.evaluation])
    converted = []
    for model in (calibrated.model, rebuilt):
        from stages.types import Calibrated

        reference = reference_convert(
            Calibrated(model, 0, 0), spec.backend, spec.qconfig_mapping, spec.skip, spec.custom_config
        )
        converted.append(lower(reference, spec.backend, loaded.data.example_inputs).model)
    with qconfigs.quantized_engine("fbgemm"), torch.no_grad():
        assert torch.equal(converted[0](x), converted[1](x))
    assert converted[0].code == converted[1].code
    # Weight observers are per-channel here; they run at convert time, from the rebuilt model too.
    per_channel = 0
    for (name, a), (_, b) in zip(converted[0].named_modules(), converted[1].named_modules(), strict=True):
        if callable(getattr(a, "weight", None)):
            wa, wb = a.weight(), b.weight()
            per_channel += wa.qscheme() == torch.per_channel_affine
            assert torch.equal(wa.int_repr(), wb.int_repr()), name
            assert torch.equal(wa.q_per_channel_scales(), wb.q_per_channel_scales()), name
    assert per_channel >= 6


def test_key_changes_with_what_changes_calibration_and_nothing_else(calibrated_fbgemm) -> None:
    spec, loaded, _ = calibrated_fbgemm
    base = _key(spec, loaded)
    same = [
        to_spec(compose_config(["backend=fbgemm", "skip=add"])),
        to_spec(compose_config(["backend=fbgemm", "evaluate.latency.repeats=3", "export.onnx=false"])),
    ]
    assert all(_key(other, loaded) == base for other in same)
    different = [
        to_spec(compose_config(["backend=qnnpack"])),
        to_spec(compose_config(["backend=fbgemm", "qconfig_mapping=minmax_per_channel"])),
        to_spec(compose_config(["backend=fbgemm", "calibrate.max_batches=2"])),
    ]
    assert len({base, *(_key(other, loaded) for other in different)}) == 4
    changed_weights = replace(loaded, model=__import__("copy").deepcopy(loaded.model))
    with torch.no_grad():
        changed_weights.model.fc.bias[0] += 1e-3
    assert _key(spec, changed_weights) != base
    other_data = [x.args[0] + 1e-3 for x, _ in loaded.data.calibration]
    assert cache_key(spec, loaded.model, other_data) != base


@pytest.mark.parametrize("damage", ["truncate", "manifest_key", "garbage_state"])
def test_a_damaged_entry_is_reported_removed_and_not_trusted(
    calibrated_fbgemm, tmp_path: Path, caplog, damage: str
) -> None:
    spec, loaded, calibrated = calibrated_fbgemm
    cache = CalibrationCache(tmp_path)
    key = _key(spec, loaded)
    entry = cache.store(key, calibrated.model, {})
    state = entry / "observer_state.pt"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "manifest_key":
        manifest = json.loads((entry / "manifest.json").read_text())
        (entry / "manifest.json").write_text(json.dumps({**manifest, "key": "someone-else"}))
    else:  # a well-formed file whose checksum matches but whose content does not fit the model
        torch.save({"not": torch.zeros(1)}, state)
        manifest = json.loads((entry / "manifest.json").read_text())
        import hashlib

        manifest["sha256"] = hashlib.sha256(state.read_bytes()).hexdigest()
        (entry / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        loaded_model = cache.load(key, lambda: prepare(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config))
    assert loaded_model is None
    assert not entry.exists()
    assert any("corrupt or incompatible" in r.message and key in r.message for r in caplog.records)


def test_half_written_entries_are_never_read(calibrated_fbgemm, tmp_path: Path) -> None:
    spec, loaded, calibrated = calibrated_fbgemm
    cache = CalibrationCache(tmp_path)
    key = _key(spec, loaded)
    # What a run killed mid-write leaves: a temporary folder, never the key's folder.
    leftover = tmp_path / f".tmp-{key}-killed"
    leftover.mkdir()
    torch.save(calibrated.model.state_dict(), leftover / "observer_state.pt")
    assert cache.load(key, lambda: pytest.fail("must not rebuild from a temp folder")) is None
    cache.store(key, calibrated.model, {})
    cache.store(key, calibrated.model, {})  # a second writer of the same key loses the race quietly
    assert sorted(p.name for p in (tmp_path / key).iterdir()) == ["manifest.json", "observer_state.pt"]


def test_the_next_run_under_the_key_lock_removes_a_hard_killed_writers_leftover(tmp_path: Path) -> None:
    cache = CalibrationCache(tmp_path)
    leftover = tmp_path / ".tmp-abc-killed"
    other_key = tmp_path / ".tmp-xyz-writing"  # another key's writer may still be alive: left alone
    for folder in (leftover, other_key):
        folder.mkdir()
        (folder / "observer_state.pt").write_bytes(b"half")
    with cache.lock("abc"):
        assert not leftover.exists()
    assert other_key.is_dir()


def test_a_kill_between_writing_and_renaming_leaves_nothing_trusted(
    calibrated_fbgemm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, loaded, calibrated = calibrated_fbgemm
    cache = CalibrationCache(tmp_path)
    key = _key(spec, loaded)

    def killed_at_rename(source: object, target: object) -> None:
        assert sorted(p.name for p in Path(str(source)).iterdir()) == ["manifest.json", "observer_state.pt"]
        raise KeyboardInterrupt  # the temp folder is complete; the rename never happens

    monkeypatch.setattr("pipeline.cache.os.rename", killed_at_rename)
    with pytest.raises(KeyboardInterrupt):
        cache.store(key, calibrated.model, {})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # neither the key's folder nor the temporary one
    assert cache.load(key, lambda: pytest.fail("nothing to rebuild from")) is None
    cache.store(key, calibrated.model, {})  # the next run rebuilds it
    prepare_again = lambda: prepare(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config)  # noqa: E731
    assert cache.load(key, prepare_again) is not None


def test_cached_calibration_keeps_bias_corrections_float_statistics(tmp_path: Path) -> None:
    """The float statistics the calibration records for bias correction travel with the cache entry, so a
    cache hit's bias correction runs no float pass; an entry whose statistics file was altered serves its
    observers without them."""
    from pipeline.engine import bias_correction

    spec = to_spec(compose_config([]))
    loaded = load(spec.model, spec.data, spec.seed)
    run = (spec.backend, spec.qconfig_mapping, spec.custom_config, spec.calibrate, spec.recovery)
    calibrated = calibrate(loaded, *run)
    digests, statistics = calibrated.model.meta[bias_correction.FLOAT_MEANS]
    cache = CalibrationCache(tmp_path)
    key = _key(spec, loaded)
    entry = cache.store(key, calibrated.model, {})

    def rebuild() -> torch.nn.Module | None:
        args = (loaded, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.recovery)
        return cache.load(key, lambda: prepare(*args))

    rebuilt = rebuild()
    assert rebuilt is not None
    found_digests, found = rebuilt.meta[bias_correction.FLOAT_MEANS]
    assert found_digests == digests and found.macs_per_sample == statistics.macs_per_sample
    for name, mean in statistics.outputs.items():
        assert torch.equal(found.outputs[name], mean) and torch.equal(found.inputs[name], statistics.inputs[name])
    torch.save({"digests": [], "outputs": {}, "inputs": {}, "macs_per_sample": 0.0}, entry / "float_statistics.pt")
    tampered = rebuild()
    assert tampered is not None and bias_correction.FLOAT_MEANS not in tampered.meta
