"""data=text_file: one sentence a line, tokenised with a local Hugging Face tokenizer (the [hf] extra).

Empty lines are skipped. The sentences are split once, by seed, into calibration and evaluation parts
that never overlap (stages/sources/split.py), then cut into batches in file order within each part and
tokenised per batch: padded to the batch's longest sentence (`max_length: null`), or padded and truncated
to `max_length` tokens. A batch is keyword inputs `{input_ids, attention_mask[, token_type_ids]}` (int64;
token_type_ids when the tokenizer gives them), no labels: evaluate compares with the float model.
The tokenizer is read from local files only (no download), by default from the model folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.batch import ModelInputs
from pipeline.errors import ConfigError
from stages.sources.hf_encoder import load_tokenizer, tokenizer_inputs
from stages.sources.split import split_indices
from stages.types import Batch, DataBundle

log = logging.getLogger(__name__)


def read_sentences(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        state = "is a folder" if file.is_dir() else "does not exist"
        raise ConfigError(
            f"data.factory.path='{path}' {state} (resolved: {file.resolve()}); give a UTF-8 text file with one "
            f"sentence a line."
        )
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"data.factory.path='{path}' is not UTF-8 text ({error}); give one sentence a line."
        ) from None
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise ConfigError(f"data.factory.path='{path}' has no non-empty line; give one sentence a line.")
    return sentences


def text_file_data(
    path: str,
    tokenizer: str,
    max_length: int | None = None,
    calibration_size: int | None = None,
    calibration_fraction: float = 0.5,
    evaluation_size: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> DataBundle:
    """Calibration and evaluation batches of tokenised sentences (see the module docstring)."""
    if batch_size < 1:
        raise ConfigError(f"data.factory.batch_size={batch_size} must be >= 1.")
    if max_length is not None and max_length < 2:
        raise ConfigError(
            f"data.factory.max_length={max_length} must be >= 2 (room for the special tokens), or null to pad "
            f"each batch to its longest sentence."
        )
    sentences = read_sentences(path)
    tokenize = load_tokenizer(tokenizer, "data.factory.tokenizer")
    names = tokenizer_inputs(tokenize)
    calibration, evaluation = split_indices(
        len(sentences),
        seed,
        calibration_size,
        calibration_fraction,
        evaluation_size,
        f"data.factory.path='{path}' ({len(sentences)} sentences)",
    )

    # Truncate to max_length, else to the tokenizer's own limit when it has one (a tokenizer saved without
    # model_max_length reports a huge number).
    truncate = max_length is not None or getattr(tokenize, "model_max_length", 10**30) < 10**6

    def batches(indices: list[int]) -> list[Batch]:
        chosen = [sentences[i] for i in indices]
        out: list[Batch] = []
        for start in range(0, len(chosen), batch_size):
            encoded = tokenize(
                chosen[start : start + batch_size],
                padding="longest" if max_length is None else "max_length",
                truncation=truncate,
                max_length=max_length,
                return_tensors="pt",
            )
            out.append((ModelInputs((), {name: encoded[name].to(torch.long) for name in names}), None))
        return out

    calibration_batches = batches(calibration)
    log.info(
        "text file %s: %d calibration and %d evaluation sentences, inputs %s, %s",
        path,
        len(calibration),
        len(evaluation),
        names,
        "each batch padded to its longest sentence" if max_length is None else f"padded to {max_length} tokens",
    )
    return DataBundle(
        name=f"text_file_{Path(path).stem}",
        calibration=calibration_batches,
        evaluation=batches(evaluation),
        example_inputs=calibration_batches[0][0][:1],
        has_labels=False,
    )
