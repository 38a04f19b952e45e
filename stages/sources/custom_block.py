"""The custom-module example: a digits CNN holding a block FX cannot trace, with its observed and
quantized forms for PrepareCustomConfig / ConvertCustomConfig (conf/custom_config/custom_block.yaml).

`PeakLimiter` is conv -> ReLU followed by a per-sample limiter: a sample whose peak activation exceeds
`cap` is scaled down so its peak equals `cap`. That `if` on a tensor value is data-dependent control
flow, which symbolic tracing cannot record ("symbolically traced variables cannot be used as inputs to
control flow"); so FX must treat the block as a leaf and swap it for our own classes:

- `ObservedPeakLimiter.from_float`: the same float computation plus an observer on the conv+ReLU
  output (calibration fills it; FX observes the block's input and output itself).
- `QuantizedPeakLimiter.from_observed`: an int8 conv+ReLU (torch's quantized ConvReLU2d with the
  observed qparams), then dequantize -> the float limiter -> quantize with the calibrated output
  qparams. The limiter is one data-dependent scalar multiply per sample: int8 kernels have no
  "if" and the rescale needs a requantization anyway, so the float detour costs nothing measurable
  and keeps the quantized block exactly the float block up to the two int8 roundings.

The limiter itself is `torch.jit.script_if_tracing`, so TorchScript tracing (evaluate's latency forms
and export) keeps the branch instead of baking in the one the example input took.

`custom_block_cnn()` trains itself when loaded (seeded, a few seconds; nothing is shipped).
"""

from __future__ import annotations

import torch
from torch import nn

from stages.sources.digits import fit, training_part

CLASS_NAMES = [str(digit) for digit in range(10)]
VERSION = "custom_block_cnn-1"


@torch.jit.script_if_tracing
def limit_peaks(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Scale each sample whose largest value exceeds `cap` down so that its largest value is `cap`;
    a batch with no such sample is returned as it is (the data-dependent early exit)."""
    peaks = x.amax(dim=(1, 2, 3), keepdim=True)
    if bool((peaks > cap).any()):
        x = x * torch.clamp(cap / peaks, max=1.0)
    return x


class PeakLimiter(nn.Module):
    """conv -> ReLU -> per-sample peak limiter (the data-dependent part)."""

    def __init__(self, channels: int, cap: float = 4.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return limit_peaks(self.relu(self.conv(x)), self.cap)


class ObservedPeakLimiter(nn.Module):
    """The float computation plus an observer on the conv+ReLU output, which calibration fills."""

    def __init__(self, conv: nn.Conv2d, cap: float, qconfig) -> None:
        super().__init__()
        self.conv = conv
        self.relu = nn.ReLU()
        self.cap = cap
        self.qconfig = qconfig  # convert reads it to pick the quantized class for the quant mode
        self.conv_observer = qconfig.activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return limit_peaks(self.conv_observer(self.relu(self.conv(x))), self.cap)

    @classmethod
    def from_float(cls, float_module: PeakLimiter) -> ObservedPeakLimiter:
        # prepare_fx sets .qconfig on the float module before swapping it.
        return cls(float_module.conv, float_module.cap, float_module.qconfig)


class QuantizedPeakLimiter(nn.Module):
    """Quantized tensor in, quantized tensor out (what convert_fx expects of a static custom module)."""

    def __init__(self, conv: nn.Module, cap: float, scale: float, zero_point: int) -> None:
        super().__init__()
        self.conv = conv  # torch.ao.nn.intrinsic.quantized.ConvReLU2d
        self.cap = cap
        self.scale = scale
        self.zero_point = zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        limited = limit_peaks(self.conv(x).dequantize(), self.cap)
        return torch.quantize_per_tensor(limited, self.scale, self.zero_point, torch.quint8)

    @classmethod
    def from_observed(cls, observed: ObservedPeakLimiter) -> QuantizedPeakLimiter:
        import torch.ao.nn.intrinsic as nni
        import torch.ao.nn.intrinsic.quantized as nniq

        fused = nni.ConvReLU2d(observed.conv, nn.ReLU())
        fused.qconfig = observed.qconfig
        fused.activation_post_process = observed.conv_observer
        # convert_fx attaches the observer of the block's output as activation_post_process.
        scale, zero_point = observed.activation_post_process.calculate_qparams()
        return cls(nniq.ConvReLU2d.from_float(fused), observed.cap, float(scale), int(zero_point))


class CustomBlockCNN(nn.Module):
    """1x8x8 -> 10: stem conv, the PeakLimiter block, pooling, a second conv, linear head."""

    def __init__(self, width: int = 16, cap: float = 4.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.limiter = PeakLimiter(width, cap)
        self.pool = nn.MaxPool2d(2)
        self.widen = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)
        # Plain attributes forward() never reads: they survive FX quantization only when listed in
        # custom_config's preserved_attributes.
        self.class_names = list(CLASS_NAMES)
        self.version = VERSION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.limiter(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(self.widen(x)), 1))


def custom_block_cnn(epochs: int = 15, seed: int = 0, cap: float = 4.0) -> CustomBlockCNN:
    """The example model, trained seeded on the digits training part (never on calibration/evaluation)."""
    threads = torch.get_num_threads()
    # Convs this small train several times faster on one thread than on threads fighting over
    # shared cores (measured: 0.17 s vs 5 s an epoch under load).
    torch.set_num_threads(1)
    try:
        return _train(epochs, seed, cap)
    finally:
        torch.set_num_threads(threads)


def _train(epochs: int, seed: int, cap: float) -> CustomBlockCNN:
    torch.manual_seed(seed)
    x, y = training_part()
    return fit(CustomBlockCNN(cap=cap), x, y, epochs=epochs, batch_size=32, lr=1e-2, seed=seed)
