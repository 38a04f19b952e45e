"""Stage `load`: the float model in eval mode, example inputs, calibration and evaluation data.

Config keys read: model.factory, model.checkpoint, model.trained, model.name, data.factory, seed.
"""

from __future__ import annotations

import logging
import pickle
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
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):  # a damaged pickle, not a refused one
            raise ConfigError(
                f"model.checkpoint='{path}' cannot be read as a torch file ({str(error)[:200]}); it may be truncated."
            ) from error
        raise ConfigError(
            f"model.checkpoint='{path}' holds pickled Python objects (e.g. a whole nn.Module), which "
            f"torch.load(weights_only=True) refuses so that no code from the file runs; the pipeline has no "
            f"option to load it anyway. Save a state_dict instead: torch.save(model.state_dict(), path)."
        ) from error
    except Exception as error:
        raise ConfigError(
            f"model.checkpoint='{path}' cannot be read as a torch file with weights_only=True "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); it may be truncated, or hold "
            f"pickled objects rather than a state_dict of tensors. Save one with torch.save(model.state_dict(), path)."
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"model.checkpoint='{path}' holds a {type(state).__name__}, not a state_dict (a dict of tensors); "
            f"save one with torch.save(model.state_dict(), path)."
        )
    expected = model.state_dict().keys()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise ConfigError(
            f"model.checkpoint='{path}' does not fit the model built by model.factory: "
            f"{len(missing)} missing keys (first: {missing[:5]}) and {len(unexpected)} unexpected keys "
            f"(first: {unexpected[:5]}). Check that the checkpoint belongs to this architecture and its kwargs."
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # same keys, different shapes
        raise ConfigError(f"model.checkpoint='{path}' does not fit the model: {error}") from error


def _check_data(data: DataBundle, data_spec: DataSpec) -> None:
    for part, batches in (("calibration", data.calibration), ("evaluation", data.evaluation)):
        if not batches or sum(int(x.shape[0]) for x, _ in batches) == 0:
            raise ConfigError(
                f"load: data={data_spec.name} gave no {part} samples (data.factory={dict(data_spec.factory)}); "
                f"both calibration and evaluation need at least one batch."
            )


def _check_model_accepts(model: nn.Module, data: DataBundle, model_spec: ModelSpec, data_spec: DataSpec) -> None:
    shapes = [tuple(t.shape) for t in data.example_inputs]
    # Every batch like the example inputs (batch size aside): otherwise calibrate or evaluate would fail
    # midway on a shape the model rejects, far from the data that caused it.
    sample_shape = shapes[0][1:]
    for part, batches in (("calibration", data.calibration), ("evaluation", data.evaluation)):
        for position, (inputs, _) in enumerate(batches):
            if tuple(inputs.shape[1:]) != sample_shape:
                raise ConfigError(
                    f"load: data={data_spec.name} {part} batch {position} has shape {tuple(inputs.shape)}, but the "
                    f"example inputs have {shapes[0]}: every batch must have the per-sample shape {sample_shape} "
                    f"(calibrate and evaluate feed them all to model={model_spec.name})."
                )
    try:
        with torch.no_grad():
            model(*data.example_inputs)
    except Exception as error:
        raise ConfigError(
            f"load: model={model_spec.name} rejects the inputs of data={data_spec.name} (example input shapes "
            f"{shapes}): {type(error).__name__}: {str(error).splitlines()[0][:300]}. Make the data's shape match "
            f"what the model expects (e.g. data.factory.shape for synthetic data)."
        ) from error


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
    _check_data(data, data_spec)
    _check_model_accepts(model, data, model_spec, data_spec)
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
