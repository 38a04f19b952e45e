"""A user's own file, outside any package (tests put its folder in model.python_path or
custom_config.python_path, never on PYTHONPATH): a 1-D conv model on 1x8x8 digits with an untraceable
gate, its observed and quantized classes, and one class breaking each custom-module rule."""

import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self, width: int = 8, cap: float = 4.0) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.cap = cap

    def forward(self, x):
        y = self.fc(x)
        if bool(y.abs().max() > self.cap):  # data-dependent: FX cannot trace it
            y = y * (self.cap / y.abs().max())
        return y


class ObservedGate(nn.Module):
    def __init__(self, fc, cap, qconfig):
        super().__init__()
        self.fc, self.cap = fc, cap
        if qconfig is not None:
            self.qconfig = qconfig

    def forward(self, x):
        y = self.fc(x)
        if bool(y.abs().max() > self.cap):
            y = y * (self.cap / y.abs().max())
        return y

    @classmethod
    def from_float(cls, float_module):
        return cls(float_module.fc, float_module.cap, float_module.qconfig)


class ObservedGateNoQconfig(ObservedGate):
    @classmethod
    def from_float(cls, float_module):
        return cls(float_module.fc, float_module.cap, None)  # forgets .qconfig


class QuantizedGate(nn.Module):
    def __init__(self, fc, cap, scale, zero_point):
        super().__init__()
        self.fc, self.cap, self.scale, self.zero_point = fc, cap, scale, zero_point

    def forward(self, x):
        y = self.fc(x).dequantize()
        if bool(y.abs().max() > self.cap):
            y = y * (self.cap / y.abs().max())
        return torch.quantize_per_tensor(y, self.scale, self.zero_point, torch.quint8)

    @classmethod
    def from_observed(cls, observed):
        import torch.ao.nn.quantized as nnq

        fc = observed.fc
        fc.qconfig = observed.qconfig
        fc.activation_post_process = observed.activation_post_process
        scale, zero_point = observed.activation_post_process.calculate_qparams()
        return cls(nnq.Linear.from_float(fc), observed.cap, float(scale), int(zero_point))


class QuantizedGateFloatOut(QuantizedGate):
    def forward(self, x):
        return super().forward(x).dequantize()  # breaks the rule: a float tensor out


class GatedConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.gate = Gate()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.relu(self.conv(x.reshape(x.shape[0], 8, 8)))
        return self.head(torch.flatten(self.gate(x), 1))


def build():
    torch.manual_seed(0)
    return GatedConv1d().eval()
