"""model=hf_encoder: a Hugging Face BERT-style encoder from a local folder, as a sentence-embedding model.

Needs the optional extra `[hf]` (transformers 4.57.x: the last line with `transformers.utils.fx`, Hugging
Face's FX tracer; 5.x removed it). Nothing is ever downloaded: the folder's files are read directly
(stages/sources/hf_local.py: no hub loader is called) and HF_HUB_OFFLINE=1 is set before transformers is
imported.

What `hf_encoder(path)` returns is a torch.fx GraphModule that prepare_fx takes as it is:
- the model loads with `attn_implementation="eager"` (sdpa does not trace: `torch.finfo() requires a
  floating point input type`), then is traced with `transformers.utils.fx.symbolic_trace`, with
  token_type_ids and position_ids as graph inputs (a size() proxy cannot slice the position buffer);
- its forward takes the tokenizer's inputs by name, `forward(input_ids, attention_mask[, token_type_ids])`
  (token_type_ids when the folder's tokenizer gives them), and computes position_ids itself;
- it pools like sentence-transformers: the mean of the last hidden states over the attention mask
  (`pooling: cls` takes the first token's), optionally L2-normalised, so the output is [batch, hidden];
- the traced graph is nested again along the modules it was recorded in (stages/sources/module_scopes.py):
  module names are the encoder's own (embeddings.word_embeddings, encoder.layer.3.output.dense, ...) and
  the functional ops of a layer (its attention matmuls, softmax, residual adds) have that layer's scope,
  so qconfig_mapping / skip entries by module_name and module_name_object_type_order reach one layer.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule

from pipeline.errors import ConfigError, error_summary
from stages.sources.hf_local import read_model, read_tokenizer
from stages.sources.module_scopes import nest_by_module_stack

log = logging.getLogger(__name__)

TRANSFORMERS_PIN = "4.57"  # the [hf] extra pins transformers==4.57.*
INSTALL = "pip install --no-deps 'transformers==4.57.*' && pip install -e '.[hf]'"  # README "Bring your own"
POOLINGS = ("mean", "cls")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def require_transformers(key: str) -> ModuleType:
    """transformers with its FX tracer, offline; else a ConfigError naming `key` and the install command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, whatever a caller forgets
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        transformers = importlib.import_module("transformers")
        importlib.import_module("transformers.utils.fx")
    except ImportError as error:
        found = importlib.util.find_spec("transformers")
        version = "" if found is None else f" (installed: {_version()})"
        raise ConfigError(
            f"{key} needs transformers {TRANSFORMERS_PIN}.x with its FX tracer (transformers.utils.fx){version}: "
            f"{error_summary(error, 200)}. Install the [hf] extra without letting pip move torch: {INSTALL}"
        ) from error
    return transformers


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:
        return "unknown"


def _folder(path: str, key: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        state = "does not exist" if not folder.exists() else "has no config.json"
        raise ConfigError(
            f"{key}='{path}' {state} (resolved: {folder.resolve()}); give a local Hugging Face model folder "
            f"(config.json, model weights and tokenizer files, e.g. from save_pretrained). Nothing is downloaded."
        )
    return folder


def load_tokenizer(path: str, key: str) -> Any:
    """The folder's tokenizer, from local files only."""
    transformers = require_transformers(key)
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(
            f"{key}='{path}' is not a folder (resolved: {folder.resolve()}); give the local model folder that holds "
            f"the tokenizer files (tokenizer.json or vocab.txt, tokenizer_config.json)."
        )
    try:
        return read_tokenizer(transformers, folder)
    except Exception as error:
        raise ConfigError(
            f"{key}='{path}': no tokenizer loads from this folder's files ({error_summary(error, 300)}). "
            f"Save one there with tokenizer.save_pretrained(folder)."
        ) from error


def tokenizer_inputs(tokenizer: Any) -> list[str]:
    """The model inputs a tokenizer gives, in forward order: input_ids, attention_mask[, token_type_ids]."""
    given = set(getattr(tokenizer, "model_input_names", ()) or ())
    return [name for name in TEXT_INPUTS if name in given or name in ("input_ids", "attention_mask")]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling: the average of the token states where the mask is 1."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The first token's state ([CLS])."""
    return hidden[:, 0]


def l2_normalize(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings, p=2.0, dim=1)


def sequence_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """BERT's position ids: 0..length-1 for every row."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)


def padding_positions(attention_mask: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa-style position ids: padding_idx + 1.. for real tokens, padding_idx for padding."""
    mask = attention_mask.to(torch.long)
    return torch.cumsum(mask, dim=1) * mask + padding_idx


def _load(transformers: ModuleType, folder: Path, path: str) -> nn.Module:
    try:
        return read_model(transformers, folder)
    except Exception as error:
        raise ConfigError(
            f"model.factory.path='{path}' does not load as a transformers.AutoModel from its files (config.json "
            f"and model.safetensors or pytorch_model.bin; eager attention): {error_summary(error, 300)}"
        ) from error


def hf_encoder(path: str, pooling: str = "mean", normalize: bool = False) -> GraphModule:
    """The encoder in `path` (a local folder) as a traced, pooled GraphModule; see the module docstring."""
    if pooling not in POOLINGS:
        raise ConfigError(f"model.factory.pooling='{pooling}' is not one of {list(POOLINGS)}.")
    transformers = require_transformers("model=hf_encoder")
    from transformers.utils.fx import symbolic_trace

    folder = _folder(path, "model.factory.path")
    model = _load(transformers, folder, path)
    parameters = inspect.signature(model.forward).parameters
    missing = [name for name in ("input_ids", "attention_mask") if name not in parameters]
    if missing:
        raise ConfigError(
            f"model.factory.path='{path}' holds a {type(model).__name__}, whose forward has no {missing}: "
            f"model=hf_encoder takes encoders fed token ids and an attention mask (BERT-style)."
        )
    tokenizer_files = any((folder / name).exists() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    inputs = tokenizer_inputs(load_tokenizer(path, "model.factory.path")) if tokenizer_files else list(TEXT_INPUTS[:2])
    inputs = [name for name in inputs if name in parameters]
    traced_inputs = [*inputs, *(name for name in ("token_type_ids", "position_ids") if name in parameters)]
    traced_inputs = list(dict.fromkeys(traced_inputs))
    try:
        traced = symbolic_trace(model, input_names=traced_inputs)
    except Exception as error:
        raise ConfigError(
            f"model.factory.path='{path}': Hugging Face's FX tracer cannot trace {type(model).__name__} "
            f"({error_summary(error, 300)}). model=hf_encoder supports the architectures "
            f"transformers.utils.fx supports (BERT and its relatives)."
        ) from error

    graph = Graph()
    given = {name: graph.placeholder(name) for name in inputs}
    values = dict(given)
    if "token_type_ids" in traced_inputs and "token_type_ids" not in values:
        values["token_type_ids"] = graph.call_function(torch.zeros_like, (given["input_ids"],))
    if "position_ids" in traced_inputs:
        padding_idx = getattr(getattr(model, "embeddings", None), "padding_idx", None)
        if padding_idx is not None and hasattr(type(model.embeddings), "create_position_ids_from_input_ids"):
            values["position_ids"] = graph.call_function(padding_positions, (given["attention_mask"], padding_idx))
        else:
            values["position_ids"] = graph.call_function(sequence_positions, (given["input_ids"],))
    value_map = {node: values[str(node.target)] for node in traced.graph.nodes if node.op == "placeholder"}
    output = graph.graph_copy(traced.graph, value_map)
    hidden = output["last_hidden_state"] if isinstance(output, dict) else output[0]
    pool = mean_pool if pooling == "mean" else cls_pool
    embeddings = graph.call_function(pool, (hidden, given["attention_mask"]))
    if normalize:
        embeddings = graph.call_function(l2_normalize, (embeddings,))
    graph.output(embeddings)
    GraphModule(traced, graph).graph.eliminate_dead_code()  # the pooler head and the unused outputs
    encoder = nest_by_module_stack(traced, graph, f"{type(model).__name__}SentenceEncoder", model)
    log.info(
        "hf_encoder: %s from %s (transformers %s, eager attention), inputs %s, %s pooling%s",
        type(model).__name__,
        path,
        transformers.__version__,
        inputs,
        pooling,
        ", L2-normalised" if normalize else "",
    )
    return encoder.eval()
