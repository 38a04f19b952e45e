"""A tiny token model for the dynamic / weight-only / float16 tests: int64 token ids -> Embedding ->
mean over the sequence -> two Linear layers. Random weights (seeded) and unlabeled random ids: the
tests compare the quantized model with float (SQNR, cosine), which needs no training."""

from __future__ import annotations

import torch
from torch import nn

from stages.types import DataBundle

VOCAB, LENGTH, WIDTH = 50, 12, 32


class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, 64)
        self.relu = nn.ReLU()
        self.head = nn.Linear(64, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.hidden(self.embed(ids).mean(1))))


def token_mlp(seed: int = 0) -> TokenMLP:
    torch.manual_seed(seed)
    return TokenMLP().eval()


def token_data(
    calibration_size: int = 32, evaluation_size: int = 32, batch_size: int = 16, seed: int = 0
) -> DataBundle:
    """Random token ids, no labels (data=custom data.factory._target_=tests.token_model.token_data)."""
    generator = torch.Generator().manual_seed(seed)

    def batches(size: int) -> list[tuple[torch.Tensor, None]]:
        return [
            (torch.randint(0, VOCAB, (min(batch_size, size - start), LENGTH), generator=generator), None)
            for start in range(0, size, batch_size)
        ]

    calibration, evaluation = batches(calibration_size), batches(evaluation_size)
    return DataBundle("tokens", calibration, evaluation, (calibration[0][0][:2],), has_labels=False)
