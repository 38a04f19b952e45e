"""The PT2E engine: torch.export, torchao's prepare_pt2e / convert_pt2e with a Quantizer, and torch.compile
(inductor, freezing) of the quantize-dequantize program as the lowered form. The only module of the project
that imports torchao; `Pt2eEngine` is its `Engine` (engine/base.py).

What differs from FX, and why (measured with torch 2.13.0 and torchao 0.18.0, see issue 16):
- torch.export captures the model with a batch of at least 2 and a dynamic batch `Dim`: the project's
  batch-1 example specializes the batch (calibration at 32 then fails `x.size()[0] == 1`), and a dynamic Dim
  with a batch-1 example fails too. The example is repeated to 2 samples.
- A Quantizer has no convert-time mapping: skip-lists apply at prepare time (`set_module_name_qconfig(name,
  None)`, `set_module_type_qconfig(type, None)`), so pipeline/engine/steps.prepare folds the skip-list into the
  prepare-time mapping for this engine, and the calibration cache key holds the skip-list.
- What a Quantizer cannot express is refused at start-up with the reason (`check`): call-order entries,
  qconfig names of the FX library, op types the quantizer has no entry for (x86 fuses `add` into the conv
  before it, so there is no add to leave float), custom modules.
- The compiled model (torch.compile of the q/dq program) is checked against the q/dq program on the first
  call at every input shape: a compiled artifact was seen to give wrong outputs (issue 16, AOTInductor with
  freezing and a dynamic batch on the digits net).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from pipeline.batch import ModelInputs
from pipeline.engine.base import ReferenceConversion, UntraceableModule
from pipeline.engine.qconfigs import import_path, resolve_import
from pipeline.errors import ConfigError, closest
from pipeline.schema import (
    BackendSpec,
    CustomConfigSpec,
    EngineSpec,
    ModuleNameEntry,
    ModuleNameRegexEntry,
    ObjectTypeEntry,
    QConfigMappingSpec,
    RecoverySpec,
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
def _quiet_import() -> Iterator[None]:
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


def _torchao() -> Any:
    """The torchao pt2e modules, imported once, quietly; ConfigError when torchao is not installed."""
    try:
        with _quiet_import():
            import torchao.quantization.pt2e as pt2e
            import torchao.quantization.pt2e.quantize_pt2e as quantize_pt2e
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    except ImportError as error:
        raise ConfigError(f"engine=pt2e needs torchao, which does not import here ({error}); {INSTALL_HINT}.") from None
    return pt2e, quantize_pt2e, x86


def _xnnpack() -> Any:
    with _quiet_import():
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
        _, _, x86 = _torchao()
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
    _torchao()
    if backend.engine in REFUSED_BACKENDS:
        raise ConfigError(f"backend={backend.engine} with engine=pt2e: {REFUSED_BACKENDS[backend.engine]}.")
    if backend.engine == "qnnpack":
        _xnnpack()
    if custom.prepare or custom.convert:
        raise ConfigError(
            f"custom_config={custom.name} with engine=pt2e: custom modules (observed / quantized classes) are an "
            f"FX prepare/convert feature; under torch.export a block stays float only as a torch.library.custom_op, "
            f"which this pipeline does not build. Use engine=fx, or custom_config=none."
        )
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
    _, _, x86 = _torchao()
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


# --------------------------------------------------------------------------------------------------
# prepare / observers / convert


@dataclass
class Pt2eOrigin:
    """What a prepared pt2e model keeps of the float model: names for skip checks, the export example."""

    module_names: list[str]
    module_types: set[Any]
    example: ModelInputs
    mapping: QConfigMappingSpec
    engine: EngineSpec = field(default_factory=EngineSpec)


def export_example(example_inputs: ModelInputs) -> ModelInputs:
    """The example torch.export captures with: at least 2 samples (batch 1 specializes the batch dim)."""
    return example_inputs.repeat_to(max(2, example_inputs.batch_size))


def export_program(model: nn.Module, example: ModelInputs) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension shared by every input."""
    batch = torch.export.Dim("batch")
    positional = example.positional(model)
    dynamic = tuple({0: batch} if isinstance(value, torch.Tensor) else None for value in positional)
    return torch.export.export(model, positional, dynamic_shapes=dynamic)


def prepare(
    model: nn.Module,
    example_inputs: ModelInputs,
    backend: BackendSpec,
    mapping: QConfigMappingSpec,
    engine: EngineSpec,
    bits: int | None = None,
) -> GraphModule:
    _, quantize_pt2e, _ = _torchao()
    example = export_example(example_inputs)
    float_model = copy.deepcopy(model).eval()
    exported = export_program(float_model, example).module()
    quantizer = build_quantizer(float_model, backend, mapping, engine, bits)
    with _quiet_import():
        prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
    prepared.meta["pt2e_origin"] = Pt2eOrigin(
        [name for name, _ in model.named_modules() if name],
        {type(module) for module in model.modules()},
        example,
        mapping,
        engine,
    )
    return prepared


def _observers(prepared: nn.Module) -> dict[str, nn.Module]:
    pt2e, _, _ = _torchao()
    kinds = (pt2e.ObserverBase, pt2e.FakeQuantizeBase)
    return {name: module for name, module in prepared.named_modules() if isinstance(module, kinds)}


def observer_state(prepared: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Every observer's buffers, with the state_dict's `_metadata` (module versions): without it torchao's
    observers take the state for an old checkpoint and reset eps (2**-12 -> 1.19e-7), and loaded outputs differ."""
    prefixes = tuple(f"{name}." for name in _observers(prepared))
    full = prepared.state_dict()
    state: OrderedDict[str, torch.Tensor] = OrderedDict((k, v) for k, v in full.items() if k.startswith(prefixes))
    state._metadata = copy.copy(getattr(full, "_metadata", OrderedDict()))  # type: ignore[attr-defined]
    return state


def load_observer_state(prepared: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = observer_state(prepared).keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"observer keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    prepared.load_state_dict(state, strict=False)


def _is_glue(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and "quantize" in str(node.target)


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


_WEIGHTED = ("aten.conv", "aten.linear", "aten.matmul", "aten.addmm")


def float_weighted_ops(program: GraphModule) -> list[str]:
    """conv / linear nodes of a converted program whose weight no dequantize feeds: they run in float (their
    input may still pass a quantize/dequantize pair: the quantizer shares the observer of the op before)."""
    found = []
    for node in program.graph.nodes:
        weighted = node.op == "call_function" and str(node.target).startswith(_WEIGHTED)
        weight = node.args[1] if weighted and len(node.args) > 1 else None
        if weighted and not (isinstance(weight, torch.fx.Node) and _is_glue(weight)):
            found.append(f"{_module_path(node) or node.name} ({node.name})")
    return found


def convert(prepared: GraphModule) -> GraphModule:
    """convert_pt2e on a copy, in eval mode (`.eval()` raises on exported models)."""
    pt2e, quantize_pt2e, _ = _torchao()
    with _quiet_import():
        converted = quantize_pt2e.convert_pt2e(copy.deepcopy(prepared))
    pt2e.move_exported_model_to_eval(converted)
    return converted


@dataclass
class Pt2eConvertState:
    """ReferenceConversion.engine_state of the pt2e engine: what the compiled form is checked with."""

    example: ModelInputs
    min_sqnr_db: float
    # Inductor turns x86 q/dq patterns into oneDNN int8 kernels, which need uint8 activations: the XNNPACK
    # quantizer's signed int8 activations fail there with or without freezing (quantized::packed_weights_conv2drelu,
    # aten::quantized_max_pool2d), and XNNPACK's own kernels run in ExecuTorch, not here. qnnpack: no compile.
    compile: bool = True


class CompiledMismatchError(RuntimeError):
    """A compiled form's outputs disagree with the q/dq program it was compiled from."""


class CompiledProgram(nn.Module):
    """torch.compile (inductor, freezing, static shapes) of a q/dq program: the pt2e "lowered" model. The
    first call at each input shape also runs the q/dq program and refuses (CompiledMismatchError) outputs
    below `min_sqnr_db` against it. Freezing is an inductor setting read while compiling, so every call
    runs under it."""

    def __init__(self, program: GraphModule, min_sqnr_db: float, compile: bool = True) -> None:
        super().__init__()
        self.program = program
        self.compile = compile
        self.min_sqnr_db = min_sqnr_db
        self.checked: dict[tuple, float] = {}
        # Not a submodule: the compiled wrapper shares the program's weights.
        self.__dict__["compiled"] = torch.compile(program, dynamic=False)

    @property
    def compiled_form(self) -> str:
        """The form's name in latency metrics; pipeline.measure times it as it is (no TorchScript forms)."""
        return "compiled" if self.compile else "qdq_eager"

    @property
    def code(self) -> str:
        return self.program.code

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            out = self.__dict__["compiled"](*args, **kwargs) if self.compile else self.program(*args, **kwargs)
        key = tuple(tuple(value.shape) for value in [*args, *kwargs.values()] if isinstance(value, torch.Tensor))
        if key not in self.checked:
            from pipeline.measure import sqnr_db

            with torch.no_grad():
                expected = self.program(*args, **kwargs)
            sqnr = sqnr_db(expected, out)
            if sqnr < self.min_sqnr_db:
                raise CompiledMismatchError(
                    f"torch.compile (inductor, freezing) of the pt2e q/dq program gives outputs {sqnr:.1f} dB from the "
                    f"q/dq program at input shapes {key} (engine.min_compiled_sqnr_db={self.min_sqnr_db:g}); the "
                    f"compiled form is refused. evaluate.models=[float,reference] evaluates the q/dq program alone."
                )
            self.checked[key] = sqnr
        return out


def lower(reference: GraphModule, state: Pt2eConvertState) -> CompiledProgram:
    if not state.compile:
        log.warning(
            "engine=pt2e, backend=qnnpack: inductor cannot compile the XNNPACK quantizer's signed int8 q/dq program "
            "(its kernels need uint8 activations) and XNNPACK's kernels run in ExecuTorch, so 'lowered' is the q/dq "
            "program run eagerly: its accuracy is what the XNNPACK kernels compute, its speed is not theirs."
        )
    compiled = CompiledProgram(reference, state.min_sqnr_db, state.compile)
    compiled(*state.example.positional(reference))  # compile now, at the example's shape, and check it
    return compiled


def program_of(model: nn.Module) -> GraphModule:
    """The q/dq program behind a pt2e model (the compiled wrapper's, or the model itself)."""
    return model.program if isinstance(model, CompiledProgram) else model  # type: ignore[return-value]


def node_kinds(model: nn.Module) -> dict[str, str]:
    """Each compute node of the q/dq program: quantized (an op a dequantize feeds), float, or
    quantize_dequantize glue."""
    kinds: dict[str, str] = {}
    for node in program_of(model).graph.nodes:
        if node.op != "call_function" or "getitem" in str(node.target):
            continue
        if _is_glue(node):
            kinds[node.name] = "quantize_dequantize"
        elif any(_is_glue(arg) for arg in node.all_input_nodes):
            kinds[node.name] = "quantized"
        else:
            kinds[node.name] = "float"
    return kinds


def count_nodes(model: nn.Module) -> dict[str, int]:
    """node_kinds counted: {'quantized': n, 'float': n, 'quantize_dequantize': n}."""
    counts = {"quantized": 0, "float": 0, "quantize_dequantize": 0}
    for kind in node_kinds(model).values():
        counts[kind] += 1
    return counts


def unmatched_skip_entries(prepared: GraphModule, skip: SkipSpec, prefix: str = "skip") -> list[str]:
    """Same lines as the FX engine's, against the float model's module names and types."""
    origin: Pt2eOrigin = prepared.meta["pt2e_origin"]
    names = origin.module_names
    type_paths = sorted(import_path(t) for t in origin.module_types)
    problems = []
    for i, path in enumerate(skip.object_type):
        if resolve_import(path, f"{prefix}.object_type[{i}]") not in origin.module_types:
            problems.append(
                f"{prefix}.object_type[{i}]='{path}' matches no op in the model.{closest(path, type_paths)}"
            )
    for i, name in enumerate(skip.module_name):
        if name not in names:
            problems.append(f"{prefix}.module_name[{i}]='{name}' is not a module of the model.{closest(name, names)}")
    for i, pattern in enumerate(skip.module_name_regex):
        if not any(re.match(pattern, name) for name in names):
            problems.append(
                f"{prefix}.module_name_regex[{i}]='{pattern}' matches no module name.{closest(pattern, names)}"
            )
    return problems


# --------------------------------------------------------------------------------------------------
# Deployable files


def save_program(program: GraphModule, example: ModelInputs, path: Any) -> None:
    """The q/dq program as a stripped `.pt2`: re-exported from the converted module (so only the weights it
    uses travel, not the float ones) with a dynamic batch, without its example inputs."""
    program = copy.deepcopy(program)
    used = {str(node.target) for node in program.graph.nodes if node.op == "get_attr"}
    # convert_pt2e leaves the float weights on the module; torch.export would lift every one of them.
    for name in [n for n, _ in [*program.named_parameters(), *program.named_buffers()] if n not in used]:
        owner, _, attribute = name.rpartition(".")
        delattr(program.get_submodule(owner), attribute)
    exported = export_program(program, example)
    with contextlib.suppress(AttributeError):
        exported._example_inputs = None  # type: ignore[attr-defined]
    torch.export.save(exported, str(path))


def save_aot_inductor(program: GraphModule, inputs: ModelInputs, path: Any) -> None:
    """An AOTInductor package of the q/dq program with a static batch (inputs' batch size) and freezing: it
    loads with plain torch (torch._inductor.aoti_load_package) and runs at that batch size only. A dynamic
    batch with freezing gave wrong outputs on the digits net (issue 16), so the batch is static."""
    import torch._inductor.config as inductor_config

    exported = torch.export.export(program, inputs.positional(program))
    with inductor_config.patch(freezing=True):
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path))


# --------------------------------------------------------------------------------------------------
# The Engine surface


class Pt2eEngine:
    """torch.export + torchao's PT2E quantization as an `Engine`."""

    name = "pt2e"
    skips_at_prepare = True  # steps.prepare folds the skip-list into the prepare-time mapping

    def __init__(self, spec: EngineSpec | None = None) -> None:
        self.spec = spec or EngineSpec(name="pt2e")

    def check(
        self, backend: BackendSpec, mapping: QConfigMappingSpec, skip: SkipSpec, custom: CustomConfigSpec
    ) -> None:
        check_specs(backend, mapping, skip, custom)

    def prepare(
        self,
        model: nn.Module,
        example_inputs: ModelInputs,
        backend: BackendSpec,
        mapping: QConfigMappingSpec,
        custom: CustomConfigSpec,
        recovery_spec: RecoverySpec | None = None,
    ) -> GraphModule:
        from pipeline.engine import recovery

        bits = recovery.activation_bits(recovery_spec, backend.engine) if recovery_spec is not None else None
        return prepare(model, example_inputs, backend, mapping, self.spec, bits)

    def smooth_quant(
        self, model: nn.Module, batches: list[Any], alpha: float, custom: CustomConfigSpec
    ) -> tuple[nn.Module, dict[str, float]]:
        # SmoothQuant rescales the float model's weights before capture: the same transform as for FX.
        from pipeline.engine.fx import FxEngine

        return FxEngine().smooth_quant(model, batches, alpha, custom)

    def correct_bias(
        self, conversion: ReferenceConversion, prepared: nn.Module, batches: list[Any], samples: int
    ) -> dict[str, float]:
        log.info(
            "recovery.bias_correction: not applied on engine=pt2e (it edits the biases of FX's reference modules; "
            "a q/dq program's conv bias is a graph constant)"
        )
        return {}

    def untraceable_module(self, error: BaseException) -> UntraceableModule | None:
        return None  # torch.export's own error names the line it could not capture

    def check_custom_modules(
        self, prepared: nn.Module, example_inputs: ModelInputs, custom: CustomConfigSpec, engine: str
    ) -> None:
        return None  # custom modules are refused by check()

    def clamp_bounded_activations(
        self, prepared: nn.Module, model: nn.Module, backend: BackendSpec, custom: CustomConfigSpec
    ) -> dict[str, tuple[float, float]]:
        return {}  # refused by check()

    def observer_state(self, prepared: nn.Module) -> dict[str, torch.Tensor]:
        return observer_state(prepared)

    def load_observer_state(self, prepared: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_observer_state(prepared, state)

    def convert_reference(
        self,
        prepared: nn.Module,
        backend: BackendSpec,
        mapping: QConfigMappingSpec,
        skip: SkipSpec,
        custom: CustomConfigSpec,
    ) -> ReferenceConversion:
        assert isinstance(prepared, GraphModule)
        origin: Pt2eOrigin = prepared.meta["pt2e_origin"]
        converted = convert(prepared)
        state = Pt2eConvertState(origin.example, self.spec.min_compiled_sqnr_db, compile=backend.engine == "x86")
        return ReferenceConversion(converted, state, float_weighted_ops(converted))

    def lower(self, reference: nn.Module, engine_state: object, engine: str) -> nn.Module:
        if not isinstance(reference, GraphModule) or not isinstance(engine_state, Pt2eConvertState):
            raise TypeError(f"the pt2e engine lowers its own conversions, not {type(engine_state).__name__}")
        return lower(reference, engine_state)

    def count_nodes(self, model: nn.Module, example_inputs: ModelInputs, engine: str) -> dict[str, int]:
        return count_nodes(model)

    def node_kinds(self, model: nn.Module, example_inputs: ModelInputs, engine: str) -> dict[str, str]:
        return node_kinds(model)

    def numerics_blocker(self, custom: CustomConfigSpec) -> str | None:
        return (
            "engine=pt2e: the per-layer report is built on FX's numeric suite (own and weight SQNR per layer); "
            "torchao's numeric debugger gives cumulative per-node SQNR only and is not wired in yet"
        )

    def layer_sensitivity(self, prepared: nn.Module, lowered: nn.Module, inputs: ModelInputs, engine: str) -> list:
        raise ConfigError(
            "per-layer sensitivity (search) needs engine=fx; " + (self.numerics_blocker(CustomConfigSpec()) or "")
        )

    def layer_diagnostics(self, prepared: nn.Module, lowered: nn.Module, inputs: ModelInputs, engine: str) -> tuple:
        raise ConfigError(self.numerics_blocker(CustomConfigSpec()) or "")

    def unmatched_skip_entries(self, prepared: nn.Module, skip: SkipSpec, prefix: str = "skip") -> list[str]:
        assert isinstance(prepared, GraphModule)
        return unmatched_skip_entries(prepared, skip, prefix)

    def model_nodes(self, prepared: nn.Module) -> list:
        raise ConfigError("inspect lists FX node names; run it with engine=fx (checks refuse it for pt2e)")

    def entry_matches(
        self, prepared: nn.Module, mapping: QConfigMappingSpec, skip: SkipSpec, backend: BackendSpec
    ) -> list:
        raise ConfigError("inspect lists FX node names; run it with engine=fx (checks refuse it for pt2e)")
