"""The int8 TorchScript file as an MLflow pyfunc model ("models from code": MLflow copies this file into
the logged model and runs it at load time, so loading needs torch, numpy and mlflow, not this project).

    model = mlflow.pyfunc.load_model("models:/<name>@candidate")   # or runs:/..., models:/<model id>
    logits = model.predict(batch)    # an array shaped like the input example; several inputs: a dict
                                     # {"input_0": ..., "input_1": ...} in the traced (positional) order

The model config's `engine` is the quantized engine the file was exported for: TorchScript re-packs int8
weights for the engine active at load time, so load_context sets it first.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

ARTIFACT = "torchscript"  # the key of the TorchScript file in the model's artifacts


class TorchScriptModel(PythonModel):
    """predict(ndarray) -> ndarray, or predict({"input_0": ..., "input_1": ...}) for a model of several inputs."""

    def load_context(self, context: Any) -> None:
        engine = (context.model_config or {}).get("engine")
        if engine:
            torch.backends.quantized.engine = engine
        self.module = torch.jit.load(context.artifacts[ARTIFACT], map_location="cpu").eval()

    # No type hints on predict: mlflow would read them as the model's input schema (the signature says it).
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        if isinstance(model_input, dict):
            inputs = [model_input[key] for key in sorted(model_input, key=lambda k: int(k.rsplit("_", 1)[-1]))]
        else:
            inputs = [model_input]
        tensors = [torch.as_tensor(np.asarray(value)) for value in inputs]  # the signature checked the dtypes
        with torch.no_grad():
            output = self.module(*tensors)
        return output.numpy()


mlflow.models.set_model(TorchScriptModel())
