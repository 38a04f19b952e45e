"""The run folder (and the `skip` tag) name the skip-list that actually runs, not just the preset chosen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.schema import ModuleNameObjectTypeOrderEntry, SkipSpec, skip_label
from tests.conftest import CONF_DIR, REPO_ROOT, compose_config, to_spec


@pytest.mark.parametrize("preset", sorted(path.stem for path in (CONF_DIR / "skip").glob("*.yaml")))
def test_an_unchanged_preset_is_named_by_its_name(preset: str) -> None:
    skip = to_spec(compose_config([f"skip={preset}"])).skip
    assert skip_label(skip, preset=skip) == preset


def test_changed_or_presetless_entries_are_named_by_the_entries() -> None:
    first_last = to_spec(compose_config(["skip=first_last"])).skip
    none = to_spec(compose_config(["skip=none"])).skip
    fc = to_spec(compose_config(["skip.module_name=[fc]"])).skip
    assert fc.name == "none" and skip_label(fc, preset=none) == "module_name=fc"
    assert skip_label(SkipSpec(name="first_last", module_name=["fc"]), preset=first_last) == "module_name=fc"
    # A searched skip-list has no preset file: its entries name it.
    assert skip_label(SkipSpec(name="searched", module_name=["stem.0", "fc"])) == "module_name=stem.0,fc"
    assert skip_label(SkipSpec(name="first_last")) == "none"  # everything emptied: nothing stays float
    both = SkipSpec(name="x", object_type=["torch.nn.Linear"], module_name=["fc"])
    assert skip_label(both) == "object_type=torch.nn.Linear+module_name=fc"
    order = SkipSpec(
        name="x", module_name_object_type_order=[ModuleNameObjectTypeOrderEntry("block1", "operator.add", 0)]
    )
    assert skip_label(order) == "module_name_object_type_order=block1:operator.add:0"


def test_entries_unsafe_or_long_in_a_folder_name_get_a_stable_hash() -> None:
    regex = SkipSpec(name="block2_regex", module_name_regex=["block2\\..*"])
    label = skip_label(regex)
    assert label.startswith("custom-") and len(label) == len("custom-") + 8
    assert skip_label(SkipSpec(name="other", module_name_regex=["block2\\..*"])) == label  # entries, not name
    assert skip_label(SkipSpec(name="x", module_name_regex=["block1\\..*"])) != label
    many = SkipSpec(name="x", module_name=[f"features.{i}.conv" for i in range(10)])
    assert skip_label(many).startswith("custom-")


def _run_dir(overrides: list[str]) -> str:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    return Path(OmegaConf.select(cfg, "hydra.run.dir")).name


def test_the_run_folder_names_what_runs() -> None:
    # The folder is the MLflow run's name (schema.run_label), spaces as underscores.
    assert _run_dir(["backend=qnnpack"]).endswith("_digits_cnn_fx_qnnpack_backend_default_skip=none")
    assert _run_dir(["engine=pt2e"]).endswith("_digits_cnn_pt2e_x86_backend_default_skip=none")
    assert _run_dir(["skip=first_last"]).endswith("_fx_x86_backend_default_skip=first_last")
    same = ["skip=first_last", "skip.module_name=[stem.0,fc]"]
    assert _run_dir(same).endswith("_x86_backend_default_skip=first_last")
    assert _run_dir(["skip.module_name=[fc]"]).endswith("_x86_backend_default_skip=module_name=fc")
    assert _run_dir(["skip=first_last", "skip.module_name=[fc]"]).endswith("_skip=module_name=fc")
    assert _run_dir(["model=outlier_mlp", "search=greedy"]).endswith(
        "_outlier_mlp_fx_x86_backend_default_search=greedy"
    )


@pytest.mark.slow
def test_the_cli_run_folder_names_a_command_line_skip_list(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "stages=[load]",
            "tracking=off",
            "skip.module_name=[fc]",
            f"output_dir={tmp_path}",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("_x86_backend_default_skip=module_name=fc") and (run_dir / "load").is_dir()
