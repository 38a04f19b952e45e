"""A MobileNetV2-shaped network (torchvision's layout: inverted residual blocks, ReLU6 after every
expansion and depthwise conv+BN, linear bottlenecks, residual adds; 3.5 M parameters at width 1.0),
defined here because torchvision does not import beside torch 2.13.0+cpu. Seeded random weights:
for timing and SQNR, not accuracy.

Random weights give activations that vanish or explode over 50 convs, and BatchNorm scales of 1
keep every pre-activation inside ReLU6's [0, 6]; a trained net's are much wider. So the factory draws
BatchNorm scales from [0.5, bn_scale_max] and shifts from [-1, 1], then sets the running statistics
from one seeded batch: each pre-activation is then about N(shift, scale^2) per channel, and reaches
well past 6 (and below 0), which is the case ReLU6 quantization has to handle."""

import torch
from torch import nn


def _conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(in_channels, hidden, 1, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),  # the linear bottleneck: no activation
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def _channels(value: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round to a multiple of 8, never more than 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class MobileNetV2(nn.Module):
    # expansion t, output channels c, repeats n, first stride s (torchvision's table)
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        in_channels = _channels(32 * width)
        last_channels = _channels(1280 * max(1.0, width))
        features: list[nn.Module] = [_conv_bn_relu6(3, in_channels, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            out_channels = _channels(c * width)
            for i in range(n):
                features.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t))
                in_channels = out_channels
        features.append(_conv_bn_relu6(in_channels, last_channels, 1, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2(
    num_classes: int = 1000,
    width: float = 1.0,
    image_size: int = 96,
    bn_scale_max: float = 3.0,
    projection_scale_max: float = 0.5,
    seed: int = 0,
) -> MobileNetV2:
    """Seeded random weights; BatchNorm statistics from one seeded batch of `image_size` inputs."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes, width)
    # The projection BatchNorms (no activation after them) get small scales: residual streams of random
    # blocks otherwise grow and amplify every error chaotically, which no trained net does.
    projections = {id(block.conv[-1]) for block in model.modules() if isinstance(block, InvertedResidual)}
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and id(module) in projections:
            module.weight.data.uniform_(0.1, projection_scale_max, generator=generator)
            module.bias.data.zero_()
            module.momentum = None
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, bn_scale_max, generator=generator)
            module.bias.data.uniform_(-1.0, 1.0, generator=generator)
            module.momentum = None  # cumulative average: one batch sets the statistics exactly
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01, generator=generator)
            nn.init.zeros_(module.bias)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, image_size, image_size, generator=generator))
    return model.eval()
