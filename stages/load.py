"""Stage `load`: the float model in eval mode, example inputs, calibration and evaluation data.

Config keys read: model.factory, model.python_path, model.checkpoint, model.trained, model.name, data.factory,
data.python_path, seed.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from pipeline import metric_keys
from pipeline.batch import batch_tensors, data_digest
from pipeline.errors import ConfigError, closest, error_summary
from pipeline.paths import describe_path, is_torch_file, path_status, use_python_path
from pipeline.schema import DataSpec, ModelSpec, PipelineSpec
from stages.types import DataBundle, Loaded, StageContext, write_json

log = logging.getLogger(__name__)

NAME = "load"
CONSUMES: tuple[str, ...] = ()
USES: tuple[str, ...] = ()
PRODUCES = ("loaded",)
READS = ("model", "data", "seed")
OPTIONAL = False


def _import_target(target: str, key: str, searched: list[str]) -> object:
    """Import `target` (a dotted path) or raise a ConfigError saying where it was looked for and what to set."""
    path_key = f"{key.split('.')[0]}.python_path"
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            found: object = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and (module_name == error.name or module_name.startswith(f"{error.name}.")):
                continue  # this prefix is not a module; try a shorter one
            raise ConfigError(
                f"{key}._target_='{target}': importing '{module_name}' failed because it imports '{error.name}', "
                f"which is not installed in this environment ({sys.executable})."
            ) from error
        except Exception as error:  # a syntax error or an exception in the user's module body
            raise ConfigError(
                f"{key}._target_='{target}': importing '{module_name}' raised {type(error).__name__}: {error}"
            ) from error
        for attribute in parts[split:]:
            if not hasattr(found, attribute):
                names = [name for name in dir(found) if not name.startswith("_")]
                raise ConfigError(
                    f"{key}._target_='{target}': module '{module_name}' "
                    f"({getattr(sys.modules.get(module_name), '__file__', '?')}) has no attribute '{attribute}'."
                    f"{closest(attribute, names)}"
                )
            found = getattr(found, attribute)
        return found
    top = parts[0]
    shown = [entry or "." for entry in sys.path if entry not in searched][:6]
    raise ConfigError(
        f"{key}._target_='{target}' does not resolve: no module '{top}' was found in {path_key} "
        f"{searched or '(empty)'} nor on sys.path (first entries: {shown}). If '{top}.py' is your own file, "
        f"set {path_key} to the folder that holds it, e.g. {path_key}=[path/to/folder] (relative to where you "
        f"run); otherwise install the package that provides '{top}'."
    )


def resolve_factory(factory: dict[str, Any], key: str, python_path: list[str] | None = None) -> Any:
    """The factory's callable, imported with python_path first, its kwargs checked against its signature:
    run by pipeline.validation.validate before any work, and again by load."""
    if "_target_" not in factory:
        raise ConfigError(f"{key} needs a '_target_' naming an importable factory, got {dict(factory)}.")
    target = str(factory["_target_"])
    searched = use_python_path(list(python_path or []), target)
    found = _import_target(target, key, searched)
    kwargs = {name: value for name, value in factory.items() if not str(name).startswith("_")}
    try:
        signature = inspect.signature(found)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return found  # builtins without a signature: Hydra will tell at build time
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        raise ConfigError(
            f"{key} does not fit {target}{signature}: {error}. Give only the keyword arguments it takes."
        ) from None
    return found


def _build(factory: dict, key: str, python_path: list[str] | None = None) -> object:
    target = str(factory.get("_target_"))
    resolve_factory(factory, key, python_path)
    try:
        return instantiate(OmegaConf.create(dict(factory)) if not OmegaConf.is_config(factory) else factory)
    except Exception as error:  # Hydra wraps call errors; a factory's own ConfigError already names its key
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise ConfigError(f"{key}._target_='{target}' could not be built: {error}") from error


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state_dict with weights_only=True (no code runs from the file)."""
    file = Path(path)
    if not is_torch_file(file):  # a text file would otherwise be reported as a refused pickle
        raise ConfigError(
            f"model.checkpoint='{path}' {path_status(file)}; give the path of a state_dict saved with "
            f"torch.save(model.state_dict(), path)."
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):  # a damaged pickle, not a refused one
            raise ConfigError(
                f"model.checkpoint='{path}' ({describe_path(file)}) cannot be read as a torch file "
                f"({str(error)[:200]}); it may be truncated."
            ) from error
        raise ConfigError(
            f"model.checkpoint='{path}' ({describe_path(file)}) holds pickled Python objects (e.g. a whole "
            f"nn.Module), which torch.load(weights_only=True) refuses so that no code from the file runs; the "
            f"pipeline has no option to load it anyway. Save a state_dict instead: "
            f"torch.save(model.state_dict(), path)."
        ) from error
    except Exception as error:
        raise ConfigError(
            f"model.checkpoint='{path}' ({describe_path(file)}) cannot be read as a torch file with weights_only=True "
            f"({error_summary(error, 200)}); it may be truncated, or hold "
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
    for part, count in (("calibration", data.num_calibration_samples), ("evaluation", data.num_evaluation_samples)):
        if count == 0:
            raise ConfigError(
                f"load: data={data_spec.name} gave no {part} samples (data.factory={dict(data_spec.factory)}); "
                f"both calibration and evaluation need at least one batch."
            )


def _describe(signature: list[tuple[str, tuple[int, ...], torch.dtype]]) -> str:
    return ", ".join(f"{name} {list(shape)} {str(dtype).removeprefix('torch.')}" for name, shape, dtype in signature)


def _same_inputs(
    found: list[tuple[str, tuple[int, ...], torch.dtype]], expected: list[tuple[str, tuple[int, ...], torch.dtype]]
) -> bool:
    """The same inputs with the same dtypes and per-sample shapes; integer and bool inputs (token ids and
    masks padded per batch) may differ in their sizes, not in their number of dimensions."""
    if [(name, dtype, len(shape)) for name, shape, dtype in found] != [
        (name, dtype, len(shape)) for name, shape, dtype in expected
    ]:
        return False
    return all(
        shape == wanted or not (dtype.is_floating_point or dtype.is_complex)
        for (_, shape, dtype), (_, wanted, _) in zip(found, expected, strict=True)
    )


def _check_model_accepts(model: nn.Module, data: DataBundle, model_spec: ModelSpec, data_spec: DataSpec) -> None:
    example = data.example_inputs
    expected = example.sample_signature()
    # Every batch like the example inputs (batch size aside): the same inputs, per-sample shapes and dtypes;
    # otherwise calibrate or evaluate would fail midway on inputs the model rejects, far from the data.
    # A lazy source (decoded per pass) is checked on its first batch only: decoding the whole set here would
    # cost a full pass; its dataset checks each sample's shape as it decodes it.
    parts = [
        (part, batches if not getattr(batches, "lazy", False) else [batches[0]])
        for part, batches in (("calibration", data.calibration), ("evaluation", data.evaluation))
    ]
    for part, batches in parts:
        for position, (inputs, _) in enumerate(batches):
            found = inputs.sample_signature()
            if not _same_inputs(found, expected):
                raise ConfigError(
                    f"load: data={data_spec.name} {part} batch {position} has inputs ({_describe(found)}) per "
                    f"sample, but the example inputs have ({_describe(expected)}): every batch must have the same "
                    f"inputs with the same per-sample shapes and dtypes (calibrate and evaluate feed them all to "
                    f"model={model_spec.name}); only integer and bool inputs (token ids, masks padded per batch) "
                    f"may differ in length."
                )
            sizes = {int(tensor.shape[0]) for tensor in inputs.tensors}
            if len(sizes) != 1:
                raise ConfigError(
                    f"load: data={data_spec.name} {part} batch {position}: its inputs have different batch sizes "
                    f"{ {name: int(t.shape[0]) for name, t in inputs.named()} }; the first dimension of every "
                    f"input is the batch."
                )
    shapes = {name: list(tensor.shape) for name, tensor in example.named()}
    try:
        with torch.no_grad():
            example.call(model)
        example.positional(model)
    except Exception as error:
        raise ConfigError(
            f"load: model={model_spec.name} rejects the inputs of data={data_spec.name} (example inputs "
            f"{shapes}): {error_summary(error)}. Make the data match what the model's forward takes (e.g. "
            f"data.factory.shape for synthetic data; named inputs must be named like forward's parameters)."
        ) from error


def load(model_spec: ModelSpec, data_spec: DataSpec, seed: int) -> Loaded:
    torch.manual_seed(seed)
    model = _build(model_spec.factory, "model.factory", model_spec.python_path)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.factory._target_='{model_spec.factory['_target_']}' returned a {type(model).__name__}, "
            f"not a torch.nn.Module."
        )
    if model_spec.checkpoint is not None:
        load_checkpoint(model, model_spec.checkpoint)
    model.eval()
    data = _build(data_spec.factory, "data.factory", data_spec.python_path)
    if not isinstance(data, DataBundle):
        raise ConfigError(
            f"data.factory._target_='{data_spec.factory['_target_']}' returned a {type(data).__name__}, "
            f"not a stages.types.DataBundle."
        )
    _check_data(data, data_spec)
    for part in (data.calibration, data.evaluation):
        if hasattr(part, "num_workers"):  # a lazy source decoded by DataLoader workers (DatasetBatches)
            part.num_workers = data_spec.num_workers
    _check_model_accepts(model, data, model_spec, data_spec)
    integer = data.example_inputs.integer_names()
    if integer:
        log.info(
            "inputs %s %s integer: never observed (prepare leaves them and what is computed from them float)",
            ", ".join(integer),
            "is" if len(integer) == 1 else "are",
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


def check(spec: PipelineSpec) -> None:
    """The factories resolve and their kwargs fit (this imports a user's factory module)."""
    resolve_factory(spec.model.factory, "model.factory", spec.model.python_path)
    resolve_factory(spec.data.factory, "data.factory", spec.data.python_path)


def compute(ctx: StageContext) -> dict[str, Any]:
    return {"loaded": load(ctx.spec.model, ctx.spec.data, ctx.spec.seed)}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """float_model.txt (the module tree) and data.json (sizes and shapes); the data as a dataset input."""
    out = ctx.out_dir
    loaded: Loaded = produced["loaded"]
    data = loaded.data
    (out / "float_model.txt").write_text(str(loaded.model))
    write_json(
        out / "data.json",
        {
            "name": data.name,
            "calibration_batches": len(data.calibration),
            "evaluation_batches": len(data.evaluation),
            "example_input_shapes": [list(t.shape) for t in data.example_inputs.tensors],
            "inputs": data.example_inputs.describe(),  # per input: shape (of the example) and dtype
            "has_labels": data.has_labels,
        },
    )
    profile = {
        "calibration_samples": data.num_calibration_samples,
        "evaluation_samples": data.num_evaluation_samples,
        "input_shapes": {name: list(t.shape[1:]) for name, t in data.example_inputs.named()},
        "labels": data.has_labels,
    }
    # A lazy source (decoded per pass) is named by its fingerprint (files, indices, transforms), not decoded here.
    in_memory = [*data.calibration, *data.evaluation] if not data.lazy else []
    digest = data.fingerprint()[:16] if data.lazy else data_digest(batch_tensors(in_memory))
    source = str(ctx.spec.data.factory.get("_target_", ctx.spec.data.name))
    ctx.log_dataset(ctx.spec.data.name, digest, source, profile, "calibration+evaluation")  # MLflow's Dataset column
    return {
        metric_keys.DATA_CALIBRATION_SAMPLES: float(data.num_calibration_samples),
        metric_keys.DATA_EVALUATION_SAMPLES: float(data.num_evaluation_samples),
        metric_keys.MODEL_PARAMETERS: float(sum(p.numel() for p in loaded.model.parameters())),
    }
