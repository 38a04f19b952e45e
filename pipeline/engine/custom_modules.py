"""Custom modules: PrepareCustomConfig / ConvertCustomConfig from YAML (classes written as import
paths), their checks, and the YAML they are logged back as."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.ao.quantization.fx.custom_config import ConvertCustomConfig, PrepareCustomConfig

from pipeline.engine.qconfigs import import_path, resolve_import
from pipeline.errors import ConfigError, closest
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


def _class_mapping(side: dict[str, Any], name: str, key: str, method: str) -> dict[str, dict[type, type]]:
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
            source = resolve_import(str(source_path), entry)
            target = resolve_import(str(target_path), entry)
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
    float_to_observed = _class_mapping(prepare_side, _FLOAT_TO_OBSERVED, "custom_config.prepare", "from_float")
    observed_to_quantized = _class_mapping(
        convert_side, _OBSERVED_TO_QUANTIZED, "custom_config.convert", "from_observed"
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
            resolve_import(path, f"custom_config.prepare.non_traceable_module_class[{i}]")
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
