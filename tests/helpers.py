"""Helpers shared by test modules (not a test module itself): a command-line sweep and what it leaves."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from mlflow.tracking import MlflowClient

from tests.browser import free_port
from tests.conftest import REPO_ROOT, SESSION_ROOT

# No sweep test reads diagnose's outputs (its ~2 s a job; tests/test_end_to_end.py and test_diagnose*.py do),
# nor the reference model's evaluation (the sweep report's columns are the float and lowered models').
SWEEP_FAST = [
    "evaluate.latency.repeats=3",
    "evaluate.latency.warmup=1",
    "evaluate.latency.budget_s=0.2",
    "evaluate.latency.batch_sizes=[1]",
    "evaluate.models=[float,lowered]",
    "export.onnx=false",
    "export.torchscript=none",
    "diagnose.enabled=false",
]
# For sweeps whose assertions read no latency figure (the report is still written, its speed columns empty).
SWEEP_UNTIMED = [*SWEEP_FAST, "evaluate.latency.enabled=false"]


_STORE_TEMPLATE: list[Path] = []  # this process's copy of the session's template, once found


def _template_store() -> Path:
    """The session's template MLflow store, created once for all pytest-xdist workers: the first worker to
    get the lock creates it (under the session root conftest exports), the others wait and reuse it."""
    if _STORE_TEMPLATE:
        return _STORE_TEMPLATE[0]
    root = Path(os.environ.get(SESSION_ROOT) or tempfile.mkdtemp(prefix="fxq-tests-")) / "mlflow-template"
    root.mkdir(parents=True, exist_ok=True)
    template = root / "mlflow.db"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not template.exists():
            staging = root / "staging.db"
            staging.unlink(missing_ok=True)
            MlflowClient(tracking_uri=f"sqlite:///{staging}").search_experiments()
            staging.rename(template)  # complete or absent: a crashed creator leaves no half store
    _STORE_TEMPLATE.append(template)
    return template


def seed_store(folder: Path) -> Path:
    """Put an MLflow SQLite store whose tables already exist at folder/mlflow.db (where the default
    tracking config looks for output_dir=folder): creating the tables runs ~60 alembic migrations, 3-20 s
    here; copying a store made once per session costs nothing. A store already there is kept."""
    target = folder / "mlflow.db"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(_template_store(), target)
    return target


def sweep(tmp_path: Path, *overrides: str, fast: list[str] = SWEEP_FAST) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline -m <overrides> <fast>` with output_dir=tmp_path (its store seeded). Hydra refuses a
    key given twice: a test that wants another value of a SWEEP_FAST key passes its own `fast`."""
    seed_store(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "-m", *overrides, *fast, f"output_dir={tmp_path}"],
        cwd=tmp_path,  # nothing lands in the checkout
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )


def parent_and_children(tmp_path: Path):
    """The sweep's one MLflow parent run and its nested job runs, from the store under tmp_path."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("fx-ptq").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], children


def report_rows(tmp_path: Path) -> list[dict[str, str]]:
    """The rows of the sweep's report.csv."""
    (report,) = tmp_path.glob("multirun/*/report/report.csv")
    with report.open() as file:
        return list(csv.DictReader(file))


def check_one_failing_job(tmp_path: Path, *launcher: str) -> None:
    """A two-job sweep whose second job fails (the everything-float skip makes `lower` refuse it):
    the other job finishes and is in the store, the parent fails, the report marks the failed row."""
    skips = ["skip.module_name_regex=[],[.*]", "skip.object_type=[operator.add]"]
    result = sweep(tmp_path, *launcher, "backend=x86", *skips, fast=SWEEP_UNTIMED)
    assert result.returncode != 0
    _, parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FAILED"
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    (failed,) = [c for c in children if c.info.status == "FAILED"]
    assert failed.data.tags["failed_stage"] == "lower" and failed.data.tags["override.skip.module_name_regex"] == "[.*]"
    (finished,) = [c for c in children if c.info.status == "FINISHED"]
    assert finished.data.metrics["eval/lowered/accuracy"] > 0.9
    rows = {row["status"]: row for row in report_rows(tmp_path)}
    assert sorted(rows) == ["FAILED", "FINISHED"]


# The start of a child process's script for the streaming memory tests: a lazy generated set (each sample
# made from its index, nothing held; argv[1] evaluation batches of 64 3x64x64 inputs), a tiny conv net and
# its calibration (`data`, `model`, `backend`, `mapping`, `custom`, `calibration`, `prepared`). A test appends
# the stage it measures and prints one JSON line.
GENERATED_SET_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from torch import nn
    from pipeline.batches import DatasetBatches
    from pipeline.engine import steps
    from pipeline.schema import BackendSpec, CustomConfigSpec, QConfigMappingSpec
    from stages.types import DataBundle

    class Generated:
        '''Samples made from their index on demand: nothing is held, the set costs no memory of its own.'''
        def __len__(self):
            return 1 << 20
        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            return torch.randn(3, 64, 64, generator=generator), None

    torch.set_num_threads(1)
    torch.manual_seed(0)
    batches = int(sys.argv[1])
    data = DataBundle(
        "generated",
        DatasetBatches(Generated(), range(64), 16, identity="calibration"),
        DatasetBatches(Generated(), range(64, 64 + 64 * batches), 64, identity="evaluation"),
        None,
        False,
    )
    layers = [nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    model = nn.Sequential(*layers, nn.Linear(8, 4)).eval()
    backend = BackendSpec(engine="x86", backend_config="x86")
    mapping, custom = QConfigMappingSpec(), CustomConfigSpec()
    calibration = [inputs for inputs, _ in data.calibration]
    prepared = steps.recalibrate(model, data.example_inputs, "tiny", backend, mapping, custom, None, calibration)
    """
)


# Runs a script once per argument in one process (sys.argv[1] set to each in turn, fresh globals each time):
# a memory test compares the max RSS after a small and then a large set without paying a second process's
# imports; the large run's max RSS can only exceed the small one's by what it holds beyond the small peak.
# Not for diagnose's memory test: there the second run's max RSS rose 13-17 MB in one process (2 MB in two),
# too near its 30 MB bound.
_EACH_ARGUMENT = """
import gc, sys
code = compile(sys.argv[1], "<child>", "exec")
for argument in sys.argv[2:]:
    sys.argv[1:] = [argument]
    exec(code, {"__name__": "__main__"})
    gc.collect()
"""


def _python_child(arguments: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    """`python <arguments>` in a fresh process on one thread, with the checkout at `root`; it must exit 0."""
    result = subprocess.run(
        [sys.executable, *arguments],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_once_per_argument(script: str, arguments: list[str], root: Path = REPO_ROOT) -> list[dict[str, float]]:
    """`script` run for each argument in turn (as its sys.argv[1]) in one fresh process, with the checkout at
    `root`; the JSON line each run printed last, in order."""
    result = _python_child(["-c", _EACH_ARGUMENT, script, *arguments], root)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(arguments), result.stdout[-3000:]
    return [json.loads(line) for line in lines]


def run_generated_sets_in_one_child(stage_script: str, batches: list[int]) -> list[dict[str, float]]:
    """GENERATED_SET_CHILD + stage_script on each count of evaluation batches in turn, in one fresh process."""
    return run_once_per_argument(GENERATED_SET_CHILD + textwrap.dedent(stage_script), [str(n) for n in batches])


def run_generated_set_child(stage_script: str, batches: int, root: Path = REPO_ROOT) -> dict[str, float]:
    """Run GENERATED_SET_CHILD + stage_script in a fresh process (its max RSS is its own) on `batches`
    evaluation batches, with the checkout at `root` (another one measures older code); its JSON line."""
    result = _python_child(["-c", GENERATED_SET_CHILD + textwrap.dedent(stage_script), str(batches)], root)
    return json.loads(result.stdout.strip().splitlines()[-1])


def record_batches_refuse_joins(monkeypatch: pytest.MonkeyPatch, who: str) -> list[int]:
    """The streaming tests' probe: every model call's batch size is appended to the returned list, and
    ModelInputs.cat (joining batches) raises "<who> joined batches"."""
    from pipeline.batch import ModelInputs

    fed: list[int] = []
    call = ModelInputs.call

    def recorded(self: ModelInputs, target: torch.nn.Module) -> object:
        fed.append(self.batch_size)
        return call(self, target)

    def refused(parts: object) -> ModelInputs:
        raise AssertionError(f"{who} joined batches (ModelInputs.cat)")

    monkeypatch.setattr(ModelInputs, "call", recorded)
    monkeypatch.setattr(ModelInputs, "cat", staticmethod(refused))
    return fed


class LazyGenerated:
    """A data set of 3x16x16 samples made from their index on demand: a lazy source that holds nothing."""

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, index: int) -> tuple[torch.Tensor, None]:
        return torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(index)), None


@contextlib.contextmanager
def mlflow_server(args: list[str], cwd: Path) -> Iterator[str]:
    """`mlflow <args>` (ui or server, on 127.0.0.1) started and answering /health; yields its base URL."""
    port = free_port()
    args = [*args]
    args[args.index("--port") + 1] = str(port)
    assert args[args.index("--host") + 1] == "127.0.0.1"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"mlflow {args[0]} did not answer within 90 s"
            assert server.poll() is None, f"mlflow {args[0]} exited"
            time.sleep(1)
        yield base
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
