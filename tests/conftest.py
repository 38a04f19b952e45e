"""Fixtures: configs composed with Hydra's compose API from the real conf/, runs under tmp_path."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pipeline import schema
from pipeline.validation import validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
REPO_ROOT = CONF_DIR.parent

# Small and quick: the suite checks behaviour, bench/ measures speed.
FAST = [
    "evaluate.latency.repeats=3",
    "evaluate.latency.warmup=1",
    "evaluate.latency.budget_s=0.2",
    "evaluate.latency.batch_sizes=[1,8]",
]

# run_pipeline's runs also skip diagnose (a second or two a run) unless a test turns it on: a test that reads
# diagnose's outputs says diagnose.enabled=true or lists diagnose in stages. Not in FAST: the config fuzz
# composes FAST with every diagnose field.
RUN_FAST = [*FAST, "diagnose.enabled=false"]

schema.register()

# Subprocesses (CLI sweeps, fresh-process reloads) inherit this: on a shared 2-core machine running tests in
# parallel workers, a child computing on every core oversubscribes them (tests check behaviour, not speed).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A folder every pytest-xdist worker of this session shares (the template MLflow store lives there).
SESSION_ROOT = "FXQ_TEST_SESSION_ROOT"


@pytest.fixture(scope="session", autouse=True)
def session_root(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """Under xdist each worker has its own basetemp (.../pytest-N/popen-gwK): their parent is shared."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if hasattr(request.config, "workerinput") else base
    os.environ[SESSION_ROOT] = str(root)
    return root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With `--dist loadgroup`, tests that share a module-scoped fixture (a trained model, a finished run)
    stay on one worker, so the fixture is built once; every other test goes to whichever worker is free,
    which spreads the slow sweeps of one file over both cores."""
    for item in items:
        fixture_info = getattr(item, "_fixtureinfo", None)
        defs = fixture_info.name2fixturedefs.values() if fixture_info is not None else []
        if any(d.scope == "module" for fixturedefs in defs for d in fixturedefs):
            item.add_marker(pytest.mark.xdist_group(item.path.name))


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The run config exactly as `python -m pipeline <overrides>` would compose it."""
    extra = [f"output_dir={output_dir}"] if output_dir is not None else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*extra, *overrides], return_hydra_config=False)


def to_spec(cfg: DictConfig) -> schema.PipelineSpec:
    return schema.from_config(cfg)


@pytest.fixture(autouse=True)
def restore_torch_state() -> Iterator[None]:
    """Tests may switch the quantized engine or thread count; put them back. Each test computes on one
    thread: on a shared 2-core machine more threads oversubscribe the cores (a training test took 278 s
    at load 6 against 6 s quiet), and tests check behaviour, not speed."""
    engine, threads = torch.backends.quantized.engine, torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.backends.quantized.engine = engine
    torch.set_num_threads(threads)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _unless_set(defaults: list[str], overrides: list[str]) -> list[str]:
    """The defaults whose key the overrides do not set (Hydra refuses a key given twice)."""
    keys = {_key(override) for override in overrides}
    return [default for default in defaults if _key(default) not in keys]


def run_pipeline_in(folder: Path, overrides: list[str], fast: bool = True) -> tuple[schema.PipelineSpec, object, Path]:
    """Run the pipeline in-process like the CLI does (validate, then runner.run) with output_dir=folder; a
    module-scoped fixture calls this with a folder from tmp_path_factory to share one run between tests."""
    from pipeline import runner

    cfg = compose_config([*(_unless_set(RUN_FAST, overrides) if fast else []), *overrides], output_dir=folder)
    spec = to_spec(cfg)
    validate(spec)
    if spec.tracking.enabled and spec.tracking.tracking_uri == f"sqlite:///{folder}/mlflow.db":
        from tests.helpers import seed_store  # helpers import this module: imported late

        seed_store(folder)
    run_dir = folder / "run"
    state = runner.run(spec, cfg, run_dir)
    return spec, state, run_dir


@pytest.fixture
def run_pipeline(tmp_path: Path) -> Callable[..., tuple[schema.PipelineSpec, object, Path]]:
    """Run the pipeline in-process like the CLI does (validate, then runner.run) under tmp_path."""

    def _run(overrides: list[str], fast: bool = True) -> tuple[schema.PipelineSpec, object, Path]:
        return run_pipeline_in(tmp_path, overrides, fast)

    return _run
