"""The pt2e engine's deployable files: the q/dq program as a stripped `.pt2`, a static-batch AOTInductor
package, and beside either the registry of the custom ops it calls (pt2e_custom.py), which a fresh process
loads first. stages/export.py (through stages/reports/export.py) writes, reloads and checks them."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

import pipeline.engine.pt2e_custom as pt2e_custom
from pipeline.batch import ModelInputs
from pipeline.engine.pt2e import export_program
from pipeline.engine.pt2e_compiled import used_tensor_names


def save_program(program: GraphModule, example: ModelInputs, path: Any) -> None:
    """The q/dq program as a stripped `.pt2`: re-exported from the converted module (so only the weights it
    uses travel, not the float ones) with a dynamic batch, without its example inputs."""
    program = copy.deepcopy(program)
    used = used_tensor_names(program)
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
    batch with freezing gave wrong outputs on the digits net (issue 16), so the batch is static. A custom
    block runs as a call back into Python (its op's registry must be loaded first)."""
    import torch._inductor.config as inductor_config

    exported = torch.export.export(program, inputs.positional(program))
    with inductor_config.patch(freezing=True):
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path))


def custom_ops(program: GraphModule) -> list[str]:
    """The ptq_pipeline custom ops the program calls (one per custom block class), sorted."""
    return sorted({name for name, _ in pt2e_custom.ops_in(program)})


def save_custom_op_registry(program: GraphModule, path: Path) -> bool:
    """The registry of the program's custom ops at `path` (pt2e_custom.save_registry); False when it calls none."""
    return pt2e_custom.save_registry(program, path)
