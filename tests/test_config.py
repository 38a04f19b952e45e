"""The composed config: every shipped option validates, and bad names fail early and clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import schema
from tests.conftest import CONF_DIR, REPO_ROOT, compose_config, to_spec


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def test_default_config_validates_and_runs_all_stages_in_order() -> None:
    spec = to_spec(compose_config([]))
    schema.validate(spec)
    assert spec.stages == list(schema.STAGES)
    assert spec.backend.engine == "x86"
    assert spec.skip.name == "none"
    assert spec.tracking.tracking_uri == "sqlite:///outputs/mlflow.db"


# Options with `???` keys the user must set (values here only need to compose and validate).
REQUIRED_KEYS = {
    "model=custom": ["model.factory._target_=stages.sources.digits.digits_cnn"],
    "data=image_folder": ["data.factory.root=images"],
    "data=tensor_file": ["data.factory.path=inputs.pt"],
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
        schema.validate(spec)


def test_every_backend_names_its_engine_and_backend_config() -> None:
    for option in _options("backend"):
        spec = to_spec(compose_config([f"backend={option}"]))
        assert spec.backend.engine == option
        assert spec.backend.backend_config in schema.BACKEND_CONFIGS


def test_unknown_qconfig_name_is_a_config_error_naming_key_value_and_choices() -> None:
    spec = to_spec(compose_config(["qconfig_mapping.global_qconfig=histogrm_per_channel"]))
    with pytest.raises(schema.ConfigError) as error:
        schema.validate(spec)
    message = str(error.value)
    assert "qconfig_mapping.global_qconfig='histogrm_per_channel'" in message
    assert "minmax_per_tensor" in message  # lists what is valid
    assert "Did you mean 'histogram_per_channel'" in message


def test_unknown_object_type_import_path_is_a_config_error() -> None:
    spec = to_spec(compose_config(["skip.object_type=[torch.nn.Conv9d]"]))
    with pytest.raises(schema.ConfigError, match=r"skip.object_type\[0\]='torch.nn.Conv9d' is not an importable"):
        schema.validate(spec)


def test_unknown_engine_is_a_config_error() -> None:
    spec = to_spec(compose_config(["backend.engine=fbgem"]))
    with pytest.raises(schema.ConfigError, match=r"backend.engine='fbgem'.*Did you mean 'fbgemm'"):
        schema.validate(spec)


def test_stage_names_and_dependencies_are_checked() -> None:
    with pytest.raises(schema.ConfigError, match=r"stages\[1\]='calibration'"):
        schema.validate(to_spec(compose_config(["stages=[load,calibration]"])))
    with pytest.raises(schema.ConfigError, match=r"runs 'lower' without \['reference_convert'\]"):
        schema.validate(to_spec(compose_config(["stages=[load,calibrate,lower]"])))
    schema.validate(to_spec(compose_config(["stages=[load,calibrate]"])))


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
    assert result.returncode != 0
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
