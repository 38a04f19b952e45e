"""Synthetic inputs from a shape spec: for latency and SQNR only (no labels, so no accuracy)."""

import torch

from stages.types import DataBundle


def synthetic_data(
    shape: list[int], calibration_batches: int = 4, evaluation_batches: int = 2, batch_size: int = 8, seed: int = 0
) -> DataBundle:
    """Standard-normal batches of `batch_size` x `shape` (e.g. shape [3, 224, 224])."""
    generator = torch.Generator().manual_seed(seed)

    def batches(count: int) -> list:
        return [(torch.randn(batch_size, *shape, generator=generator), None) for _ in range(count)]

    calibration = batches(calibration_batches)
    return DataBundle(
        name=f"synthetic_{'x'.join(map(str, shape))}",
        calibration=calibration,
        evaluation=batches(evaluation_batches),
        example_inputs=(calibration[0][0][:1],),
        has_labels=False,
    )
