"""Stage `lower`: the reference model lowered to the backend's quantized operators, by the same pass
convert_fx runs after its own reference conversion (so the result equals convert_fx's).

Config keys read: backend.engine, backend.backend_config, qconfig_mapping.name, skip.name.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline import metric_keys
from pipeline.batch import ModelInputs
from pipeline.engine import steps
from pipeline.schema import BackendSpec
from stages.types import Lowered, ReferenceModel, StageContext, write_json

log = logging.getLogger(__name__)

NAME = "lower"
CONSUMES = ("reference", "loaded")
USES: tuple[str, ...] = ()
PRODUCES = ("lowered",)
READS = ("backend",)
OPTIONAL = False


def lower(reference: ReferenceModel, backend: BackendSpec, example_inputs: ModelInputs) -> Lowered:
    model, counts = steps.lower(reference, backend, example_inputs)
    log.info(
        "lowered for backend=%s: %d quantized ops, %d float ops, %d quantize/dequantize",
        backend.engine,
        counts["quantized"],
        counts["float"],
        counts["quantize_dequantize"],
    )
    return Lowered(model=model, engine=backend.engine, node_counts=counts)


def compute(ctx: StageContext) -> dict[str, Any]:
    return {"lowered": lower(ctx.artifacts["reference"], ctx.spec.backend, ctx.artifacts["loaded"].data.example_inputs)}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """lowered_graph.py (the int8 model's FX code) and node_counts.json."""
    out = ctx.out_dir
    lowered: Lowered = produced["lowered"]
    (out / "lowered_graph.py").write_text(lowered.model.code)
    write_json(out / "node_counts.json", lowered.node_counts)
    return {metric_keys.node_count(kind): float(count) for kind, count in lowered.node_counts.items()}
