"""Stage `lower`: the reference model lowered to the backend's quantized operators, by the same pass
convert_fx runs after its own reference conversion (so the result equals convert_fx's).

Config keys read: backend.engine, backend.backend_config, qconfig_mapping.name, skip.name.
"""

from __future__ import annotations

import logging

import torch

from pipeline.engine import get_engine
from pipeline.schema import BackendSpec
from stages.types import Lowered, ReferenceModel

log = logging.getLogger(__name__)


class NothingQuantizedError(RuntimeError):
    """The lowered model runs no int8 op: the mapping, skip-list and backend config left all float."""


def lower(reference: ReferenceModel, backend: BackendSpec, example_inputs: tuple[torch.Tensor, ...]) -> Lowered:
    engine = get_engine()
    model = engine.lower(reference.model, reference.engine_state, backend.engine)
    counts = engine.count_nodes(model, example_inputs, backend.engine)
    log.info(
        "lowered for backend=%s: %d quantized ops, %d float ops, %d quantize/dequantize",
        backend.engine,
        counts["quantized"],
        counts["float"],
        counts["quantize_dequantize"],
    )
    if counts["quantized"] == 0:
        # BackendConfig silently ignores qconfigs it does not support, so this is the only signal.
        raise NothingQuantizedError(
            f"Nothing was quantized with backend.backend_config='{backend.backend_config}': every op stayed "
            f"float. Either the skip-list covers everything, or the mapping's qconfigs use dtypes or ranges "
            f"this BackendConfig does not support (e.g. qnnpack needs quint8 activations); try "
            f"qconfig_mapping=backend_default."
        )
    return Lowered(model=model, engine=backend.engine, node_counts=counts)
