"""Stage `lower`: the reference model lowered to the backend's quantized operators, by the same pass
convert_fx runs after its own reference conversion (so the result equals convert_fx's).

A mapping entry whose nodes the BackendConfig left float (it silently drops qconfigs with dtypes it has
no config for, e.g. dynamic int8 on Conv2d or float16 on onednn) is a warning naming the entry, a metric
and ignored_mapping_entries.json.

Config keys read: backend.engine, backend.backend_config, qconfig_mapping.name, skip.name.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from torch import nn

from pipeline import metric_keys
from pipeline.batch import ModelInputs
from pipeline.engine import steps
from pipeline.schema import BackendSpec, EngineSpec
from stages.types import Lowered, ReferenceModel, StageContext, write_json

log = logging.getLogger(__name__)

NAME = "lower"
CONSUMES = ("reference", "loaded")
USES: tuple[str, ...] = ()
PRODUCES = ("lowered",)
READS = ("engine", "backend")
OPTIONAL = False


def lower(
    reference: ReferenceModel, backend: BackendSpec, example_inputs: ModelInputs, flow: EngineSpec | None = None
) -> Lowered:
    model, counts, ignored = steps.lower_with_report(reference, backend, example_inputs, flow=flow or EngineSpec())
    log.info(
        "lowered for backend=%s: %d quantized ops, %d float ops, %d quantize/dequantize",
        backend.engine,
        counts["quantized"],
        counts["float"],
        counts["quantize_dequantize"],
    )
    return Lowered(model=model, engine=backend.engine, node_counts=counts, ignored_entries=ignored)


def module_listing(model: nn.Module) -> str:
    """The int8 model's module tree (str(model)) and a table of its submodules' types (full import paths,
    so torch's quantized Linear is told from the float one) with counts, most frequent first: where a
    user sees that a custom quantized class, or a float module, is in the model."""
    counts = Counter(f"{type(module).__module__}.{type(module).__qualname__}" for _, module in model.named_modules())
    counts[f"{type(model).__module__}.{type(model).__qualname__}"] -= 1  # the model itself, not a submodule
    rows = sorted(((n, name) for name, n in counts.items() if n > 0), key=lambda row: (-row[0], row[1]))
    width = max((len(str(n)) for n, _ in rows), default=1)
    table = "\n".join(f"{n:>{width}}  {name}" for n, name in rows) or "(no submodules)"
    return f"{model}\n\n# Submodules by type ({sum(n for n, _ in rows)} in all):\n{table}\n"


def compute(ctx: StageContext) -> dict[str, Any]:
    loaded = ctx.artifacts["loaded"]
    return {"lowered": lower(ctx.artifacts["reference"], ctx.spec.backend, loaded.data.example_inputs, ctx.spec.engine)}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """lowered_graph.py (the int8 model's FX code), lowered_model.txt (its module tree and module types),
    node_counts.json and, when there are any, ignored_mapping_entries.json (the mapping entries the backend
    left float, also logged as warnings; the metric counts them in every run)."""
    out = ctx.out_dir
    lowered: Lowered = produced["lowered"]
    (out / "lowered_graph.py").write_text(lowered.model.code)
    (out / "lowered_model.txt").write_text(module_listing(lowered.model))
    write_json(out / "node_counts.json", lowered.node_counts)
    if lowered.ignored_entries:  # only when there is something to see
        write_json(out / "ignored_mapping_entries.json", lowered.ignored_entries)
    for line in lowered.ignored_entries:  # a warning, repeated in the run's summary (warnings.txt)
        ctx.warn(f"lower: {line}")
    metrics = {metric_keys.node_count(kind): float(count) for kind, count in lowered.node_counts.items()}
    metrics[metric_keys.IGNORED_MAPPING_ENTRIES] = float(len(lowered.ignored_entries))
    return metrics
