"""The composed config: every shipped option validates, and bad names fail early and clearly."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import schema
from pipeline.errors import ConfigError
from pipeline.validation import validate
from tests.conftest import CONF_DIR, REPO_ROOT, compose_config, to_spec


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def test_default_config_validates_and_runs_all_stages_in_order() -> None:
    spec = to_spec(compose_config([]))
    assert [stage.NAME for stage in validate(spec)] == [
        "load",
        "calibrate",
        "reference_convert",
        "lower",
        "evaluate",
        "export",
        "diagnose",  # the analysis last: the run's files never wait for it
    ]
    assert spec.backend.engine == "x86"
    assert spec.skip.name == "none"
    assert spec.tracking.tracking_uri == "sqlite:///outputs/mlflow.db"


# Options with `???` keys the user must set (values here only need to compose and validate).
REQUIRED_KEYS = {
    "model=custom": ["model.factory._target_=stages.sources.digits.digits_cnn"],
    "data=image_folder": ["data.factory.root=images"],
    "data=tensor_file": ["data.factory.path=inputs.pt"],
    "data=custom": ["data.factory._target_=stages.sources.digits.digits_data"],
    "model=hf_encoder": ["model.factory.path=my_bert"],
    "data=text_file": ["data.factory.path=sentences.txt", "data.factory.tokenizer=my_bert"],
}


@pytest.mark.parametrize(
    "group",
    ["backend", "qconfig_mapping", "skip", "custom_config", "model", "data", "evaluate", "export", "tracking"],
)
def test_every_shipped_option_of_a_group_composes_and_validates(group: str) -> None:
    options = _options(group)
    assert options, f"conf/{group}/ is empty"
    for option in options:
        spec = to_spec(compose_config([f"{group}={option}", *REQUIRED_KEYS.get(f"{group}={option}", [])]))
        validate(spec)


def test_every_backend_names_its_engine_and_backend_config() -> None:
    for option in _options("backend"):
        spec = to_spec(compose_config([f"backend={option}"]))
        assert spec.backend.engine == option
        assert spec.backend.backend_config in schema.BACKEND_CONFIGS


def test_unknown_qconfig_name_is_a_config_error_naming_key_value_and_choices() -> None:
    spec = to_spec(compose_config(["qconfig_mapping.global_qconfig=histogrm_per_channel"]))
    with pytest.raises(ConfigError) as error:
        validate(spec)
    message = str(error.value)
    assert "qconfig_mapping.global_qconfig='histogrm_per_channel'" in message
    assert "minmax_per_tensor" in message  # lists what is valid
    assert "Did you mean 'histogram_per_channel'" in message


def test_unknown_object_type_import_path_is_a_config_error() -> None:
    spec = to_spec(compose_config(["skip.object_type=[torch.nn.Conv9d]"]))
    with pytest.raises(ConfigError, match=r"skip.object_type\[0\]='torch.nn.Conv9d' is not an importable"):
        validate(spec)


def test_unknown_engine_is_a_config_error() -> None:
    spec = to_spec(compose_config(["backend.engine=fbgem"]))
    with pytest.raises(ConfigError, match=r"backend.engine='fbgem'.*Did you mean 'fbgemm'"):
        validate(spec)


def test_a_null_artifact_location_needs_a_tracking_server() -> None:
    with pytest.raises(ConfigError, match=r"tracking.artifact_location=null .* tracking.tracking_uri='sqlite:"):
        validate(to_spec(compose_config(["tracking.artifact_location=null"])))
    served = ["tracking.artifact_location=null", "tracking.tracking_uri=http://mlflow-host:5000"]
    validate(to_spec(compose_config(served)))  # the server chooses; checked for reachability at run start


def test_unknown_key_hint_names_the_valid_keys_only_for_keys_the_schema_lacks() -> None:
    hint = schema.unknown_key_hint("cache.enbled=false")
    assert hint is not None and "cache has no 'enbled'. Did you mean 'enabled'?" in hint and "'dir'" in hint
    assert "the top level has no 'evalute'" in (schema.unknown_key_hint("evalute.models=[float]") or "")
    for fine in ("cache.enabled=false", "backend=fbgem", "model.factory.width=8", "+foo=1", "hydra.verbose=true"):
        assert schema.unknown_key_hint(fine) is None, fine


def test_stage_names_and_dependencies_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"stages\[1\]='calibration' is not a stage.*Did you mean 'calibrate'"):
        validate(to_spec(compose_config(["stages=[load,calibration]"])))
    with pytest.raises(ConfigError, match=r"runs 'lower' without \['reference_convert'\]"):
        validate(to_spec(compose_config(["stages=[load,calibrate,lower]"])))
    with pytest.raises(ConfigError, match=r"runs 'export' without \['lower'\], which it reads from \(lowered\)"):
        validate(to_spec(compose_config(["stages=[load,calibrate,export]"])))
    # diagnose is on by default but needs lower: dropped from a run that stops at calibrate, not an error.
    assert [s.NAME for s in validate(to_spec(compose_config(["stages=[load,calibrate]"])))] == [
        "load",
        "calibrate",
    ]
    planned = validate(to_spec(compose_config(["stages=[load]", "inspect.enabled=true"])))
    assert [s.NAME for s in planned] == ["load", "inspect"]
    planned = validate(to_spec(compose_config(["search=greedy", "diagnose.enabled=false"])))
    assert [s.NAME for s in planned][:4] == ["load", "calibrate", "search", "reference_convert"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.slow
def test_cli_bad_backend_fails_before_any_work(tmp_path: Path) -> None:
    result = _cli(["backend=fbgem", f"output_dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 2  # Hydra's own message, our exit code for bad input
    output = result.stdout + result.stderr
    assert "fbgem" in output and "fbgemm" in output and "qnnpack" in output
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cli_bad_qconfig_name_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    result = _cli(["qconfig_mapping.global_qconfig=nope", f"output_dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "Invalid config: qconfig_mapping.global_qconfig='nope' is not a known qconfig" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+foo=1", "foo=1 names no config key. The keys here (PipelineSpec) are ['backend', "),
        (
            "+evaluate.latency.thread=2",
            "evaluate.latency.thread=2 names no config key. Did you mean 'threads'? The keys here (LatencySpec) are",
        ),
        (
            "skip.module_name_object_type_order=[{module_name:block1,object_type:operator.add}]",
            "skip.module_name_object_type_order[0].index has no value and is required (it is ??? in the config); "
            "set it, e.g. skip.module_name_object_type_order[0].index=<value>. Every "
            "ModuleNameObjectTypeOrderEntry needs ['module_name', 'object_type', 'index'].",
        ),
    ],
)
def test_added_keys_and_missing_required_values_are_config_errors(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        schema.from_config(compose_config([override]))
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "model.factory._target_=stages.sources.digits.digits_cnm",
            "model.factory._target_='stages.sources.digits.digits_cnm': module 'stages.sources.digits' ",
        ),
        ("data.factory._target_=nowhere.data", "data.factory._target_='nowhere.data' does not resolve: no module"),
        ("+model.factory.widht=8", "model.factory does not fit stages.sources.digits.digits_cnn(checkpoint"),
    ],
)
def test_factories_that_do_not_resolve_or_fit_fail_validation(override: str, expected: str) -> None:
    spec = schema.from_config(compose_config([override]))
    with pytest.raises(ConfigError) as error:
        validate(spec)
    assert expected in str(error.value)
    if "widht" in override:
        assert "got an unexpected keyword argument 'widht'" in str(error.value)
    if "digits_cnm" in override:
        assert "has no attribute 'digits_cnm'. Did you mean 'digits_cnn'" in str(error.value)
    if "nowhere" in override:
        assert "set data.python_path to the folder that holds it" in str(error.value)


def test_an_engine_this_build_cannot_run_fails_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["qnnpack", "none"])
    with pytest.raises(ConfigError) as error:
        validate(to_spec(compose_config(["backend=x86"])))
    assert str(error.value) == (
        "backend.engine='x86' is not supported by this torch build on this CPU; supported engines here are ['qnnpack']."
    )
    validate(to_spec(compose_config(["backend=qnnpack"])))


@pytest.mark.parametrize("vnni", [False, True])
def test_onednn_without_vnni_warns_of_accuracy(monkeypatch: pytest.MonkeyPatch, caplog, vnni: bool) -> None:
    import torch

    from stages import calibrate

    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni)
    for backend in ("onednn", "x86"):
        calibrate.check(to_spec(compose_config([f"backend={backend}"])))
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    if vnni:
        assert warnings == []
    else:
        (warning,) = warnings
        assert warning.startswith("backend=onednn on a CPU without VNNI") and "pytorch#103646" in warning


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("evaluate.latncy.threads=2", "evaluate has no 'latncy'. Did you mean 'latency'? The keys of evaluate"),
        ("skip=unknown_key", "Key 'object_typ' not in 'SkipSpec'"),
        ("+foo=1", "Invalid config: foo=1 names no config key."),
        (
            "model.factory._target_=nowhere.model",
            "Invalid config: model.factory._target_='nowhere.model' does not resolve",
        ),
        ("tracking.tracking_uri=http://127.0.0.1:{port}", "Invalid input: tracking.tracking_uri='http://127.0.0.1:"),
    ],
)
def test_cli_bad_input_is_a_short_message_exit_2_and_no_run(tmp_path: Path, override: str, expected: str) -> None:
    # A conf/skip option with a typo'd key, found through Hydra's search path like a user's own conf.
    (tmp_path / "conf" / "skip").mkdir(parents=True)
    (tmp_path / "conf" / "skip" / "unknown_key.yaml").write_text("name: unknown_key\nobject_typ: [operator.add]\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [override.format(port=port), f"output_dir={tmp_path}", f"hydra.searchpath=[file://{tmp_path}/conf]"]
    result = _cli(args, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert expected in output
    assert "Traceback" not in output and len(output.strip().splitlines()) <= 10
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
    for run_dir in (tmp_path / "runs").glob("*"):  # Hydra's folder and the job log, nothing else
        assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "__main__.log"]
        assert "Traceback" in (run_dir / "__main__.log").read_text()  # at debug level, for the curious
