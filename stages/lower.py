"""Stage `lower`: the reference model lowered to the backend's quantized operators, by the same pass
convert_fx runs after its own reference conversion (so the result equals convert_fx's).

A mapping entry whose nodes the BackendConfig left float (it silently drops qconfigs with dtypes it has
no config for, e.g. dynamic int8 on Conv2d or float16 on onednn) is a warning naming the entry, a metric
and ignored_mapping_entries.json.

Config keys read: backend.engine, backend.backend_config, qconfig_mapping.name, skip.name.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pipeline import metric_keys
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


def lower(reference: ReferenceModel, backend: BackendSpec, example_inputs: tuple[torch.Tensor, ...]) -> Lowered:
    model, counts, ignored = steps.lower_with_report(reference, backend, example_inputs)
    log.info(
        "lowered for backend=%s: %d quantized ops, %d float ops, %d quantize/dequantize",
        backend.engine,
        counts["quantized"],
        counts["float"],
        counts["quantize_dequantize"],
    )
    for line in ignored:
        log.warning("lower: %s", line)
    return Lowered(model=model, engine=backend.engine, node_counts=counts, ignored_entries=ignored)


def compute(ctx: StageContext) -> dict[str, Any]:
    return {"lowered": lower(ctx.artifacts["reference"], ctx.spec.backend, ctx.artifacts["loaded"].data.example_inputs)}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """lowered_graph.py (the int8 model's FX code), node_counts.json and, when there are any,
    ignored_mapping_entries.json (the mapping entries the backend left float, also logged as warnings;
    the metric counts them in every run)."""
    out = ctx.out_dir
    lowered: Lowered = produced["lowered"]
    (out / "lowered_graph.py").write_text(lowered.model.code)
    write_json(out / "node_counts.json", lowered.node_counts)
    if lowered.ignored_entries:  # only when there is something to see
        write_json(out / "ignored_mapping_entries.json", lowered.ignored_entries)
    metrics = {metric_keys.node_count(kind): float(count) for kind, count in lowered.node_counts.items()}
    metrics[metric_keys.IGNORED_MAPPING_ENTRIES] = float(len(lowered.ignored_entries))
    return metrics
