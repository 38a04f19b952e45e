"""The pt2e engine's "lowered" model: torch.compile (inductor, freezing) of the converted q/dq program,
checked against that program on the first call at every input shape (a compiled artifact was seen to give
wrong outputs: issue 16, AOTInductor with freezing and a dynamic batch on the digits net). Plain torch:
no torchao here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from pipeline.batch import ModelInputs

log = logging.getLogger(__name__)


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

    def deployed_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors the q/dq program reads (what its .pt2 file carries): pipeline.measure.serialized_bytes
        sizes this, not state_dict(), which also holds the float weights convert_pt2e leaves on the module
        (the ResNet-18 shape measured 1.25x its float size that way, against 0.25x deployed)."""
        used = used_tensor_names(self.program)
        return {name: value for name, value in self.program.state_dict().items() if name in used}

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


def used_tensor_names(program: GraphModule) -> set[str]:
    """The attributes the program's graph reads (get_attr targets): its int8 weights, scales, zero points and
    biases; convert_pt2e leaves the float weights on the module too, unread."""
    return {str(node.target) for node in program.graph.nodes if node.op == "get_attr"}
