"""What a model is fed: any number of positional tensors plus keyword tensors, of any dtype.

`ModelInputs` is the one type every stage feeds a model through (calibrate, evaluate, search, diagnose,
latency, export, the cache key). A data factory may still give a plain tensor (one positional input), a
tuple of tensors (positional inputs) or a dict of named tensors (keyword inputs): `ModelInputs.wrap` turns
each into a ModelInputs. Every tensor has the batch dimension first.

Tracing APIs (prepare_fx's example_inputs, torch.jit.trace, torch.onnx.export, ShapeProp) take a positional
tuple: `positional(model)` maps keyword inputs to positions by the model's forward signature, so a model
with `forward(input_ids, attention_mask)` fed `{"input_ids": ..., "attention_mask": ...}` works with all of
them. Names (for ONNX graph inputs, data.json, logs) are the keyword names, and input_<i> for positionals.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelInputs:
    """Positional and keyword tensors fed as `model(*args, **kwargs)`; the first dimension is the batch."""

    args: tuple[torch.Tensor, ...] = ()
    kwargs: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        for name, tensor in self.named():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"model input '{name}' is a {type(tensor).__name__}, not a torch.Tensor")
        if not self.args and not self.kwargs:
            raise ValueError("a model needs at least one input tensor")

    @classmethod
    def wrap(cls, value: Any) -> ModelInputs:
        """A ModelInputs from a ModelInputs, a tensor, a tuple/list of tensors or a dict of named tensors."""
        if isinstance(value, ModelInputs):
            return value
        if isinstance(value, torch.Tensor):
            return cls((value,))
        if isinstance(value, Mapping):
            return cls((), {str(name): tensor for name, tensor in value.items()})
        if isinstance(value, Sequence) and not isinstance(value, str):
            return cls(tuple(value))
        raise TypeError(
            f"model inputs must be a Tensor, a tuple of tensors, a dict of named tensors or a ModelInputs, "
            f"not {type(value).__name__}"
        )

    # ---- what is in it

    def named(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) for every input: input_<i> for positionals, then the keyword names."""
        return [*((f"input_{i}", t) for i, t in enumerate(self.args)), *self.kwargs.items()]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.named()]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [tensor for _, tensor in self.named()]

    @property
    def batch_size(self) -> int:
        return int(self.tensors[0].shape[0])

    def integer_names(self) -> list[str]:
        """Inputs that are not floating point (token ids, masks): never observed nor quantized."""
        return [name for name, tensor in self.named() if not tensor.is_floating_point()]

    def describe(self) -> dict[str, dict[str, Any]]:
        """{name: {"shape": [...], "dtype": "int64"}} for data.json and messages."""
        return {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in self.named()
        }

    def sample_signature(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, per-sample shape, dtype) per input: what every batch of one data set shares."""
        return [(name, tuple(t.shape[1:]), t.dtype) for name, t in self.named()]

    # ---- feeding a model

    def call(self, model: Callable[..., Any]) -> Any:
        return model(*self.args, **self.kwargs)

    def positional(self, model: nn.Module | Callable[..., Any]) -> tuple[Any, ...]:
        """The inputs as one positional tuple in the order of `model`'s forward signature (what tracing
        APIs take). Keyword inputs go to their parameter's position; a parameter skipped in between gets
        its default (e.g. None)."""
        if not self.kwargs:
            return self.args
        forward = model.forward if isinstance(model, nn.Module) else model
        try:
            parameters = list(inspect.signature(forward).parameters.values())
        except (TypeError, ValueError):
            return (*self.args, *self.kwargs.values())
        positional_kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        slots = [p for p in parameters if p.kind in positional_kinds]
        names = [p.name for p in slots]
        unknown = [name for name in self.kwargs if name not in names]
        if unknown:
            raise TypeError(
                f"keyword inputs {unknown} are not positional parameters of {type(model).__name__}.forward"
                f"{inspect.signature(forward)}"
            )
        last = max(names.index(name) for name in self.kwargs)
        values: list[Any] = list(self.args)
        for parameter in slots[len(self.args) : last + 1]:
            if parameter.name in self.kwargs:
                values.append(self.kwargs[parameter.name])
            elif parameter.default is not inspect.Parameter.empty:
                values.append(parameter.default)
            else:
                raise TypeError(
                    f"{type(model).__name__}.forward{inspect.signature(forward)} needs '{parameter.name}', "
                    f"which the inputs {self.names} do not give"
                )
        return tuple(values)

    def positional_names(self, model: nn.Module | Callable[..., Any]) -> list[str]:
        """Names of `positional(model)`'s entries: input_<i> for positionals, then the parameter names."""
        count = len(self.positional(model))
        if not self.kwargs:
            return [f"input_{i}" for i in range(count)]
        forward = model.forward if isinstance(model, nn.Module) else model
        names = [p.name for p in inspect.signature(forward).parameters.values()]
        return [*(f"input_{i}" for i in range(len(self.args))), *names[len(self.args) : count]]

    # ---- reshaping batches

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> ModelInputs:
        return ModelInputs(tuple(function(t) for t in self.args), {k: function(t) for k, t in self.kwargs.items()})

    def __getitem__(self, index: slice | torch.Tensor | list[int]) -> ModelInputs:
        """The samples at `index` (a slice or indices along the batch dimension) of every input."""
        return self.map(lambda tensor: tensor[index])

    @staticmethod
    def cat(parts: Sequence[ModelInputs]) -> ModelInputs:
        """Batches concatenated along the batch dimension (all with the same inputs). Integer and bool
        inputs of different lengths (token ids and masks padded per batch) are right-padded with 0 to
        the longest: a 0 attention mask hides the padding, whatever the padded ids are."""
        first = parts[0]
        return ModelInputs(
            tuple(_cat_padded([part.args[i] for part in parts]) for i in range(len(first.args))),
            {name: _cat_padded([part.kwargs[name] for part in parts]) for name in first.kwargs},
        )

    def repeat_to(self, size: int) -> ModelInputs:
        """A batch of exactly `size` samples, repeating these as often as needed (latency batches)."""
        repeats = -(-size // self.batch_size)

        def grow(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.repeat(repeats, *([1] * (tensor.dim() - 1)))[:size].contiguous()

        return self.map(grow)


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(tensor.shape[1:]) for tensor in tensors}
    if len(shapes) == 1 or tensors[0].is_floating_point() or tensors[0].is_complex():
        return torch.cat(tensors)  # same shapes; or float inputs, which are never padded (cat says why)
    longest = [max(sizes) for sizes in zip(*shapes, strict=True)]

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        pairs = zip(reversed(tensor.shape[1:]), reversed(longest), strict=True)
        widths = [width for size, full in pairs for width in (0, full - size)]  # F.pad: last dimension first
        return torch.nn.functional.pad(tensor, widths, value=0)

    return torch.cat([pad(tensor) for tensor in tensors])


Labels = torch.Tensor | None
Batch = tuple[ModelInputs, Labels]
"""A batch as the stages see it: the model inputs and, when the data set has them, integer labels."""


def as_batch(batch: Any) -> Batch:
    """A factory's batch, `(inputs, labels)` with inputs anything ModelInputs.wrap takes, as a Batch."""
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise TypeError(f"a batch must be (inputs, labels or None), not {type(batch).__name__}")
    inputs, labels = batch
    return ModelInputs.wrap(inputs), labels


def data_digest(tensors: Iterable[Any]) -> str:
    """A short digest of the data (torch tensors or numpy arrays): dtype, shape and bytes of each, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        array = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else tensor
        digest.update(f"{array.dtype}{tuple(array.shape)}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def batch_tensors(batches: Iterable[tuple[ModelInputs, torch.Tensor | None]]) -> Iterator[torch.Tensor]:
    """Every tensor of a list of (inputs, labels) batches, in order: what data_digest hashes."""
    for inputs, labels in batches:
        yield from inputs.tensors
        if labels is not None:
            yield labels
