"""torchvision classification architectures by name, with random weights (never downloaded).

Needs the optional `torchvision` extra, and a torchvision build that matches the installed torch:
PyPI's default wheel does not import beside torch 2.13.0+cpu (`operator torchvision::nms does not
exist`), which `build` turns into a ConfigError saying what to install.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError, closest, error_summary


def import_torchvision() -> Any:
    """The torchvision module, or a ConfigError that says why it does not import and what the extra needs."""
    try:
        import torchvision
    except Exception as error:  # ImportError, or RuntimeError from a build for another torch
        raise ConfigError(
            f"model=torchvision (stages.sources.torchvision_models.build) needs torchvision, which does not "
            f"import here: {error_summary(error, 200)}. Install the optional extra with a torchvision "
            f"build matching this torch ({torch.__version__}): PyPI's default wheel is built for another torch "
            f"and fails with 'operator torchvision::nms does not exist'; install the torchvision release built "
            f"for torch {torch.__version__.split('+')[0]} from the PyTorch CPU wheel index "
            f"(https://download.pytorch.org/whl/cpu). "
            f"Or bring the architecture as your own factory (model.factory._target_ + model.python_path)."
        ) from error
    return torchvision


def build(arch: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """torchvision.models.<arch> with random weights (weights=None: nothing is downloaded)."""
    torchvision = import_torchvision()
    names = sorted(torchvision.models.list_models(module=torchvision.models))
    if arch not in names:
        raise ConfigError(
            f"model.factory.arch='{arch}' is not a torchvision classification model; choose one of "
            f"torchvision.models.list_models() (e.g. resnet18, mobilenet_v2).{closest(arch, names)}"
        )
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    # torchvision's blocks call one ReLU twice: the FX engine's prepare gives each call its own copy.
    return model.eval()
