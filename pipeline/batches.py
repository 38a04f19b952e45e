"""Calibration and evaluation data as re-iterable batch sources, so a data set need not fit in memory.

A `BatchSource` is what `DataBundle.calibration` / `.evaluation` hold: iterate it (again and again) for
`(ModelInputs, labels | None)` batches, `len()` is its number of batches, `num_samples` its samples,
`head(max_batches, max_samples)` the source cut to its first batches / samples (evaluate.max_batches,
evaluate.max_samples, calibrate.max_batches), `source[i]` one batch and `source[:n]` the first n batches,
`fingerprint()` a digest that names exactly these batches (for cache keys) without decoding them when the
source can say what they are (files, indices, transforms).

Two kinds:
- `BatchList`: batches held in memory (a list: what the small built-in factories return; a plain list
  given to DataBundle becomes one). Its fingerprint hashes every tensor.
- `DatasetBatches`: a map-style torch Dataset at some indices, batched by a torch DataLoader with
  `num_workers` worker processes that decode while the model runs. Memory holds at most
  `num_workers * prefetch_factor` (2 each) batches in flight plus the one being used, whatever the set's size.
  Its fingerprint hashes the dataset's `identity` (given by the factory: files, sizes, mtimes, transform
  settings), the indices and the batch size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from pipeline.batch import Batch, ModelInputs, as_batch


@runtime_checkable
class BatchSource(Protocol):
    """Re-iterable batches (see the module docstring)."""

    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    @property
    def num_samples(self) -> int: ...
    def head(self, max_batches: int | None = None, max_samples: int | None = None) -> BatchSource: ...
    def fingerprint(self) -> str: ...


def tensor_digest(digest: Any, tensor: torch.Tensor) -> None:
    """dtype, shape and bytes of `tensor` into a hashlib digest."""
    tensor = tensor.detach().contiguous().cpu()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def batch_digest(digest: Any, batch: Batch) -> None:
    inputs, labels = batch
    for name, tensor in inputs.named():
        digest.update(name.encode())
        tensor_digest(digest, tensor)
    if labels is not None:
        tensor_digest(digest, labels)


class BatchList(list):
    """Batches in memory: a list (indexing, slicing and `+` work as on a list; a slice is a BatchList)."""

    lazy = False

    def __init__(self, batches: Iterable[Any] = ()) -> None:
        super().__init__(as_batch(batch) for batch in batches)

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        return BatchList(item) if isinstance(index, slice) else item

    @property
    def num_samples(self) -> int:
        return sum(inputs.batch_size for inputs, _ in self)

    def head(self, max_batches: int | None = None, max_samples: int | None = None) -> BatchList:
        batches = list.__getitem__(self, slice(None, max_batches))
        if max_samples is None:
            return BatchList(batches)
        kept: list[Batch] = []
        left = max_samples
        for inputs, labels in batches:
            if left <= 0:
                break
            take = min(left, inputs.batch_size)
            kept.append((inputs[:take], None if labels is None else labels[:take]))
            left -= take
        return BatchList(kept)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(b"batch-list")
        for batch in self:
            batch_digest(digest, batch)
        return digest.hexdigest()[:24]


def collate(items: Sequence[tuple[Any, Any]]) -> Batch:
    """Samples `(inputs, label or None)` into one batch: inputs stacked by torch's default_collate (a
    tensor, a tuple or a dict of tensors), labels into a long tensor (None when the samples have none)."""
    from torch.utils.data import default_collate

    inputs = default_collate([inputs for inputs, _ in items])
    labels = None if items[0][1] is None else torch.as_tensor([label for _, label in items], dtype=torch.long)
    return ModelInputs.wrap(inputs), labels


class DatasetBatches:
    """Batches of a map-style Dataset (`dataset[i]` -> `(inputs, label or None)`) at `indices`, loaded by a
    torch DataLoader with `num_workers` worker processes (0: in this process). Re-iterable: each pass
    starts its own loader, so nothing stays in memory between passes."""

    lazy = True

    def __init__(
        self,
        dataset: Any,
        indices: Sequence[int],
        batch_size: int,
        num_workers: int = 0,
        identity: Callable[[], str] | str = "",
        prefetch_factor: int = 2,
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.identity = identity
        self.prefetch_factor = prefetch_factor
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Batch]:
        if not self.indices:
            return
        from torch.utils.data import DataLoader, Subset

        loader = DataLoader(
            Subset(self.dataset, self.indices),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
        )
        yield from loader

    def batch(self, position: int) -> Batch:
        """One batch, decoded in this process (no workers started)."""
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"batch {position} of {len(self)}")
        chunk = self.indices[position * self.batch_size : (position + 1) * self.batch_size]
        return collate([self.dataset[index] for index in chunk])

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            if index.start not in (None, 0) or index.step not in (None, 1):
                raise IndexError("a lazy batch source slices only from its start: source[:n]")
            return self.head(index.stop)
        return self.batch(int(index))

    def __add__(self, other: Iterable[Batch]) -> list[Batch]:
        """Both sources' batches in one list (decodes both: for small sets and tests)."""
        return [*self, *other]

    def __radd__(self, other: Iterable[Batch]) -> list[Batch]:
        return [*other, *self]

    def head(self, max_batches: int | None = None, max_samples: int | None = None) -> DatasetBatches:
        count = len(self.indices)
        if max_batches is not None:
            count = min(count, max(0, max_batches) * self.batch_size)
        if max_samples is not None:
            count = min(count, max(0, max_samples))
        if count == len(self.indices):
            return self
        return DatasetBatches(
            self.dataset, self.indices[:count], self.batch_size, self.num_workers, self.identity, self.prefetch_factor
        )

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            identity = self.identity() if callable(self.identity) else self.identity
            digest = hashlib.sha256(b"dataset-batches")
            digest.update(str(identity).encode())
            digest.update(f"{self.batch_size}:{self.indices}".encode())
            self._fingerprint = digest.hexdigest()[:24]
        return self._fingerprint


def as_source(value: Any) -> BatchSource:
    """A BatchSource as is; a list (or any iterable) of batches as a BatchList."""
    if isinstance(value, BatchList | DatasetBatches):
        return value
    if isinstance(value, BatchSource) and not isinstance(value, list):
        return value
    return BatchList(value)


def first_batch(source: BatchSource) -> Batch:
    """The first batch (decoded in this process for a lazy source)."""
    if isinstance(source, BatchList | DatasetBatches):
        return source[0]
    return next(iter(source))
