"""Stage `load`: the float model in eval mode, example inputs, calibration and evaluation data.

Config keys read: model.factory, model.checkpoint, model.trained, model.name, data.factory, seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from pipeline.schema import ConfigError, DataSpec, ModelSpec
from stages.types import DataBundle, Loaded

log = logging.getLogger(__name__)


def _build(factory: dict, key: str) -> object:
    if "_target_" not in factory:
        raise ConfigError(f"{key} needs a '_target_' naming an importable factory, got {dict(factory)}.")
    try:
        return instantiate(OmegaConf.create(dict(factory)) if not OmegaConf.is_config(factory) else factory)
    except Exception as error:  # Hydra wraps import and call errors alike
        raise ConfigError(
            f"{key}._target_='{factory['_target_']}' could not be built: {error}. The target must be an "
            f"importable callable (a dotted path; a user file's folder must be on PYTHONPATH)."
        ) from error


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state_dict with weights_only=True (no code runs from the file)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model.checkpoint='{path}' does not exist; give the path of a state_dict file.")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ConfigError(f"model.checkpoint='{path}' holds a {type(state).__name__}, not a state_dict.")
    model.load_state_dict(state)


def load(model_spec: ModelSpec, data_spec: DataSpec, seed: int) -> Loaded:
    torch.manual_seed(seed)
    model = _build(model_spec.factory, "model.factory")
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.factory._target_='{model_spec.factory['_target_']}' returned a {type(model).__name__}, "
            f"not a torch.nn.Module."
        )
    if model_spec.checkpoint is not None:
        load_checkpoint(model, model_spec.checkpoint)
    model.eval()
    data = _build(data_spec.factory, "data.factory")
    if not isinstance(data, DataBundle):
        raise ConfigError(
            f"data.factory._target_='{data_spec.factory['_target_']}' returned a {type(data).__name__}, "
            f"not a stages.types.DataBundle."
        )
    log.info(
        "model=%s (%d parameters%s), data=%s: %d calibration and %d evaluation samples",
        model_spec.name,
        sum(p.numel() for p in model.parameters()),
        "" if model_spec.trained else ", RANDOM weights: accuracy is not meaningful",
        data_spec.name,
        data.num_calibration_samples,
        data.num_evaluation_samples,
    )
    return Loaded(model=model, data=data, model_name=model_spec.name, trained_weights=model_spec.trained)
