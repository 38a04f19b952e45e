"""Stage `inspect` (optional: `stages=[load,inspect]` or `inspect.enabled=true`): the names a skip-list
or mapping can use, so nobody has to guess them. It runs prepare_fx (no calibration) and lists every
module (name, type as an import path), every FX op node (op, target, the module it runs in, whether the
mapping quantizes it), and for each entry of the configured skip-list and qconfig_mapping the nodes it matches, or
"matches nothing" with the closest names.

Config keys read: backend.*, qconfig_mapping.*, skip.*, custom_config.prepare.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.engine import get_engine, steps
from pipeline.engine.qconfigs import import_path
from pipeline.schema import BackendSpec, CustomConfigSpec, EngineSpec, QConfigMappingSpec, SkipSpec
from stages.types import Loaded, StageContext

log = logging.getLogger(__name__)
# inspect lists FX node names: FX only (pipeline.checks refuses it on pt2e).
FLOW = EngineSpec(name="fx")

NAME = "inspect"
CONSUMES = ("loaded",)
USES: tuple[str, ...] = ()
PRODUCES = ("inspect_report",)
READS = ("backend", "qconfig_mapping", "skip", "custom_config")
OPTIONAL = True
FAILURE_IS_FATAL = False  # an analysis: nothing later needs its listing; a failure is recorded and the run goes on


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, ["-" * width for width in widths], *rows]
    ]


def inspect(
    loaded: Loaded, backend: BackendSpec, mapping: QConfigMappingSpec, skip: SkipSpec, custom: CustomConfigSpec
) -> str:
    """The report as terminal-readable text."""
    prepared = steps.prepare(
        loaded.model, loaded.data.example_inputs, loaded.model_name, backend, mapping, custom, flow=FLOW
    )
    modules = [
        [name, import_path(type(module))]
        for name, module in prepared.named_modules()
        if name and "activation_post_process" not in name
    ]
    nodes = [
        [node.name, node.op, node.target, node.scope or "(top level)", "int8" if node.quantized else "float"]
        for node in get_engine(FLOW).model_nodes(prepared)
    ]
    lines = [
        f"Model {loaded.model_name}, prepared for backend={backend.engine} with qconfig_mapping={mapping.name}.",
        "",
        "Modules (after fusion; module_name and module_name_regex entries match these names):",
        *_table(["module_name", "type"], modules),
        "",
        "FX op nodes in graph order (object_type matches the target's type; module_name_object_type_order counts",
        "calls of one object_type inside one scope):",
        *_table(["node", "op", "target", "scope", "mapping"], nodes),
        "",
    ]
    matches = get_engine(FLOW).entry_matches(prepared, mapping, skip, backend)
    lines.append(f"What each entry of skip={skip.name} and qconfig_mapping={mapping.name} matches:")
    if not matches:
        lines.append("  (no entries)")
    for match in matches:
        if match.nodes:
            lines.append(f"  {match.key}='{match.value}' -> {', '.join(match.nodes)}")
        else:
            lines.append(f"  {match.key}='{match.value}' -> matches nothing: {match.note}")
    return "\n".join(lines) + "\n"


def compute(ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec
    report = inspect(ctx.artifacts["loaded"], spec.backend, spec.qconfig_mapping, spec.skip, spec.custom_config)
    return {"inspect_report": report}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """model.txt, also printed: the point of the stage is to be read in the terminal, not only in the log."""
    out = ctx.out_dir
    (out / "model.txt").write_text(produced["inspect_report"])
    print(produced["inspect_report"], flush=True)
    return {}
