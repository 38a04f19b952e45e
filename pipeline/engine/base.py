"""The surface a quantization engine offers the stages, as a Protocol, and the engine-neutral values it
returns. The FX engine (engine/fx.py) implements it; a second engine (torchao's pt2e) implements the
same methods, and the stages do not change.

Configs come in as the schema's specs (BackendSpec, QConfigMappingSpec, SkipSpec, CustomConfigSpec):
each engine builds its own torch objects from them. What only one engine needs between two steps
(FX: the per-node qconfigs and scopes lowering reads) travels as `ReferenceConversion.engine_state`,
which only the engine that made it reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from pipeline.batch import ModelInputs
from pipeline.schema import BackendSpec, CustomConfigSpec, QConfigMappingSpec, RecoverySpec, SkipSpec

if TYPE_CHECKING:
    from pipeline.engine.introspect import EntryMatch, NodeInfo
    from pipeline.engine.numerics import LayerDiagnostics, LayerSensitivity, LoggedOutput


@dataclass
class ReferenceConversion:
    """A reference (quantize-dequantize) model and what the same engine's `lower` needs with it."""

    model: nn.Module
    engine_state: object  # opaque: created and read only by the engine that converted
    left_float: list[str] = field(default_factory=list)  # nodes the skip-list returned to float
    # Each mapping entry naming a qconfig (a readable description) and the nodes it gives that qconfig;
    # steps.lower reports an entry none of whose nodes got quantized (the backend ignored its dtype).
    mapping_entry_nodes: list[tuple[str, list[str]]] = field(default_factory=list)


@dataclass
class UntraceableModule:
    """The module whose forward the engine could not capture while preparing."""

    name: str  # qualified name in the model ("" = the top-level model's own forward)
    cls: type
    error: BaseException


class MissingObserverSource(ValueError):
    """A saved observer state cannot fill every observer of a prepared model: pt2e's calibration without the
    skip-list never observed exactly the tensors some observer of the skip-list's model observes. `lines`
    names each such observer; the caller calibrates that model itself."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


class Engine(Protocol):
    """One post-training quantization flow: prepare, calibrate-state save/load, reference convert,
    lower, count, per-layer numerics, and the introspection the inspect stage and skip warnings use."""

    name: str

    def check(
        self, backend: BackendSpec, mapping: QConfigMappingSpec, skip: SkipSpec, custom: CustomConfigSpec
    ) -> None:
        """Resolve every name and import path of the configs now (raises ConfigError), before any work."""
        ...

    def prepare(
        self,
        model: nn.Module,
        example_inputs: ModelInputs,
        backend: BackendSpec,
        mapping: QConfigMappingSpec,
        custom: CustomConfigSpec,
        recovery_spec: RecoverySpec | None = None,
    ) -> nn.Module:
        """An observed copy of `model`, not yet calibrated (the float model stays untouched). With a
        recovery spec, its activation bit width; later reference converts of the model follow it."""
        ...

    def smooth_quant(
        self, model: nn.Module, batches: list[Any], alpha: float, custom: CustomConfigSpec
    ) -> tuple[nn.Module, dict[str, float]]:
        """A function-preserving SmoothQuant-ed copy of the float model (or the model itself when nothing
        applies), and the largest scale per producer module."""
        ...

    def correct_bias(
        self, conversion: ReferenceConversion, prepared: nn.Module, batches: list[Any], samples: int, method: str
    ) -> dict[str, float]:
        """Fold each quantized layer's output-mean error on calibration data into its bias, in the reference
        model (in place, before lowering), the way `method` (recovery.bias_correction_method) says; returns the
        mean absolute shift per layer."""
        ...

    def untraceable_module(self, error: BaseException) -> UntraceableModule | None:
        """For an error `prepare` raised: the module that could not be captured, or None."""
        ...

    def check_custom_modules(
        self, prepared: nn.Module, example_inputs: ModelInputs, custom: CustomConfigSpec, engine: str
    ) -> None:
        """The custom-module contract on a freshly prepared model (a dry run on the example inputs, on a
        copy): a ConfigError naming the class and the rule it breaks, before calibration."""
        ...

    def clamp_bounded_activations(
        self, prepared: nn.Module, model: nn.Module, backend: BackendSpec, custom: CustomConfigSpec
    ) -> dict[str, tuple[float, float]]:
        """Make outputs that feed only ReLU6 / hardtanh observe the clipped range; returns what changed."""
        ...

    def observer_state(self, prepared: nn.Module) -> dict[str, torch.Tensor]:
        """The calibration result alone (observer buffers, with the state_dict's version metadata)."""
        ...

    def load_observer_state(self, prepared: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load `observer_state`'s output into a freshly prepared model. FX: the keys must match exactly.
        pt2e: every observer is filled by the tensors it observes and `state` may hold more (the model
        calibrated without the skip-list); MissingObserverSource when one has no source."""
        ...

    def missing_observer_sources(self, prepared: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
        """One line per observer of `prepared` that `load_observer_state` could not fill from `state`."""
        ...

    def convert_reference(
        self,
        prepared: nn.Module,
        backend: BackendSpec,
        mapping: QConfigMappingSpec,
        skip: SkipSpec,
        custom: CustomConfigSpec,
    ) -> ReferenceConversion:
        """The reference model of a copy of `prepared`, with the skip-list's entries left float."""
        ...

    def lower(self, reference: nn.Module, engine_state: object, engine: str) -> nn.Module:
        """The reference model lowered to `engine`'s int8 kernels (on a copy)."""
        ...

    def count_nodes(self, model: nn.Module, example_inputs: ModelInputs, engine: str) -> dict[str, int]:
        """Compute nodes by what they produce: {'quantized': n, 'float': n, 'quantize_dequantize': n}."""
        ...

    def node_kinds(self, model: nn.Module, example_inputs: ModelInputs, engine: str) -> dict[str, str]:
        """Each compute node of a lowered model by name: 'quantized', 'float' or 'quantize_dequantize'."""
        ...

    def numerics_blocker(self, custom: CustomConfigSpec) -> str | None:
        """Why per-layer numerics (module_numerics) cannot run for this engine and custom config, or None
        (FX: always None, custom modules included; pt2e: None, its per-node figures are cumulative only)."""
        ...

    def module_numerics(
        self,
        prepared: nn.Module,
        lowered: nn.Module,
        inputs: ModelInputs | Iterable[ModelInputs],
        engine: str,
        reference: nn.Module | None = None,
        bounds: dict[str, tuple[float, float]] | None = None,
    ) -> tuple[list[LayerDiagnostics], list[LoggedOutput]]:
        """Per quantized module (worst own SQNR first): own, cumulative, weight and kernel SQNR (the int8
        kernel against `reference`'s same-named module on the same input), compared after the clip for the
        modules in `bounds`; and every compared module's cumulative SQNR in execution order. Works on models
        with custom or non-traceable modules (same-named modules, by forward hooks). An engine that can only
        compare whole programs (pt2e: torchao's numeric debugger, per node, against the calibrated prepared
        model) gives cumulative figures alone and marks its layers `cumulative_only`. `inputs`: one batch, or
        batches (iterated once) whose signal and noise powers are summed: the figures of the batches joined."""
        ...

    def layer_sensitivity(
        self,
        prepared: nn.Module,
        lowered: nn.Module,
        inputs: ModelInputs | Iterable[ModelInputs],
        engine: str,
        bounds: dict[str, tuple[float, float]] | None = None,
    ) -> list[LayerSensitivity]:
        """Each quantized layer's own output SQNR on float inputs, worst first (pt2e: ConfigError, it has no
        own SQNR)."""
        ...

    def bounded_producers(self, model: nn.Module, custom: CustomConfigSpec) -> dict[str, tuple[float, float]]:
        """Conv/linear modules of the float model whose output goes only into ReLU6/hardtanh, with the clip."""
        ...

    def float_outputs(self, model: nn.Module, names: list[str], inputs: ModelInputs, engine: str) -> dict[str, bool]:
        """For each named module the lowered model calls: True when its output is float (it stayed float)."""
        ...

    def observed_output_ranges(self, prepared: nn.Module, names: list[str]) -> dict[str, tuple[float, float]]:
        """The calibrated [min, max] of each named module's output observer."""
        ...

    def unmatched_skip_entries(self, prepared: nn.Module, skip: SkipSpec, prefix: str = "skip") -> list[str]:
        """One line per skip entry that matches nothing in the prepared model, with the closest names."""
        ...

    def model_nodes(self, prepared: nn.Module) -> list[NodeInfo]:
        """Every op node of a prepared model, in graph order."""
        ...

    def entry_matches(
        self, prepared: nn.Module, mapping: QConfigMappingSpec, skip: SkipSpec, backend: BackendSpec
    ) -> list[EntryMatch]:
        """For each skip and mapping entry: the nodes it configures, or why it matches nothing."""
        ...
