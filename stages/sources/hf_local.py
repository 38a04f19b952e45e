"""A Hugging Face model folder (what save_pretrained writes) read from its files, without transformers'
hub loaders.

Why: `from_pretrained` is the hub's entry point; even with `local_files_only=True` it is the call that
downloads when a flag is missed, and this tool must never download. Reading the folder's own files says
what is read: config.json builds the architecture (`AutoModel.from_config`), the weights come from
model.safetensors or pytorch_model.bin (sharded ones through their index), and the tokenizer is the class
tokenizer_config.json names, built from the folder's vocabulary files and its string settings.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _weight_files(folder: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():  # sharded: every shard the index names
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"no weights in {folder}: none of {', '.join(WEIGHT_FILES)} (or their .index.json)")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def read_model(transformers: ModuleType, folder: Path) -> nn.Module:
    """The folder's base model (eager attention) in eval mode. A checkpoint saved with a task head (keys
    under the base model's prefix, e.g. `bert.`) gives its base model; the head's weights are left out.
    Every weight the architecture needs must be in the files, except its pooler (unused by the encoder)."""
    settings = json.loads((folder / "config.json").read_text())
    config = transformers.AutoConfig.for_model(**settings)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager")
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        state.update(_read_weights(path))
    prefix = f"{model.base_model_prefix}."
    expected = set(model.state_dict())
    if not expected & set(state) and any(key.startswith(prefix) for key in state):
        state = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    missing, _ = model.load_state_dict(state, strict=False)  # unexpected keys: a head, old buffers
    needed = [key for key in missing if not key.startswith("pooler.")]
    if needed:
        raise KeyError(f"the weights in {folder} lack {len(needed)} the model needs, e.g. {needed[:3]}")
    return model.eval()


def read_tokenizer(transformers: ModuleType, folder: Path) -> Any:
    """The tokenizer class tokenizer_config.json names (PreTrainedTokenizerFast over tokenizer.json when it
    names none), built from the vocabulary files that class takes and the config's plain settings (special
    tokens, lower-casing, maximum length)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    special = folder / "special_tokens_map.json"
    if special.is_file():
        for key, value in json.loads(special.read_text()).items():
            config.setdefault(key, value.get("content") if isinstance(value, dict) else value)
    name = config.get("tokenizer_class") or "PreTrainedTokenizerFast"
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"tokenizer_config.json names tokenizer_class={name!r}, which transformers does not have")
    files = {arg: str(folder / file) for arg, file in cls.vocab_files_names.items() if (folder / file).is_file()}
    if not files:
        raise FileNotFoundError(f"none of {name}'s files ({', '.join(cls.vocab_files_names.values())}) in {folder}")
    accepted = set(inspect.signature(cls.__init__).parameters) | set(cls.SPECIAL_TOKENS_ATTRIBUTES)
    accepted |= {"model_max_length", "padding_side", "truncation_side", "model_input_names"}

    def plain(value: Any) -> bool:
        if isinstance(value, list):
            return all(isinstance(item, str) for item in value)
        return isinstance(value, (str, int, float, bool))

    settings = {key: value for key, value in config.items() if key in accepted and plain(value)}
    settings.pop("name_or_path", None)
    return cls(**files, **{key: value for key, value in settings.items() if key not in files})
