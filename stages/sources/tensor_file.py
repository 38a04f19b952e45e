"""Inputs (and optional labels) saved with torch.save, for data that is already tensors.

Two formats, each a dict saved with torch.save and read with torch.load(weights_only=True) (plain tensors
only, no code runs from the file):
- one input:    {"inputs": x, "labels": y}; x is a Tensor[N, ...] fed as model(x);
- named inputs: {"input_ids": ids, "attention_mask": mask, ..., "labels": y}; every key but `labels` is a
  Tensor[N, ...] fed by name, model(input_ids=ids, attention_mask=mask): name them like forward's parameters.
  ({"inputs": {"input_ids": ..., ...}, "labels": y} is read the same way.)
Inputs may be of any real dtype: floating-point ones are read as float32, integer and bool ones (token ids,
masks) are kept as they are (and never observed by calibration).
  labels  optional, an integer Tensor[N] of class indices; without it accuracy is not reported
          (evaluate still reports SQNR and agreement with the float model).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.batch import ModelInputs
from pipeline.errors import ConfigError, error_summary
from pipeline.paths import is_torch_file, path_status
from stages.sources.split import split_indices
from stages.types import Batch, DataBundle

log = logging.getLogger(__name__)

FORMAT = (
    'a dict {"inputs": Tensor[N, ...], "labels": integer Tensor[N] (optional)}, or a dict of named input tensors '
    '{"input_ids": Tensor[N, ...], "attention_mask": Tensor[N, ...], ..., "labels": ... (optional)}, saved with '
    "torch.save"
)


def _check_input(path: str, name: str, tensor: object, count: int | None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"data.factory.path='{path}': '{name}' is a {type(tensor).__name__}; expected {FORMAT}.")
    if (
        tensor.dim() < 1
        or tensor.shape[0] == 0
        or tensor.is_complex()
        or (count is not None and tensor.shape[0] != count)
    ):
        samples = "N >= 1" if count is None else f"N = {count} like the other inputs"
        raise ConfigError(
            f"data.factory.path='{path}': '{name}' is a {tensor.dtype} tensor of shape {list(tensor.shape)}; "
            f"expected a real (floating-point, integer or bool) Tensor[N, ...] with {samples}."
        )
    return tensor.float() if tensor.is_floating_point() else tensor


def read_tensor_file(path: str) -> tuple[ModelInputs, torch.Tensor | None]:
    """The inputs and labels of a tensor file, checked against FORMAT; ConfigError naming data.factory.path."""
    file = Path(path)
    if not is_torch_file(file):
        raise ConfigError(
            f"data.factory.path='{path}' {path_status(file)} (resolved: {file.resolve()}); expected {FORMAT}."
        )
    try:
        content = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(
            f"data.factory.path='{path}' cannot be read with torch.load(weights_only=True) "
            f"({error_summary(error, 200)}); expected {FORMAT}."
        ) from error
    named = {str(key): value for key, value in content.items() if key != "labels"} if isinstance(content, dict) else {}
    if isinstance(named.get("inputs"), dict) and len(named) == 1:
        named = {str(key): value for key, value in named["inputs"].items()}
    if not named:
        found = f"a dict with keys {sorted(map(str, content))}" if isinstance(content, dict) else type(content).__name__
        raise ConfigError(f"data.factory.path='{path}' holds {found}; expected {FORMAT}.")
    count = None
    for name, tensor in named.items():
        named[name] = _check_input(path, name, tensor, count)
        count = int(named[name].shape[0])
    assert count is not None
    inputs = ModelInputs((named["inputs"],)) if list(named) == ["inputs"] else ModelInputs((), named)
    labels = content.get("labels")
    if labels is not None:
        if (
            not isinstance(labels, torch.Tensor)
            or labels.dim() != 1
            or labels.shape[0] != count
            or labels.is_floating_point()
            or labels.is_complex()
        ):
            shape = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ConfigError(
                f"data.factory.path='{path}': labels is {shape} "
                f"({getattr(labels, 'dtype', '')}); expected an integer Tensor[{count}] (one class "
                f"index per input), or no 'labels' key."
            )
        labels = labels.long()
    return inputs, labels


def batches_of(inputs: ModelInputs, labels: torch.Tensor | None, batch_size: int) -> list[Batch]:
    """Consecutive batches of `batch_size` samples (the last may be smaller)."""
    return [
        (inputs[i : i + batch_size], None if labels is None else labels[i : i + batch_size])
        for i in range(0, inputs.batch_size, batch_size)
    ]


def tensor_file_data(
    path: str,
    calibration_size: int | None = None,
    calibration_fraction: float = 0.5,
    evaluation_size: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> DataBundle:
    """Calibration and evaluation batches from one tensor file, split by seed (see the module docstring)."""
    if batch_size < 1:
        raise ConfigError(f"data.factory.batch_size={batch_size} must be >= 1.")
    inputs, labels = read_tensor_file(path)
    calibration, evaluation = split_indices(
        inputs.batch_size,
        seed,
        calibration_size,
        calibration_fraction,
        evaluation_size,
        f"data.factory.path='{path}' ({inputs.batch_size} inputs)",
    )

    def batches(indices: list[int]) -> list[Batch]:
        chosen = torch.tensor(indices, dtype=torch.long)
        return batches_of(inputs[chosen], None if labels is None else labels[chosen], batch_size)

    calibration_batches = batches(calibration)
    log.info(
        "tensor file %s: %d calibration and %d evaluation samples of %s, %s",
        path,
        len(calibration),
        len(evaluation),
        ", ".join(
            f"{name} {list(shape)} {str(dtype).removeprefix('torch.')}"
            for name, shape, dtype in inputs.sample_signature()
        ),
        "labelled" if labels is not None else "no labels (no accuracy; SQNR and agreement only)",
    )
    return DataBundle(
        name=f"tensor_file_{Path(path).stem}",
        calibration=calibration_batches,
        evaluation=batches(evaluation),
        example_inputs=calibration_batches[0][0][:1],
        has_labels=labels is not None,
    )
