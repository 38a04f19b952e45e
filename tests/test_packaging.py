"""A non-editable install carries its configs: `python -m pipeline` runs from any folder."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# What a source distribution would not hold, or would only make the copy slow.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "outputs", "build", "*.egg-info", "__pycache__", ".*_cache")


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_runs_from_an_unrelated_folder(tmp_path: Path) -> None:
    # Build from a copy, so the checkout gets no build/ or egg-info; with this venv's setuptools, offline.
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE, symlinks=True)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", "./source"], tmp_path
    )
    (wheel,) = (tmp_path / "dist").glob("fx_quant_pipeline-*.whl")

    # A fresh venv that sees this venv's packages (torch, hydra, mlflow) after its own, through a plain path
    # line: the .pth files there (this checkout's editable install) are not processed, so `pipeline` can only
    # come from the wheel.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    own_site = Path(_run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], tmp_path).stdout.strip())
    (own_site / "shared_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        tmp_path,
        env,
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import pipeline; print(pipeline.__file__)"], elsewhere, env).stdout.strip()
    assert Path(where).is_relative_to(own_site), where
    assert (own_site / "pipeline" / "conf" / "config.yaml").is_file()
    assert not (own_site / "pipeline" / "conf").is_symlink()  # real files, not a link back to a checkout
    out = tmp_path / "out"
    _run([str(python), "-m", "pipeline", "stages=[load]", "tracking=off", f"output_dir={out}"], elsewhere, env)
    (run_dir,) = (out / "runs").iterdir()
    assert (run_dir / "load" / "float_model.txt").is_file() and (run_dir / "load" / "data.json").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing written where it ran


def test_the_readme_quick_start_commands_are_what_ci_runs() -> None:
    quick_start = (REPO_ROOT / "README.md").read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in quick_start.splitlines() if line.startswith("python3 -m venv .venv")]
    lines = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    ci = [line for line in lines if line.startswith("python3 ")]
    # Its last line runs the suite; the lines before may only install extras (the [hf] one, so its tests run).
    assert (
        lines[-1]
        == ci[-1]
        == "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    )
    assert all("pytest" not in line and "pip install" in line for line in ci[:-1])
    assert ci[-1] in commands  # the README's test command, verbatim
    # The run command installs the same way, without the test extra.
    assert ci[-1].replace("'.[test]'", ".").replace("-m pytest", "-m pipeline") in commands
