"""A digits MLP with one activation outlier: a hard case for per-tensor activation quantization.

`outlier_mlp()` trains a 64-128-128-128-128-10 MLP on the digits training part (seeded, a few
seconds), then scales one hidden unit of the second layer up by `outlier_scale` and the next layer's
weights for that unit down by the same factor. ReLU commutes with a positive scale, so the float
model computes exactly the same function, but the second layer's output range is now dominated by
one unit and per-tensor int8 activations lose the rest: the fully quantized model misses a tight
accuracy bar until the layers around the outlier stay float. Used by the skip-search tests and bench.
"""

import torch
from torch import nn

from stages.sources.digits import fit, training_part


class DigitsMLP(nn.Module):
    def __init__(self, width: int = 128, depth: int = 4) -> None:
        super().__init__()
        sizes = [64] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.relus = nn.ModuleList(nn.ReLU() for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for linear, relu in zip(self.hidden, self.relus, strict=True):
            x = relu(linear(x))
        return self.head(x)


def outlier_mlp(outlier_scale: float = 200.0, outlier_layer: int = 1, epochs: int = 30, seed: int = 0) -> DigitsMLP:
    torch.manual_seed(seed)
    x, y = training_part()
    model = fit(DigitsMLP(), x, y, epochs=epochs, batch_size=64, lr=2e-3, seed=seed)
    with torch.no_grad():
        layer, following = model.hidden[outlier_layer], model.hidden[outlier_layer + 1]
        unit = int(layer.weight.norm(dim=1).argmax())  # a unit that is active, so its range matters
        layer.weight[unit] *= outlier_scale
        layer.bias[unit] *= outlier_scale
        following.weight[:, unit] /= outlier_scale
    return model.eval()
