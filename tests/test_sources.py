"""Bring your own model and data: a factory in a user's own file, image folders, tensor files, torchvision."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.cache import cache_key
from pipeline.errors import ConfigError
from pipeline.schema import DataSpec, ModelSpec
from pipeline.validation import validate
from stages.load import load
from stages.sources.digits import _digits_tensors, _split_indices
from stages.sources.image_folder import image_folder_data
from stages.sources.tensor_file import tensor_file_data
from stages.sources.torchvision_models import import_torchvision
from tests.conftest import FAST, REPO_ROOT, compose_config, to_spec

USER_MODULE = "byo_user_net"
USER_CODE = '''"""A model in the user's own file, outside the pipeline package."""
import torch
from torch import nn


class UserMLP(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, width)
        self.relu = nn.ReLU()
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.hidden(torch.flatten(x, 1))))


def build(width: int = 64) -> UserMLP:
    return UserMLP(width)
'''


@pytest.fixture(autouse=True)
def clean_imports() -> Iterator[None]:
    """python_path changes sys.path and imports the user's module: undo both after each test."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name in [name for name in sys.modules if name.startswith(USER_MODULE)]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def user_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tmp/<dir>/my_project/byo_user_net.py: a user's model file outside the package."""
    project = tmp_path_factory.mktemp("user") / "my_project"
    project.mkdir()
    (project / f"{USER_MODULE}.py").write_text(USER_CODE)
    return project


@pytest.fixture(scope="module")
def trained_project(user_project: Path) -> Path:
    """The user's folder with a checkpoint next to the file, trained on the digits training part."""
    module_spec = importlib.util.spec_from_file_location("byo_user_net_training", user_project / f"{USER_MODULE}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    torch.manual_seed(0)
    images, labels = _digits_tensors()
    train = _split_indices(seed=0, calibration_size=256, evaluation_size=450)["training"]
    x, y = images[train], labels[train]
    model = module.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save(model.state_dict(), user_project / f"{USER_MODULE}.pt")
    return user_project


def _user_overrides(project: Path, checkpoint: bool = True) -> list[str]:
    return [
        "model=custom",
        f"model.factory._target_={USER_MODULE}.build",
        f"model.python_path=[{project}]",
        *([f"model.checkpoint={project / f'{USER_MODULE}.pt'}"] if checkpoint else []),
    ]


@pytest.mark.slow
def test_user_file_model_runs_end_to_end_through_the_cli(trained_project: Path, tmp_path: Path) -> None:
    # Run from the user's own directory with a relative python_path, as the README shows; PYTHONPATH only
    # stands in for an installed pipeline (this checkout), the user's folder is reached through python_path.
    workdir = trained_project.parent
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "model=custom",
            f"model.factory._target_={USER_MODULE}.build",
            "model.python_path=[my_project]",
            f"model.checkpoint=my_project/{USER_MODULE}.pt",
            "model.name=user_mlp",
            f"output_dir={tmp_path}",
            *FAST,
            # MLflow tracking of the user's model: test_user_file_model_runs_in_process (starting MLflow
            # costs a CLI process seconds); diagnose: no assertion reads it.
            "tracking=off",
            "diagnose.enabled=false",
        ],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "[6/6] export done" in run.stdout
    (metrics_file,) = tmp_path.glob("runs/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["eval/float/accuracy"] >= 0.9
    assert metrics["eval/lowered/accuracy"] >= metrics["eval/float/accuracy"] - 0.02
    assert "model=user_mlp" in run.stdout


@pytest.mark.slow
def test_user_file_model_runs_in_process(trained_project: Path, run_pipeline) -> None:
    spec, state, run_dir = run_pipeline(
        [
            *_user_overrides(trained_project),
            "stages=[load,calibrate,reference_convert,lower,evaluate]",
            "evaluate.latency.enabled=false",  # tracking on (MLflow, a seeded store): the CLI test runs it off
        ]
    )
    metrics = state.metrics
    assert type(state.artifacts["loaded"].model).__module__ == USER_MODULE
    assert metrics["eval/float/accuracy"] >= 0.9
    assert metrics["eval/lowered/accuracy"] >= metrics["eval/float/accuracy"] - 0.02
    assert metrics["cache/hit"] == 0.0


def test_cache_key_follows_the_user_files_source(user_project: Path, tmp_path: Path) -> None:
    spec = to_spec(compose_config(_user_overrides(user_project, checkpoint=False), output_dir=tmp_path))
    inputs = [torch.zeros(1, 1, 8, 8)]
    first = cache_key(spec, load(spec.model, spec.data, 0).model, inputs)
    assert cache_key(spec, load(spec.model, spec.data, 0).model, inputs) == first
    # Same module name, same weights, but an edited forward() in another folder: a different key, and the
    # newly listed folder wins over the module imported before.
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / f"{USER_MODULE}.py").write_text(USER_CODE.replace("self.relu(self.hidden", "torch.relu(self.hidden"))
    spec.model.python_path = [str(edited)]
    changed = load(spec.model, spec.data, 0).model
    assert Path(sys.modules[USER_MODULE].__file__).parent == edited
    assert cache_key(spec, changed, inputs) != first


def test_python_path_folder_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    spec = to_spec(compose_config(["model.python_path=[no_such_folder]"], output_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"model.python_path\[0\]='no_such_folder' is not a folder"):
        validate(spec)


def test_unresolved_target_names_the_folders_searched_and_what_to_set(tmp_path: Path) -> None:
    model = ModelSpec(name="mine", factory={"_target_": "not_my_net.build"}, python_path=[str(tmp_path)])
    with pytest.raises(ConfigError) as error:
        load(model, DataSpec(name="digits", factory={"_target_": "stages.sources.digits.digits_data"}), 0)
    text = str(error.value)
    assert "model.factory._target_='not_my_net.build' does not resolve" in text
    assert str(tmp_path.resolve()) in text
    assert "model.python_path=[path/to/folder]" in text


def test_missing_attribute_in_the_user_file_suggests_the_closest(user_project: Path) -> None:
    model = ModelSpec(name="mine", factory={"_target_": f"{USER_MODULE}.biuld"}, python_path=[str(user_project)])
    with pytest.raises(ConfigError, match=r"has no attribute 'biuld'.*Did you mean 'build'"):
        load(model, DataSpec(name="digits", factory={"_target_": "stages.sources.digits.digits_data"}), 0)


# ----- image folder -----


def _write_digit_pngs(root: Path, count: int, scale: int = 4) -> None:
    """The digits evaluation images as grayscale PNGs, upscaled (nearest), one folder per class."""
    from PIL import Image

    images, labels = _digits_tensors()
    evaluation = _split_indices(seed=0, calibration_size=256, evaluation_size=450)["evaluation"][:count]
    for index in evaluation:
        folder = root / f"digit_{int(labels[index])}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (images[index, 0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").resize((8 * scale, 8 * scale), Image.Resampling.NEAREST).save(
            folder / f"{index}.png"
        )


IMAGE_FOLDER_8X8 = [
    "data.factory.resize=8",
    "data.factory.crop=8",
    "data.factory.grayscale=true",
    "data.factory.mean=[0.0]",
    "data.factory.std=[1.0]",
    "data.factory.interpolation=box",
]


@pytest.mark.slow
def test_image_folder_runs_end_to_end_with_accuracy(tmp_path: Path, run_pipeline) -> None:
    root = tmp_path / "images"
    _write_digit_pngs(root, 300)
    spec, state, run_dir = run_pipeline(
        [
            "data=image_folder",
            f"data.factory.root={root}",
            "data.factory.calibration_size=100",
            *IMAGE_FOLDER_8X8,
            "tracking=off",
        ]
    )
    metrics = state.metrics
    assert metrics["data/calibration_samples"] == 100 and metrics["data/evaluation_samples"] == 200
    # Labels are sorted class-folder indices, so the digits CNN's float accuracy carries over.
    assert metrics["eval/float/accuracy"] >= 0.97
    assert metrics["eval/lowered/accuracy"] >= metrics["eval/float/accuracy"] - 0.02
    assert json.loads((run_dir / "load" / "data.json").read_text())["has_labels"] is True


def test_image_folder_transforms_split_and_labels(tmp_path: Path) -> None:
    from PIL import Image

    for name, color in (("b_red", (255, 0, 0)), ("a_blue", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for number in range(3):
            Image.new("RGB", (40, 20), color).save(
                tmp_path / name / f"{number}.jpg" if number else tmp_path / name / "0.png"
            )
    data = image_folder_data(str(tmp_path), resize=10, crop=8, calibration_size=2, batch_size=4, seed=1)
    inputs = torch.cat([x.args[0] for x, _ in data.calibration + data.evaluation])
    labels = torch.cat([y for _, y in data.calibration + data.evaluation])
    assert inputs.shape == (6, 3, 8, 8) and data.num_calibration_samples == 2
    red = inputs[labels == 1]  # sorted: a_blue = 0, b_red = 1
    assert red.shape[0] == 3
    assert torch.allclose(red[:, 0], torch.full_like(red[:, 0], (1 - 0.485) / 0.229), atol=0.05)
    assert torch.allclose(red[:, 2], torch.full_like(red[:, 2], (0 - 0.406) / 0.225), atol=0.05)
    again = image_folder_data(str(tmp_path), resize=10, crop=8, calibration_size=2, batch_size=4, seed=1)
    assert torch.equal(again.calibration[0][0].args[0], data.calibration[0][0].args[0])


def test_image_folder_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.factory.root='.*missing' is not a folder"):
        image_folder_data(str(tmp_path / "missing"))
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"has no class sub-folders.*found images directly in it"):
        image_folder_data(str(tmp_path))
    _write_digit_pngs(tmp_path / "digits", 20)
    (tmp_path / "digits" / "zz_empty").mkdir()
    with pytest.raises(ConfigError, match=r"class folder\(s\) \['zz_empty'\] hold no images"):
        image_folder_data(str(tmp_path / "digits"))
    (tmp_path / "digits" / "zz_empty").rmdir()
    with pytest.raises(ConfigError, match=r"has 20 samples, fewer than asked: data.factory.calibration_size=15"):
        image_folder_data(str(tmp_path / "digits"), calibration_size=15, evaluation_size=10, grayscale=True)
    with pytest.raises(ConfigError, match=r"data.factory.mean=\[0.5, 0.5\] has 2 values; give 1 or 3"):
        image_folder_data(str(tmp_path / "digits"), mean=[0.5, 0.5])


# ----- tensor file -----


@pytest.mark.slow
def test_tensor_file_without_labels_reports_sqnr_and_cosine_but_no_accuracy(tmp_path: Path, run_pipeline) -> None:
    images, _ = _digits_tensors()
    evaluation = _split_indices(seed=0, calibration_size=256, evaluation_size=450)["evaluation"]
    path = tmp_path / "inputs.pt"
    torch.save({"inputs": images[evaluation]}, path)
    spec, state, run_dir = run_pipeline(["data=tensor_file", f"data.factory.path={path}", "tracking=off"])
    metrics = state.metrics
    assert not [key for key in metrics if "accuracy" in key]
    assert metrics["eval/lowered/sqnr_db"] > 15
    assert metrics["eval/lowered/cosine_mean"] >= 0.99  # evaluate.metrics=auto without labels: sqnr, cosine
    assert "eval/lowered/agreement" not in metrics
    assert metrics["data/calibration_samples"] == 225 and metrics["data/evaluation_samples"] == 225
    assert json.loads((run_dir / "load" / "data.json").read_text())["has_labels"] is False


def test_tensor_file_with_labels_splits_by_counts(tmp_path: Path) -> None:
    path = tmp_path / "data.pt"
    torch.save({"inputs": torch.arange(50.0).view(50, 1), "labels": torch.arange(50) % 3}, path)
    data = tensor_file_data(str(path), calibration_size=10, evaluation_size=30, batch_size=8)
    assert data.has_labels and data.num_calibration_samples == 10 and data.num_evaluation_samples == 30
    calibration = torch.cat([x.args[0] for x, _ in data.calibration]).flatten()
    evaluation = torch.cat([x.args[0] for x, _ in data.evaluation]).flatten()
    assert not set(calibration.tolist()) & set(evaluation.tolist())
    for x, y in data.calibration + data.evaluation:  # labels stay with their inputs through the shuffle
        assert torch.equal(y, x.args[0].flatten().long() % 3)


def test_tensor_file_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.factory.path='.*nope.pt' does not exist"):
        tensor_file_data(str(tmp_path / "nope.pt"))
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match=r"holds list; expected a dict \{\"inputs\""):
        tensor_file_data(str(tmp_path / "list.pt"))
    torch.save({"labels": torch.zeros(3, dtype=torch.long)}, tmp_path / "keys.pt")
    with pytest.raises(ConfigError, match=r"holds a dict with keys \['labels'\]"):
        tensor_file_data(str(tmp_path / "keys.pt"))
    torch.save({"input_ids": torch.zeros(4, 2, dtype=torch.long), "mask": torch.ones(3, 2)}, tmp_path / "counts.pt")
    with pytest.raises(ConfigError, match=r"'mask' is a torch.float32 tensor of shape \[3, 2\].*N = 4"):
        tensor_file_data(str(tmp_path / "counts.pt"))
    torch.save({"inputs": torch.zeros(4, 2), "labels": torch.zeros(3, dtype=torch.long)}, tmp_path / "short.pt")
    with pytest.raises(ConfigError, match=r"labels is \[3\].*expected an integer Tensor\[4\]"):
        tensor_file_data(str(tmp_path / "short.pt"))
    torch.save({"inputs": torch.zeros(4, 2)}, tmp_path / "four.pt")
    with pytest.raises(ConfigError, match=r"\(4 inputs\) has 4 samples, fewer than asked.*calibration_size=4"):
        tensor_file_data(str(tmp_path / "four.pt"), calibration_size=4)


def test_a_data_factorys_config_error_reaches_the_user_unwrapped(tmp_path: Path) -> None:
    model = ModelSpec(name="digits_cnn", factory={"_target_": "stages.sources.digits.digits_cnn"})
    data = DataSpec(
        name="tensor_file", factory={"_target_": "stages.sources.tensor_file.tensor_file_data", "path": "x"}
    )
    with pytest.raises(ConfigError, match=r"^data.factory.path='x' does not exist"):
        load(model, data, 0)


# ----- torchvision -----


def test_torchvision_that_does_not_import_is_a_config_error_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # what an absent or mismatched build looks like
    with pytest.raises(ConfigError) as error:
        import_torchvision()
    text = str(error.value)
    assert "needs torchvision, which does not import here" in text
    assert f"matching this torch ({torch.__version__})" in text
    assert "operator torchvision::nms does not exist" in text


def test_torchvision_architecture_runs_with_random_weights(run_pipeline) -> None:
    try:
        import_torchvision()
    except ConfigError as error:
        pytest.skip(f"torchvision is not importable here: {error}")
    spec, state, _ = run_pipeline(
        [
            "model=torchvision",
            "model.factory.num_classes=10",
            "data=synthetic",
            "data.factory.shape=[3,64,64]",
            "stages=[load,calibrate,reference_convert,lower,evaluate]",
        ]
    )
    assert not [key for key in state.metrics if "accuracy" in key]
    assert state.metrics["eval/lowered/sqnr_db"] > 10


@pytest.mark.slow
def test_random_weights_give_no_accuracy_in_search_trials(run_pipeline) -> None:
    spec, state, _ = run_pipeline(
        [
            "model.trained=false",
            "search=greedy",
            "search.criterion=sqnr",
            "search.max_trials=2",
            "tracking=off",
            "stages=[load,calibrate]",
        ]
    )
    assert state.artifacts["search"] is not None and state.artifacts["search"].trials
    for trial in state.artifacts["search"].trials:
        assert "eval/lowered/sqnr_db" in trial.metrics
        assert "eval/lowered/accuracy" not in trial.metrics


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ("model=custom", "model.factory._target_"),
        ("data=image_folder", "data.factory.root"),
        ("data=tensor_file", "data.factory.path"),
        ("data=custom", "data.factory._target_"),
    ],
)
@pytest.mark.slow
def test_required_keys_are_reported_by_the_cli(option: str, key: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", option, "tracking=off", f"output_dir={tmp_path}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"Invalid config: {key} has no value and is required (it is ??? in the config); set it" in output
    assert "Traceback" not in output
    (run_dir,) = (tmp_path / "runs").iterdir()  # Hydra's folder and the job log, no stage ran
    assert sorted(path.name for path in run_dir.iterdir()) == [".hydra", "__main__.log"]
