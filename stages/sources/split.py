"""Seeded calibration / evaluation split shared by the file-based data sources (image folder, tensor file)."""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError


def split_indices(
    total: int,
    seed: int,
    calibration_size: int | None,
    calibration_fraction: float,
    evaluation_size: int | None,
    what: str,
) -> tuple[list[int], list[int]]:
    """Calibration and evaluation sample indices that never overlap, from one seeded permutation.

    calibration_size (a count) wins over calibration_fraction; evaluation_size None takes every sample
    not used for calibration. `what` names the source in errors, e.g. "data.factory.root='imgs' (120 images)".
    """
    if calibration_size is None:
        if not 0.0 < calibration_fraction < 1.0:
            raise ConfigError(
                f"data.factory.calibration_fraction={calibration_fraction} must be between 0 and 1 (exclusive), "
                f"or set data.factory.calibration_size to a count."
            )
        calibration_size = max(1, round(total * calibration_fraction))
    for key, value in (("calibration_size", calibration_size), ("evaluation_size", evaluation_size)):
        if value is not None and value < 1:
            raise ConfigError(f"data.factory.{key}={value} must be >= 1 (or null).")
    wanted = calibration_size + (evaluation_size if evaluation_size is not None else 1)
    if wanted > total:
        raise ConfigError(
            f"{what} has {total} samples, fewer than asked: data.factory.calibration_size={calibration_size} "
            f"plus data.factory.evaluation_size={evaluation_size if evaluation_size is not None else 'at least 1'} "
            f"= {wanted}. Lower those sizes or add samples."
        )
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    calibration = order[:calibration_size]
    rest = order[calibration_size:]
    evaluation = rest if evaluation_size is None else rest[:evaluation_size]
    return calibration, evaluation
