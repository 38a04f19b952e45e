"""Content digests the caches key on (the calibration cache, the float latency cache): a tensor's dtype,
shape and bytes; the source of every module class a model uses."""

from __future__ import annotations

import functools
import hashlib
import inspect

import torch
from torch import nn


def tensor_digest(digest: hashlib._Hash, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().contiguous().cpu()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def model_code(model: nn.Module) -> str:
    """Source of every module class the model uses: editing forward() must invalidate the entry."""
    classes = sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}")
    return "\n".join(_class_source(cls) for cls in classes)


@functools.lru_cache(maxsize=1024)
def _class_source(cls: type) -> str:
    """inspect.getsource parses the class's whole file (0.26 s for a ResNet's classes, paid by every cache
    key a run computes); a class's source does not change within a process, except for a class redefined
    under the same name, which is a new class object and so a new entry."""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"
