"""Inputs (and optional labels) saved with torch.save, for data that is already tensors.

Format: a dict saved with `torch.save({"inputs": x, "labels": y}, path)`, where
  inputs  a floating-point Tensor[N, ...]: N samples of the model's input shape (e.g. [N, 3, 224, 224]);
  labels  optional, an integer Tensor[N] of class indices; without it accuracy is not reported
          (evaluate still reports SQNR and agreement with the float model).
It is read with torch.load(weights_only=True): plain tensors only, no code runs from the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.errors import ConfigError, error_summary
from pipeline.paths import is_torch_file, path_status
from stages.sources.digits import _batches
from stages.sources.split import split_indices
from stages.types import DataBundle

log = logging.getLogger(__name__)

FORMAT = 'a dict {"inputs": float Tensor[N, ...], "labels": integer Tensor[N] (optional)} saved with torch.save'


def read_tensor_file(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    if not isinstance(content, dict) or not isinstance(content.get("inputs"), torch.Tensor):
        found = f"a dict with keys {sorted(map(str, content))}" if isinstance(content, dict) else type(content).__name__
        raise ConfigError(f"data.factory.path='{path}' holds {found}; expected {FORMAT}.")
    unknown = sorted(str(key) for key in content if key not in ("inputs", "labels"))
    if unknown:
        raise ConfigError(f"data.factory.path='{path}' has unknown keys {unknown}; expected {FORMAT}.")
    inputs, labels = content["inputs"], content.get("labels")
    if inputs.dim() < 1 or inputs.shape[0] == 0 or not inputs.is_floating_point():
        raise ConfigError(
            f"data.factory.path='{path}': inputs is a {inputs.dtype} tensor of shape {list(inputs.shape)}; "
            f"expected a floating-point Tensor[N, ...] with N >= 1."
        )
    if labels is not None:
        if (
            not isinstance(labels, torch.Tensor)
            or labels.dim() != 1
            or labels.shape[0] != inputs.shape[0]
            or labels.is_floating_point()
            or labels.is_complex()
        ):
            shape = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ConfigError(
                f"data.factory.path='{path}': labels is {shape} "
                f"({getattr(labels, 'dtype', '')}); expected an integer Tensor[{inputs.shape[0]}] (one class "
                f"index per input), or no 'labels' key."
            )
        labels = labels.long()
    return inputs.float(), labels


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
        int(inputs.shape[0]),
        seed,
        calibration_size,
        calibration_fraction,
        evaluation_size,
        f"data.factory.path='{path}' ({inputs.shape[0]} inputs)",
    )

    def batches(indices: list[int]) -> list:
        chosen = torch.tensor(indices, dtype=torch.long)
        return _batches(inputs[chosen], None if labels is None else labels[chosen], batch_size)

    calibration_batches = batches(calibration)
    log.info(
        "tensor file %s: %d calibration and %d evaluation inputs of shape %s, %s",
        path,
        len(calibration),
        len(evaluation),
        list(inputs.shape[1:]),
        "labelled" if labels is not None else "no labels (no accuracy; SQNR and agreement only)",
    )
    return DataBundle(
        name=f"tensor_file_{Path(path).stem}",
        calibration=calibration_batches,
        evaluation=batches(evaluation),
        example_inputs=(calibration_batches[0][0][:1],),
        has_labels=labels is not None,
    )
