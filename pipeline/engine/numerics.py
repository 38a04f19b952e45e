"""Per-layer numerics from torch's FX numeric suite: each layer's own SQNR (shadow loggers), its
cumulative SQNR through the quantized network, and its weight SQNR."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from pipeline.batch import ModelInputs
from pipeline.engine.qconfigs import quantized_engine
from pipeline.schema import CustomConfigSpec


@dataclass
class LayerSensitivity:
    module_name: str  # a skip-list's module_name entry
    quantized_type: str
    sqnr_db: float  # of this layer's output, quantized alone on float inputs (no error from earlier layers)
    key: str = ""  # the numeric suite's name for the layer (joins it with the suite's other results)


def numeric_suite_blocker(custom: CustomConfigSpec) -> str | None:
    """Why torch's FX numeric suite cannot run on this model, or None. The suite re-traces both models
    with a tracer whose skipped module names and classes torch 2.13 hard-codes empty (a TODO in
    torch/ao/ns/_numeric_suite_fx.py), so it cannot step around custom or non-traceable modules."""
    keys = [
        key
        for key in ("float_to_observed_custom_module_class", "non_traceable_module_name", "non_traceable_module_class")
        if custom.prepare.get(key)
    ]
    if not keys:
        return None
    return (
        f"custom_config={custom.name} sets custom_config.prepare.{' and '.join(keys)}, and torch 2.13's FX numeric "
        f"suite re-traces the model with no way to leave those modules untraced, so per-layer SQNR cannot be "
        f"measured for this model"
    )


def layer_sensitivity(
    prepared: GraphModule, lowered: GraphModule, inputs: ModelInputs, engine: str
) -> list[LayerSensitivity]:
    """Each quantized layer's own error, worst first, from torch's FX numeric suite shadow loggers:
    the int8 layer runs on the float model's input to that layer, so one bad layer does not make
    every later one look bad (which is what a skip search needs to rank)."""
    from torch.ao.ns.fx.utils import compute_sqnr

    with _numeric_suite(engine) as numeric_suite:
        shadowed = numeric_suite.add_shadow_loggers(
            "float", copy.deepcopy(prepared), "int8", copy.deepcopy(lowered), numeric_suite.OutputLogger
        )
        inputs.call(shadowed)
        results = numeric_suite.extract_shadow_logger_info(shadowed, numeric_suite.OutputLogger, "int8")
        numeric_suite.extend_logger_results_with_comparison(results, "float", "int8", compute_sqnr, "sqnr")
    layers = []
    for result_key, result in results.items():
        output = result["node_output"]["int8"][0]
        if not _holds_tensors(output):
            continue
        sqnr = _mean_sqnr(output)
        layers.append(
            LayerSensitivity(output["fqn"], output["ref_node_target_type"].rsplit(".", 1)[-1], sqnr, result_key)
        )
    return sorted(layers, key=lambda layer: layer.sqnr_db)


@contextlib.contextmanager
def _numeric_suite(engine: str) -> Iterator[Any]:
    """torch's FX numeric suite, run under `engine` without autograd and with its print()s swallowed."""
    import io
    from contextlib import redirect_stdout

    import torch.ao.ns._numeric_suite_fx as numeric_suite

    with quantized_engine(engine), torch.no_grad(), redirect_stdout(io.StringIO()):
        yield numeric_suite


def _holds_tensors(output: dict[str, Any]) -> bool:
    """Whether a logged op produced tensors. The suite also logs ops whose results are not tensors, such as
    an `operator.add` doing shape arithmetic (`x.size()[:-1] + (heads, dim)`, as in attention layers): their
    loggers record nothing and they have no SQNR, so they are left out of every table."""
    return bool(output.get("sqnr"))


def _mean_sqnr(output: dict[str, Any]) -> float:
    return float(torch.stack([torch.as_tensor(s) for s in output["sqnr"]]).mean())


@dataclass
class LoggedOutput:
    """One op's output through the whole quantized network so far (numeric suite add_loggers)."""

    key: str  # the numeric suite's name for the op, shared by its loggers and shadows
    module_name: str
    quantized_type: str
    sqnr_db: float  # int8 network vs float network at this op's output: earlier layers' error included
    has_weight: bool


@dataclass
class LayerDiagnostics:
    module_name: str
    quantized_type: str
    own_sqnr_db: float  # quantized alone on float inputs (layer_sensitivity)
    cumulative_sqnr_db: float | None  # its output through the whole quantized network so far
    weight_sqnr_db: float | None  # int8 weight vs float weight; None for layers without weights


def layer_diagnostics(
    prepared: GraphModule, lowered: GraphModule, inputs: ModelInputs, engine: str
) -> tuple[list[LayerDiagnostics], list[LoggedOutput]]:
    """Per quantized layer (worst own SQNR first): own SQNR (layer_sensitivity's shadow loggers),
    cumulative SQNR (add_loggers / extract_logger_info) and weight SQNR (extract_weights). Also every
    logged op's cumulative SQNR in execution order, which shows where an error starts."""
    from torch.ao.ns.fx.utils import compute_sqnr

    with _numeric_suite(engine) as numeric_suite:
        float_logged, int8_logged = numeric_suite.add_loggers(
            "float", copy.deepcopy(prepared), "int8", copy.deepcopy(lowered), numeric_suite.OutputLogger
        )
        inputs.call(float_logged)
        inputs.call(int8_logged)
        activations = numeric_suite.extract_logger_info(float_logged, int8_logged, numeric_suite.OutputLogger, "int8")
        numeric_suite.extend_logger_results_with_comparison(activations, "float", "int8", compute_sqnr, "sqnr")
        weights = numeric_suite.extract_weights("float", prepared, "int8", lowered)  # reads only: no copies
        numeric_suite.extend_logger_results_with_comparison(weights, "float", "int8", compute_sqnr, "sqnr")
        # The results dict is in attribute order; the int8 graph's node order is execution order.
        position = {node.name: i for i, node in enumerate(int8_logged.graph.nodes)}
    weight_sqnr = {
        key: _mean_sqnr(result["weight"]["int8"][0])
        for key, result in weights.items()
        if _holds_tensors(result["weight"]["int8"][0])
    }
    outputs = {
        key: output
        for key, output in ((key, result["node_output"]["int8"][0]) for key, result in activations.items())
        if _holds_tensors(output)
    }
    logged = [
        LoggedOutput(
            key,
            output["fqn"],
            output["ref_node_target_type"].rsplit(".", 1)[-1],
            _mean_sqnr(output),
            key in weight_sqnr,
        )
        for key, output in sorted(
            outputs.items(), key=lambda item: position.get(item[1]["ref_node_name"], len(position))
        )
    ]
    cumulative = {output.key: output.sqnr_db for output in logged}
    layers = [
        LayerDiagnostics(
            layer.module_name,
            layer.quantized_type,
            layer.sqnr_db,
            cumulative.get(layer.key),
            weight_sqnr.get(layer.key),
        )
        for layer in layer_sensitivity(prepared, lowered, inputs, engine)
    ]
    return layers, logged
