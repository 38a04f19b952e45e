"""The named-qconfig library, import paths as config writes them, backend configs, and the
quantized-engine context every int8 model runs under."""

from __future__ import annotations

import contextlib
import importlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import (
    HistogramObserver,
    MinMaxObserver,
    QConfig,
    default_dynamic_qconfig,
    default_per_channel_weight_observer,
    default_weight_observer,
    float16_dynamic_qconfig,
    float_qparams_weight_only_qconfig,
    get_default_qconfig,
    per_channel_dynamic_qconfig,
)

from pipeline.engine.observers import MSEObserver, PercentileObserver, activation_range
from pipeline.errors import ConfigError, closest, error_summary
from pipeline.schema import BackendSpec

QCONFIG_LIBRARY: dict[str, tuple[str, Callable[[str], QConfig]]] = {
    "backend_default": (
        "torch's get_default_qconfig(engine): histogram activations; per-channel weights except qnnpack",
        lambda engine: get_default_qconfig(engine),
    ),
    "minmax_per_tensor": (
        "min-max activations, per-tensor symmetric int8 weights: fastest calibration, most outlier-sensitive",
        lambda engine: QConfig(
            activation=MinMaxObserver.with_args(dtype=torch.quint8, **activation_range(engine)),
            weight=default_weight_observer,
        ),
    ),
    "minmax_per_channel": (
        "min-max activations, per-channel symmetric int8 weights",
        lambda engine: QConfig(
            activation=MinMaxObserver.with_args(dtype=torch.quint8, **activation_range(engine)),
            weight=default_per_channel_weight_observer,
        ),
    ),
    "histogram_per_tensor": (
        "histogram (L2-optimal range) activations, per-tensor symmetric int8 weights",
        lambda engine: QConfig(
            activation=HistogramObserver.with_args(dtype=torch.quint8, **activation_range(engine)),
            weight=default_weight_observer,
        ),
    ),
    "histogram_per_channel": (
        "histogram activations, per-channel symmetric int8 weights: usually the most accurate",
        lambda engine: QConfig(
            activation=HistogramObserver.with_args(dtype=torch.quint8, **activation_range(engine)),
            weight=default_per_channel_weight_observer,
        ),
    ),
    "percentile_per_channel": (
        "99.99th-percentile activation range (rare outliers clipped), per-channel symmetric int8 weights",
        lambda engine: QConfig(
            activation=PercentileObserver.with_args(percentile=99.99, dtype=torch.quint8, **activation_range(engine)),
            weight=default_per_channel_weight_observer,
        ),
    ),
    "mse_per_channel": (
        "activation range minimising the expected squared quantization error, per-channel int8 weights",
        lambda engine: QConfig(
            activation=MSEObserver.with_args(dtype=torch.quint8, **activation_range(engine)),
            weight=default_per_channel_weight_observer,
        ),
    ),
    # Not static: nothing of these is calibrated. Only the op types the backend has a dtype config for
    # take them (see QCONFIG_FAMILY and README "Dynamic, weight-only and float16"); the lower stage
    # warns about a mapping entry the backend ignored.
    "dynamic": (
        "dynamic int8 (torch's default_dynamic_qconfig): per-tensor int8 weights, activations quantized per "
        "batch at run time; Linear (and LSTM/GRU), output float",
        lambda engine: default_dynamic_qconfig,
    ),
    "dynamic_per_channel": (
        "dynamic int8 with per-channel weights (torch's per_channel_dynamic_qconfig): Linear",
        lambda engine: per_channel_dynamic_qconfig,
    ),
    "weight_only": (
        "weight-only int8 (torch's float_qparams_weight_only_qconfig): per-row int8 weights, float math; "
        "Embedding / EmbeddingBag only (no native backend has a weight-only Linear)",
        lambda engine: float_qparams_weight_only_qconfig,
    ),
    "fp16_dynamic": (
        "float16 weights, dynamic (torch's float16_dynamic_qconfig): Linear on fbgemm / x86",
        lambda engine: float16_dynamic_qconfig,
    ),
}

# How each named qconfig quantizes: static (calibrated activations), dynamic (int8 activations per batch),
# weight_only, fp16. README "Dynamic, weight-only and float16" tabulates what each backend supports.
QCONFIG_FAMILY: dict[str, str] = {
    **{name: "static" for name in QCONFIG_LIBRARY},
    "dynamic": "dynamic",
    "dynamic_per_channel": "dynamic",
    "weight_only": "weight_only",
    "fp16_dynamic": "fp16",
}

# Named qconfigs an engine's kernels refuse outright (measured by tests/test_qconfig_families.py): refused
# at start-up instead of failing in the lower stage. Combinations the BackendConfig merely ignores are
# warned about after lowering (the entry is named), not refused.
ENGINE_UNSUPPORTED: dict[str, dict[str, str]] = {
    "fp16_dynamic": {
        "qnnpack": "qnnpack has no float16 Linear kernel (quantized::linear_prepack_fp16 is not supported by QNNPACK)",
    },
}


def named_qconfig(name: str | None, backend: BackendSpec, key: str) -> QConfig | None:
    """Resolve a qconfig name from config ('default' = the backend's default_qconfig); None stays None."""
    if name is None:
        return None
    if name == "default":
        name = backend.default_qconfig
    if name not in QCONFIG_LIBRARY:
        valid = ["default", *QCONFIG_LIBRARY]
        raise ConfigError(
            f"{key}='{name}' is not a known qconfig; choose one of {valid} or null (stay float).{closest(name, valid)}"
        )
    refused = ENGINE_UNSUPPORTED.get(name, {}).get(backend.engine)
    if refused is not None:
        usable = [other for other in QCONFIG_LIBRARY if backend.engine not in ENGINE_UNSUPPORTED.get(other, {})]
        raise ConfigError(
            f"{key}='{name}' cannot run on backend.engine='{backend.engine}': {refused}. Use it with backend=x86 "
            f"or backend=fbgemm, or pick another qconfig for this engine: {usable}."
        )
    return QCONFIG_LIBRARY[name][1](backend.engine)


def resolve_import(path: str, key: str, missing_module_hint: str = "") -> Any:
    """Import 'package.module.attr.attr' (classes, functions, operator.add ...) or raise ConfigError: a
    missing attribute names the module's closest names ("did you mean"); a module that fails to import
    says why; a top-level module found nowhere adds `missing_module_hint` (e.g. which python_path to set)."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            target: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is None or module_name == error.name or module_name.startswith(f"{error.name}."):
                continue  # this prefix is not a module; try a shorter one
            raise ConfigError(
                f"{key}='{path}': importing '{module_name}' failed because it imports '{error.name}', which is "
                f"not installed in this environment."
            ) from error
        except Exception as error:  # a syntax error or an exception in the module's body
            raise ConfigError(f"{key}='{path}': importing '{module_name}' raised {error_summary(error)}") from error
        for depth, attribute in enumerate(parts[split:]):
            if not hasattr(target, attribute):
                owner = ".".join(parts[: split + depth])
                where = getattr(target, "__file__", None)
                names = [name for name in dir(target) if not name.startswith("_")]
                raise ConfigError(
                    f"{key}='{path}' is not an importable path: '{owner}'{f' ({where})' if where else ''} has no "
                    f"attribute '{attribute}'.{closest(attribute, names)}"
                )
            target = getattr(target, attribute)
        return target
    raise ConfigError(
        f"{key}='{path}' is not an importable path: no module '{parts[0]}' was found. Write a full dotted path "
        f"to a class or function, e.g. 'torch.nn.Conv2d', 'torch.nn.functional.linear' or 'operator.add'."
        f"{missing_module_hint}"
    )


def import_path(obj: Any) -> str:
    """The dotted path config uses for an object type (the inverse of resolve_import, for logs)."""
    if obj is operator.add:
        return "operator.add"
    name = getattr(obj, "__name__", "")
    for public in (nn, torch):  # prefer the documented spelling: torch.nn.Conv2d, torch.add
        if name and getattr(public, name, None) is obj:
            return f"{public.__name__}.{name}"
    module = getattr(obj, "__module__", None) or "builtins"
    return f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', str(obj)))}"


def get_backend_config(name: str) -> Any:
    try:
        module = importlib.import_module(f"torch.ao.quantization.backend_config.{name}")
        getter = getattr(module, f"get_{name}_backend_config")
    except (ImportError, AttributeError):
        raise ConfigError(f"backend.backend_config='{name}' has no torch getter get_{name}_backend_config.") from None
    return getter()


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Set torch.backends.quantized.engine for the block and restore it: packed weights are built
    for the engine active when they are created, and sweeps run many jobs in one process."""
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise ConfigError(
            f"backend.engine='{engine}' is not supported by this torch build on this CPU; "
            f"supported engines are {[e for e in supported if e != 'none']}."
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
