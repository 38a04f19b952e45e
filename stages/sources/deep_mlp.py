"""A ~100-layer residual digits MLP with a few function-preserving activation outliers: the test model for
a skip search that scales (search=greedy on ~100 layers).

`deep_mlp()` builds a residual MLP on the 8x8 digits: a stem Linear 64->width, `blocks` residual blocks
`x = x + fc2(relu(fc1(x)))` and a Linear head (2*blocks+2 Linears: 98 by default), trains it seeded for a
few seconds, then in `outlier_blocks` scales one hidden unit of fc1 up by `outlier_scale` and fc2's weights
for that unit down by the same factor. ReLU commutes with a positive scale, so the float model computes
exactly the same function (as stages/sources/outlier_mlp.py does for one layer), but each of those fc1
outputs is now dominated by one unit and per-tensor int8 activations lose the rest. Without the outliers
int8 loses about 0.2 points; with them about 3, until those few blocks' two Linears stay float. SmoothQuant
(recovery.smoothquant_alpha) fixes such outliers, so the search tests turn it off.
"""

from __future__ import annotations

import torch
from torch import nn

from stages.sources.digits import fit, training_part


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.relu(self.fc1(x)))


class DeepMLP(nn.Module):
    def __init__(self, blocks: int = 48, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.relu = nn.ReLU()
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks)))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.relu(self.stem(torch.flatten(x, 1)))))


def deep_mlp(
    blocks: int = 48,
    width: int = 32,
    outlier_blocks: tuple[int, ...] | list[int] = (6, 18, 30, 42),
    outlier_scale: float = 1000.0,
    epochs: int = 30,
    seed: int = 0,
) -> DeepMLP:
    """The trained net (seeded: the same arguments give the same weights) with its outliers."""
    torch.manual_seed(seed)
    x, y = training_part()
    model = fit(DeepMLP(blocks, width), x, y, epochs=epochs, batch_size=64, lr=1e-3, seed=seed)
    with torch.no_grad():
        for index in outlier_blocks:
            block = model.blocks[index]
            unit = int(block.fc1.weight.norm(dim=1).argmax())  # an active unit, so its range matters
            block.fc1.weight[unit] *= outlier_scale
            block.fc1.bias[unit] *= outlier_scale
            block.fc2.weight[:, unit] /= outlier_scale
    return model.eval()
