"""Content digests the caches key on (the calibration cache, the float latency cache): a tensor's dtype,
shape and bytes; the source of every module class a model uses."""

from __future__ import annotations

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
    sources = []
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        try:
            sources.append(inspect.getsource(cls))
        except (OSError, TypeError):
            sources.append(f"{cls.__module__}.{cls.__qualname__}")
    return "\n".join(sources)
