"""Custom modules: PrepareCustomConfig / ConvertCustomConfig from YAML (classes written as import
paths, resolved through custom_config.python_path and model.python_path), their checks, the contract
their classes must keep (checked by a dry run before calibration), and the YAML they are logged back as."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.ao.quantization.fx.custom_config import ConvertCustomConfig, PrepareCustomConfig

from pipeline.batch import ModelInputs
from pipeline.engine.qconfigs import import_path, quantized_engine, resolve_import
from pipeline.errors import ConfigError, closest, error_summary
from pipeline.paths import use_python_path
from pipeline.schema import CustomConfigSpec

QUANT_MODES: tuple[str, ...] = ("static", "dynamic", "weight_only")  # post-training modes (no qat here)
_FLOAT_TO_OBSERVED = "float_to_observed_custom_module_class"
_OBSERVED_TO_QUANTIZED = "observed_to_quantized_custom_module_class"
PREPARE_KEYS: tuple[str, ...] = (
    _FLOAT_TO_OBSERVED,
    "non_traceable_module_name",
    "non_traceable_module_class",
    "preserved_attributes",
)
CONVERT_KEYS: tuple[str, ...] = (_OBSERVED_TO_QUANTIZED, "preserved_attributes")


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _check_keys(side: dict[str, Any], valid: tuple[str, ...], key: str) -> None:
    for name in side:
        if name not in valid:
            raise ConfigError(
                f"{key}.{name} is not a key this pipeline passes to torch; valid keys are {list(valid)}."
                f"{closest(str(name), valid)}"
            )


def _check_string_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key}={value!r} must be a list of strings.")
    return value


def _resolve(path: str, key: str, spec: CustomConfigSpec) -> Any:
    """An import path of custom_config, looked up with custom_config.python_path first; model.python_path
    is on sys.path too by then (pipeline.validation and the load stage put it there)."""
    use_python_path(list(spec.python_path), path)
    hint = (
        f" If '{path.split('.')[0]}.py' is your own file, set custom_config.python_path (or model.python_path, "
        f"when it sits beside your model) to the folder that holds it, e.g. custom_config.python_path=[my_project]."
    )
    return resolve_import(path, key, hint)


def _class_mapping(
    side: dict[str, Any], name: str, key: str, method: str, spec: CustomConfigSpec
) -> dict[str, dict[type, type]]:
    """{mode: {class: class}} from {mode: {'import.path': 'import.path'}}, checking modes, paths and that
    every target class has the classmethod torch will call on it (from_float / from_observed)."""
    resolved: dict[str, dict[type, type]] = {}
    modes = side.get(name, {})
    if not isinstance(modes, dict):
        raise ConfigError(f"{key}.{name}={modes!r} must map a quant mode ({list(QUANT_MODES)}) to {{class: class}}.")
    for mode, classes in modes.items():
        if mode not in QUANT_MODES:
            raise ConfigError(
                f"{key}.{name} has quant mode '{mode}', which is not valid; key the class mappings by one of "
                f"{list(QUANT_MODES)}.{closest(str(mode), QUANT_MODES)}"
            )
        if not isinstance(classes, dict):
            raise ConfigError(f"{key}.{name}.{mode}={classes!r} must map an import path to an import path.")
        resolved[mode] = {}
        for source_path, target_path in classes.items():
            entry = f"{key}.{name}.{mode}['{source_path}']"
            source = _resolve(str(source_path), entry, spec)
            target = _resolve(str(target_path), entry, spec)
            if not callable(getattr(target, method, None)):
                raise ConfigError(
                    f"{entry}='{target_path}' has no classmethod {method}(), which torch calls to build it from "
                    f"the {'float' if method == 'from_float' else 'observed'} module; map to a class that defines "
                    f"{method}."
                )
            resolved[mode][source] = target
    return resolved


def _resolved_custom_dicts(spec: CustomConfigSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The from_dict dicts with classes resolved, after every check that needs no model."""
    prepare_side, convert_side = _plain(spec.prepare) or {}, _plain(spec.convert) or {}
    _check_keys(prepare_side, PREPARE_KEYS, "custom_config.prepare")
    _check_keys(convert_side, CONVERT_KEYS, "custom_config.convert")
    prepare_dict: dict[str, Any] = {}
    convert_dict: dict[str, Any] = {}
    float_to_observed = _class_mapping(prepare_side, _FLOAT_TO_OBSERVED, "custom_config.prepare", "from_float", spec)
    observed_to_quantized = _class_mapping(
        convert_side, _OBSERVED_TO_QUANTIZED, "custom_config.convert", "from_observed", spec
    )
    for mode, classes in observed_to_quantized.items():
        for observed in classes:
            if observed not in float_to_observed.get(mode, {}).values():
                entry = f"custom_config.convert.{_OBSERVED_TO_QUANTIZED}.{mode}['{import_path(observed)}']"
                produced = [import_path(c) for c in float_to_observed.get(mode, {}).values()]
                raise ConfigError(
                    f"{entry}: no custom_config.prepare.{_FLOAT_TO_OBSERVED}.{mode} entry maps a float class to "
                    f"'{import_path(observed)}', so no module of that class exists at convert time. Map a float class "
                    f"to it on the prepare side, or key this entry by an observed class the prepare side produces "
                    f"for {mode}: {produced or 'none'}."
                )
    if float_to_observed:
        prepare_dict[_FLOAT_TO_OBSERVED] = float_to_observed
    if observed_to_quantized:
        convert_dict[_OBSERVED_TO_QUANTIZED] = observed_to_quantized
    if "non_traceable_module_name" in prepare_side:
        prepare_dict["non_traceable_module_name"] = _check_string_list(
            prepare_side["non_traceable_module_name"], "custom_config.prepare.non_traceable_module_name"
        )
    if "non_traceable_module_class" in prepare_side:
        paths = _check_string_list(
            prepare_side["non_traceable_module_class"], "custom_config.prepare.non_traceable_module_class"
        )
        prepare_dict["non_traceable_module_class"] = [
            _resolve(path, f"custom_config.prepare.non_traceable_module_class[{i}]", spec)
            for i, path in enumerate(paths)
        ]
    for side, out, key in ((prepare_side, prepare_dict, "prepare"), (convert_side, convert_dict, "convert")):
        if "preserved_attributes" in side:
            out["preserved_attributes"] = _check_string_list(
                side["preserved_attributes"], f"custom_config.{key}.preserved_attributes"
            )
    return prepare_dict, convert_dict


def check_custom_config(spec: CustomConfigSpec) -> None:
    """Every import path, quant mode and class pairing of custom_config (raises ConfigError)."""
    _resolved_custom_dicts(spec)


def build_custom_configs(spec: CustomConfigSpec) -> tuple[PrepareCustomConfig, ConvertCustomConfig]:
    """PrepareCustomConfig / ConvertCustomConfig from their from_dict shapes (empty for `none`)."""
    prepare_dict, convert_dict = _resolved_custom_dicts(spec)
    return PrepareCustomConfig.from_dict(prepare_dict), ConvertCustomConfig.from_dict(convert_dict)


def _with_import_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {_with_import_paths(k): _with_import_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_with_import_paths(item) for item in value]
    return import_path(value) if isinstance(value, type) else value


def custom_config_yaml(config: PrepareCustomConfig | ConvertCustomConfig) -> str:
    """The config's to_dict() as YAML with classes written back as import paths (what custom_config takes)."""
    import yaml

    kind = type(config).__name__
    header = f"# {kind}.to_dict() of this run, classes as import paths (the shape custom_config takes).\n"
    return header + yaml.safe_dump(_with_import_paths(config.to_dict()), sort_keys=False)


def preserved_attributes(model: nn.Module) -> dict[str, Any]:
    """The attributes prepare/convert kept on a model because custom_config listed them."""
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

    meta = getattr(model, "meta", {})
    return dict(meta.get(_USER_PRESERVED_ATTRIBUTES_KEY, {}))


# --------------------------------------------------------------------------------------------------
# The custom-module contract, checked on a prepared model by a dry run before calibration.

README_SECTION = "README 'Custom modules'"


def _quant_mode(qconfig: Any) -> str:
    from torch.ao.quantization.utils import activation_is_dynamically_quantized, activation_is_statically_quantized

    if activation_is_statically_quantized(qconfig):
        return "static"
    return "dynamic" if activation_is_dynamically_quantized(qconfig) else "weight_only"


def _is_observer(module: Any) -> bool:
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase

    return isinstance(module, (ObserverBase, FakeQuantizeBase))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {'quantized' if value.is_quantized else 'non-quantized'} {value.dtype} tensor"
    return f"a {type(value).__name__}"


def _quantized_input(value: Any, observer: Any) -> Any:
    """`value` as convert feeds it to a static custom module: quantized with its input observer's qparams."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    if observer is None:
        return torch.quantize_per_tensor_dynamic(value, torch.quint8, False)
    scale, zero_point = observer.calculate_qparams()
    return torch.quantize_per_tensor(value, float(scale), int(zero_point), observer.dtype)


def check_contract(prepared: nn.Module, example_inputs: ModelInputs, spec: CustomConfigSpec, engine: str) -> None:
    """The rules torch relies on but checks late (at convert or lower, in long tracebacks), checked on a
    freshly prepared model, before calibration; a broken rule is a ConfigError naming the class and the rule:
    1. the observed class's from_float(float_module) keeps `.qconfig` (convert reads it);
    2. the quantized class's from_observed(observed) builds a module whose forward, on the inputs convert
       gives it, runs; for quant mode static it takes a quantized tensor and returns a quantized tensor.
    Rule 2 is a dry run on a copy: the example inputs go through the prepared model (filling the copy's
    observers), then each observed custom module is converted on its own and run on its recorded input."""
    import copy

    from torch.fx import GraphModule

    prepare_dict, convert_dict = _resolved_custom_dicts(spec)
    observed_classes = {
        observed: (mode, source)
        for mode, classes in prepare_dict.get(_FLOAT_TO_OBSERVED, {}).items()
        for source, observed in classes.items()
    }
    instances = [name for name, module in prepared.named_modules() if type(module) in observed_classes]
    if not instances or not isinstance(prepared, GraphModule):
        return
    for name in instances:
        module = prepared.get_submodule(name)
        mode, source = observed_classes[type(module)]
        if getattr(module, "qconfig", None) is None:
            entry = f"custom_config.prepare.{_FLOAT_TO_OBSERVED}.{mode}['{import_path(source)}']"
            cls = import_path(type(module))
            raise ConfigError(
                f"{entry}='{cls}': module '{name}' that {cls}.from_float() built has no .qconfig. Rule: the observed "
                f"class must carry the float module's qconfig over (`observed.qconfig = float_module.qconfig`; "
                f"prepare_fx sets it on the float module just before calling from_float), because convert reads it "
                f"to choose the quantized class; without it convert fails with AttributeError: "
                f"'{type(module).__name__}' object has no attribute 'qconfig'. Found before calibration; see "
                f"{README_SECTION}."
            )
    dry = copy.deepcopy(prepared)
    recorded: dict[str, tuple[Any, ...]] = {}
    hooks = [
        dry.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: recorded.setdefault(name, args)
        )
        for name in instances
    ]
    try:
        with quantized_engine(engine), torch.no_grad():
            example_inputs.call(dry)
    finally:
        for hook in hooks:
            hook.remove()
    nodes = {str(node.target): node for node in dry.graph.nodes if node.op == "call_module"}
    for name in instances:
        observed = dry.get_submodule(name)
        args = recorded.get(name)
        mode = _quant_mode(observed.qconfig)
        quantized_class = convert_dict.get(_OBSERVED_TO_QUANTIZED, {}).get(mode, {}).get(type(observed))
        if args is None or quantized_class is None or name not in nodes:
            continue  # not run on the example inputs, or convert leaves it as it is
        node = nodes[name]

        def observer_of(candidate: Any) -> Any:
            if getattr(candidate, "op", None) != "call_module":
                return None
            module = dry.get_submodule(str(candidate.target))
            return module if _is_observer(module) else None

        if mode == "static":
            observed.activation_post_process = next(
                (found for found in map(observer_of, node.users) if found is not None), None
            )
            args = tuple(
                _quantized_input(arg, observer_of(node.args[i]) if i < len(node.args) else None)
                for i, arg in enumerate(args)
            )
        entry = f"custom_config.convert.{_OBSERVED_TO_QUANTIZED}.{mode}['{import_path(type(observed))}']"
        cls = import_path(quantized_class)
        given = ", ".join(_describe(arg) for arg in args)
        rule = (
            "Rule: for quant mode static, the quantized class takes a quantized tensor and returns a quantized "
            "tensor (e.g. torch.quantize_per_tensor(y, scale, zero_point, torch.quint8) with the qparams of "
            "observed.activation_post_process, the observer of the block's output that convert attaches before "
            "calling from_observed); otherwise the next int8 op fails (NotImplementedError: Could not run "
            "'quantized::...', then KeyError: torch.quint8 in lower)"
            if mode == "static"
            else f"Rule: for quant mode {mode}, the quantized class takes and returns float tensors"
        )
        try:
            quantized = quantized_class.from_observed(observed)
        except Exception as error:
            raise ConfigError(
                f"{entry}='{cls}': {cls}.from_observed() raised {error_summary(error)} on module '{name}' "
                f"(calibrated on the example inputs). Found by a dry run before calibration; see {README_SECTION}."
            ) from error
        try:
            with quantized_engine(engine), torch.no_grad():
                output = quantized(*args)
        except Exception as error:
            raise ConfigError(
                f"{entry}='{cls}': module '{name}' built by {cls}.from_observed() raised {error_summary(error)} "
                f"when given {given}. {rule}. Found by a dry run on the example inputs, before calibration; see "
                f"{README_SECTION}."
            ) from error
        quantized_out = isinstance(output, torch.Tensor) and output.is_quantized
        if (mode == "static") != quantized_out:
            raise ConfigError(
                f"{entry}='{cls}': module '{name}' built by {cls}.from_observed() returned {_describe(output)} when "
                f"given {given}. {rule}. Found by a dry run on the example inputs, before calibration; see "
                f"{README_SECTION}."
            )
