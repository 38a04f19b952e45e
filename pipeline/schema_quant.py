"""The config groups of how a model is quantized: engine (the flow), backend, qconfig_mapping (with its
entry types), skip and custom_config, and the closed sets of engine and backend names. Part of the
schema: pipeline/schema.py re-exports every name here, so `schema.SkipSpec` etc. keep working; one
dataclass per group, as there. Imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

ENGINES: tuple[str, ...] = ("fbgemm", "x86", "qnnpack", "onednn")
BACKEND_CONFIGS: tuple[str, ...] = ("native", "fbgemm", "x86", "qnnpack", "onednn")
FLOWS: tuple[str, ...] = ("fx", "pt2e")  # engine.name: torch.ao's FX flow, torchao's PT2E flow


@dataclass
class EngineSpec:
    """Which quantization flow runs the stages: FX graph mode (torch.ao) or PT2E (torch.export + torchao)."""

    name: str = "fx"  # fx | pt2e
    # pt2e, backend=x86: activations on 7 bits (true) or 8 (false); null: recovery.activation_bits (auto: 8 with
    # VNNI, 7 without, as for FX).
    reduce_range: bool | None = None
    # pt2e: a compiled form (torch.compile of the q/dq program, an AOTInductor package) whose outputs reach
    # less than this SQNR against the q/dq program is refused (compiled artifacts were seen to be wrong).
    min_compiled_sqnr_db: float = 35.0


@dataclass
class BackendSpec:
    engine: str = MISSING  # torch.backends.quantized.engine: fbgemm, x86, qnnpack, onednn
    backend_config: str = MISSING  # get_<name>_backend_config: native, fbgemm, x86, qnnpack, onednn
    default_qconfig: str = "backend_default"  # named qconfig the mapping's "default" resolves to


@dataclass
class ObjectTypeEntry:
    object_type: str = MISSING  # import path: torch.nn.Conv2d, torch.nn.functional.linear, operator.add
    qconfig: str | None = None


@dataclass
class ModuleNameRegexEntry:
    regex: str = MISSING
    qconfig: str | None = None


@dataclass
class ModuleNameEntry:
    module_name: str = MISSING
    qconfig: str | None = None


@dataclass
class ModuleNameObjectTypeOrderEntry:
    module_name: str = MISSING  # the parent module ("" for the top level)
    object_type: str = MISSING  # import path of the op called inside it
    index: int = MISSING  # which call of that op, counting from 0
    qconfig: str | None = None


@dataclass
class QConfigMappingSpec:
    """A QConfigMapping in YAML. Values are names from the qconfig library or null (= stay float)."""

    name: str = MISSING
    # backend_default: start from torch's get_default_qconfig_mapping(engine) (which also pins fixed-qparams
    # ops such as sigmoid); empty: start from an empty mapping.
    base: str = "backend_default"
    global_qconfig: str | None = "default"
    object_type: list[ObjectTypeEntry] = field(default_factory=list)
    module_name_regex: list[ModuleNameRegexEntry] = field(default_factory=list)
    module_name: list[ModuleNameEntry] = field(default_factory=list)
    module_name_object_type_order: list[ModuleNameObjectTypeOrderEntry] = field(default_factory=list)
    # true: convs / linears whose output feeds only ReLU6 / hardtanh observe the clipped range (found by
    # tracing the model at prepare time; each gets a module_name entry, explicit module_name entries win).
    clamp_bounded_activations: bool = False


@dataclass
class SkipSpec:
    """What stays float: entries set to None in the convert-time mapping only."""

    name: str = MISSING
    object_type: list[str] = field(default_factory=list)
    module_name_regex: list[str] = field(default_factory=list)
    module_name: list[str] = field(default_factory=list)
    module_name_object_type_order: list[ModuleNameObjectTypeOrderEntry] = field(default_factory=list)
    strict: bool = False  # an entry that matches nothing is an error instead of a warning


@dataclass
class CustomConfigSpec:
    """PrepareCustomConfig / ConvertCustomConfig as the dicts their from_dict methods take."""

    name: str = "none"
    prepare: dict[str, Any] = field(default_factory=dict)
    convert: dict[str, Any] = field(default_factory=dict)
    # Folders put at the front of sys.path before the class paths are imported (relative to where you run),
    # like model.python_path (which is searched too): your Observed/Quantized classes in your own file.
    python_path: list[str] = field(default_factory=list)
