"""torchao for the PT2E engine (engine/pt2e.py): importing it quietly, the Quantizer for a backend, and the
start-up checks of what a Quantizer can express (skip-lists and mapping entries fold into its prepare-time
configuration; call-order entries, FX library qconfig names and unconfigurable op types are refused; custom
modules stay float as custom ops, pt2e_custom.py)."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pipeline.engine.qconfigs import import_path, resolve_import
from pipeline.errors import ConfigError
from pipeline.schema import (
    BackendSpec,
    CustomConfigSpec,
    EngineSpec,
    ModuleNameEntry,
    ModuleNameRegexEntry,
    ObjectTypeEntry,
    QConfigMappingSpec,
    SkipSpec,
)

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install the [pt2e] extra without letting pip move torch: pip install --no-deps 'torchao==0.18.0' "
    "(README 'Two engines')"
)
# Quantizer config values a mapping entry may name: the quantizer's own default, or null (stay float).
PT2E_QCONFIGS = ("default", None)


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    """torchao's import logs a warning per CUDA-only .so it cannot load and torch warns about an Enum it
    registers: silence exactly those two loggers and, below, two warnings, nothing broader."""
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# deepcopy of an exported module and torch.export.save warn about pytree's LeafSpec; the Enum one is the
# same registration when it goes through warnings instead of logging.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*is an Enum subclass and is now natively supported", category=UserWarning)


def torchao_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def torchao_module() -> Any:
    """The torchao pt2e modules, imported once, quietly; ConfigError when torchao is not installed."""
    try:
        with quiet_import():
            import torchao.quantization.pt2e as pt2e
            import torchao.quantization.pt2e.quantize_pt2e as quantize_pt2e
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    except ImportError as error:
        raise ConfigError(f"engine=pt2e needs torchao, which does not import here ({error}); {INSTALL_HINT}.") from None
    return pt2e, quantize_pt2e, x86


def _xnnpack() -> Any:
    with quiet_import():
        import torchao.testing.pt2e._xnnpack_quantizer as xnnpack
    return xnnpack


# --------------------------------------------------------------------------------------------------
# Config checks and the quantizer

REFUSED_BACKENDS = {
    "fbgemm": "pt2e has no fbgemm quantizer: X86InductorQuantizer targets the same CPUs (fbgemm and oneDNN "
    "kernels through inductor); use backend=x86",
    "onednn": "pt2e has no separate oneDNN quantizer: X86InductorQuantizer lowers to oneDNN kernels through "
    "inductor; use backend=x86 (engine.reduce_range=false gives onednn's 8-bit activations)",
}


def reduce_range(spec: EngineSpec, bits: int | None = None) -> bool:
    """7-bit activations: engine.reduce_range, else recovery.activation_bits (resolved: 7 or 8), else by CPU
    (8 bits need VNNI to be exact, as for FX)."""
    if spec.reduce_range is not None:
        return spec.reduce_range
    if bits is not None:
        return bits == 7
    return not torch.cpu._is_vnni_supported()


def _type_entries(backend: BackendSpec) -> dict[Any, str]:
    """Types / functions an object_type entry may name for this backend's quantizer: {object: why-not or ''}."""
    if backend.engine == "x86":
        _, _, x86 = torchao_module()
        return dict.fromkeys(x86.X86InductorQuantizer.module_function_to_aten_operator_type, "")
    return {}


def _check_qconfig(value: str | None, key: str) -> None:
    if value not in PT2E_QCONFIGS:
        raise ConfigError(
            f"{key}='{value}' with engine=pt2e: a pt2e Quantizer takes its own QuantizationConfig, not the FX "
            f"qconfig library's named qconfigs; use 'default' (the quantizer's default config) or null (stay "
            f"float), or engine=fx for named qconfigs."
        )


def check_specs(backend: BackendSpec, mapping: QConfigMappingSpec, skip: SkipSpec, custom: CustomConfigSpec) -> None:
    """Everything pt2e cannot express, refused with the reason before any work."""
    torchao_module()
    if backend.engine in REFUSED_BACKENDS:
        raise ConfigError(f"backend={backend.engine} with engine=pt2e: {REFUSED_BACKENDS[backend.engine]}.")
    if backend.engine == "qnnpack":
        _xnnpack()
    if custom.prepare or custom.convert:
        # Class paths checked here; a block's call signature is checked when it is wrapped (pt2e_custom.py).
        from pipeline.engine.custom_modules import check_custom_config

        check_custom_config(custom)
    if mapping.clamp_bounded_activations:
        raise ConfigError(
            "qconfig_mapping.clamp_bounded_activations=true with engine=pt2e: the clamp edits FX observers; "
            "X86InductorQuantizer already annotates conv+relu patterns. Use engine=fx or set it to false."
        )
    if mapping.base != "backend_default":
        raise ConfigError(
            f"qconfig_mapping.base='{mapping.base}' with engine=pt2e: the quantizer's defaults are its base; "
            f"use base=backend_default."
        )
    _check_qconfig(mapping.global_qconfig, "qconfig_mapping.global_qconfig")
    for prefix, spec in (("qconfig_mapping", mapping), ("skip", skip)):
        if spec.module_name_object_type_order:
            raise ConfigError(
                f"{prefix}.module_name_object_type_order with engine=pt2e: a pt2e Quantizer has no call-order "
                f"entries (only module names and module types); use {prefix}.module_name, or engine=fx."
            )
    allowed = _type_entries(backend)
    entries = [
        (f"qconfig_mapping.object_type[{i}]", e.object_type, e.qconfig) for i, e in enumerate(mapping.object_type)
    ]
    entries += [(f"skip.object_type[{i}]", path, None) for i, path in enumerate(skip.object_type)]
    for key, path, qconfig in entries:
        _check_qconfig(qconfig, f"{key}.qconfig")
        target = resolve_import(path, key)
        if target not in allowed:
            names = sorted(import_path(t) for t in allowed)
            why = (
                "X86InductorQuantizer fuses add into the conv before it, so there is no add to leave float"
                if path in ("operator.add", "torch.add")
                else "the quantizer has no type entry for it"
            )
            raise ConfigError(
                f"{key}='{path}' with engine=pt2e, backend={backend.engine}: {why}. Types it can configure: "
                f"{names or 'none (the XNNPACK quantizer takes no None type entries)'}; or use engine=fx."
            )
    for i, entry in enumerate(mapping.module_name_regex):
        _check_qconfig(entry.qconfig, f"qconfig_mapping.module_name_regex[{i}].qconfig")
    for i, entry in enumerate(mapping.module_name):
        _check_qconfig(entry.qconfig, f"qconfig_mapping.module_name[{i}].qconfig")
    for key, pattern in [
        *((f"qconfig_mapping.module_name_regex[{i}].regex", e.regex) for i, e in enumerate(mapping.module_name_regex)),
        *((f"skip.module_name_regex[{i}]", p) for i, p in enumerate(skip.module_name_regex)),
    ]:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"{key}='{pattern}' is not a valid regular expression: {error}.") from None
    has_float_names = (
        skip.module_name
        or skip.module_name_regex
        or any(e.qconfig is None for e in [*mapping.module_name, *mapping.module_name_regex])
    )
    if backend.engine == "qnnpack" and has_float_names:
        raise ConfigError(
            "a module-name skip with engine=pt2e, backend=qnnpack: torchao's XNNPACKQuantizer.set_module_name "
            "accepts no None config (it asserts), so it cannot leave a module float; use backend=x86 or engine=fx."
        )


def with_skip(mapping: QConfigMappingSpec, skip: SkipSpec) -> QConfigMappingSpec:
    """The prepare-time mapping with the skip-list's entries as null entries (pt2e skips at prepare time)."""
    return replace(
        mapping,
        object_type=[*mapping.object_type, *(ObjectTypeEntry(path, None) for path in skip.object_type)],
        module_name_regex=[
            *mapping.module_name_regex,
            *(ModuleNameRegexEntry(p, None) for p in skip.module_name_regex),
        ],
        module_name=[*mapping.module_name, *(ModuleNameEntry(name, None) for name in skip.module_name)],
    )


def build_quantizer(
    model: nn.Module, backend: BackendSpec, mapping: QConfigMappingSpec, engine: EngineSpec, bits: int | None = None
) -> Any:
    """The backend's Quantizer with the mapping's entries; regex entries expanded against module names."""
    _, _, x86 = torchao_module()
    names = [name for name, _ in model.named_modules() if name]

    def config(value: str | None) -> Any:
        if value is None:
            return None
        if backend.engine == "x86":
            return x86.get_default_x86_inductor_quantization_config(reduce_range=reduce_range(engine, bits))
        return _xnnpack().get_symmetric_quantization_config(is_per_channel=True)

    if backend.engine == "x86":
        quantizer = x86.X86InductorQuantizer()
        set_global, set_type, set_name = (
            quantizer.set_global,
            quantizer.set_module_type_qconfig,
            quantizer.set_module_name_qconfig,
        )
    else:
        quantizer = _xnnpack().XNNPACKQuantizer()
        set_global, set_type, set_name = quantizer.set_global, quantizer.set_module_type, quantizer.set_module_name
    if mapping.global_qconfig is not None:
        set_global(config(mapping.global_qconfig))
    for entry in mapping.object_type:
        set_type(resolve_import(entry.object_type, "object_type"), config(entry.qconfig))
    for entry in mapping.module_name_regex:  # re.match against every module name, as FX does
        for name in names:
            if re.match(entry.regex, name):
                set_name(name, config(entry.qconfig))
    for entry in mapping.module_name:
        set_name(entry.module_name, config(entry.qconfig))
    return quantizer
