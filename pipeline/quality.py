"""Quality metrics shared by the stages that score a model (evaluate, search): functions of OUTPUT tensors
only (float outputs, the quantized model's outputs, labels), so they do not care how a model's inputs are
fed. Accuracy, top-k, SQNR, agreement, cosine and a user's function (evaluate.metrics picks them),
accumulated batch by batch, with Wilson intervals for proportions. Latency and size are pipeline/measure.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline import metric_keys

log = logging.getLogger(__name__)


def cosine_per_sample(reference: torch.Tensor, approximation: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each sample's flattened output with float's ([N]); 1.0 where both are zero."""
    a = reference.reshape(reference.shape[0], -1).double()
    b = approximation.reshape(approximation.shape[0], -1).double()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    both_zero = (a.abs().sum(1) == 0) & (b.abs().sum(1) == 0)
    return torch.where(both_zero, torch.ones_like(cosine), cosine)


def top_k_accuracy(outputs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose label is among the k highest outputs (k capped at the number of classes)."""
    k = min(k, outputs.shape[1])
    return (outputs.topk(k, dim=1).indices == labels.unsqueeze(1)).any(1).float().mean().item()


CustomMetric = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], float]


@dataclass(frozen=True)
class MetricPlan:
    """Which quality metrics a run computes (evaluate.metrics resolved for this run's data)."""

    names: tuple[str, ...]  # from metric_keys.EVALUATE_METRICS, without auto
    top_k: int = 5
    custom: CustomMetric | None = None
    custom_path: str = ""


def resolve_metric_names(requested: list[str], labelled: bool, has_custom: bool) -> tuple[str, ...]:
    """evaluate.metrics for this run: `auto` is accuracy, sqnr, agreement and cosine when accuracy means
    something (labels and trained weights), else sqnr and cosine (argmax agreement means little for
    embeddings or regression outputs); plus custom when evaluate.custom_metric is set. accuracy and topk
    are dropped (with a warning) when there are no labels."""
    names: list[str] = []
    for name in requested:
        if name == "auto":
            expanded = ["accuracy", "sqnr", "agreement", "cosine"] if labelled else ["sqnr", "cosine"]
            names += expanded + (["custom"] if has_custom else [])
        elif name in ("accuracy", "topk") and not labelled:
            log.warning(
                "evaluate.metrics: %s needs labelled data and trained weights; this run has none: skipped", name
            )
        else:
            names.append(name)
    return tuple(dict.fromkeys(names))


def metric_plan(
    requested: list[str], top_k: int, custom_metric: str | None, python_path: list[str], labelled: bool
) -> MetricPlan:
    custom = resolve_custom_metric(custom_metric, python_path) if custom_metric else None
    return MetricPlan(resolve_metric_names(requested, labelled, custom is not None), top_k, custom, custom_metric or "")


def _call_custom(
    plan: MetricPlan, float_outputs: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor | None
) -> float:
    assert plan.custom is not None
    try:
        value = plan.custom(float_outputs, outputs, labels)
        return float(value)
    except Exception as error:
        raise RuntimeError(
            f"evaluate.custom_metric='{plan.custom_path}' failed on outputs of shape {tuple(outputs.shape)}: "
            f"{type(error).__name__}: {error}. It is called as fn(float_outputs, int8_outputs, labels or None) "
            f"and must return a float (higher is better when it is a search criterion)."
        ) from error


def wilson_interval(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% at z=1.96): sound near 0 and 1 and for small
    subsets, unlike the normal approximation."""
    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * ((p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


class QualityAccumulator:
    """The plan's quality metrics of one model, accumulated batch by batch (so evaluation streams):
    accuracy and top-k as correct counts (with accuracy's 95% Wilson interval), SQNR as sums of signal and
    noise power, agreement as a count, cosine as a sum and a minimum over samples. `result()` equals
    `quality_metrics` on the concatenated outputs. The metrics against float (SQNR, agreement, cosine,
    custom) are reported only when float outputs came with the batches: evaluate.models without float
    gives none of them rather than an SQNR of inf and an agreement of 0.

    The custom metric is a function of ALL outputs (a recall, a ranking...), so its inputs are gathered
    (float outputs, this model's outputs, labels) and it is called once at the end: memory grows with the
    evaluation set for it alone; bound it with evaluate.max_samples when the set is large."""

    def __init__(self, name: str, plan: MetricPlan, labelled: bool) -> None:
        self.name, self.plan, self.labelled = name, plan, labelled
        self.samples = 0
        self.compared = 0  # samples that came with float outputs
        self.correct = 0.0
        self.top_correct = 0.0
        self.signal = 0.0
        self.noise = 0.0
        self.agree = 0.0
        self.cosine_sum = 0.0
        self.cosine_min = float("inf")
        self.gathered: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    @property
    def against_float(self) -> bool:
        return self.name != "float"

    def update(self, outputs: torch.Tensor, float_outputs: torch.Tensor | None, labels: torch.Tensor | None) -> None:
        count = int(outputs.shape[0])
        self.samples += count
        names = self.plan.names
        if labels is not None and self.labelled:
            if "accuracy" in names:
                self.correct += top_k_accuracy(outputs, labels, 1) * count
            if "topk" in names:
                self.top_correct += top_k_accuracy(outputs, labels, self.plan.top_k) * count
        if not self.against_float or float_outputs is None:
            return
        self.compared += count
        if "sqnr" in names:
            self.signal += float_outputs.double().pow(2).sum().item()
            self.noise += (float_outputs.double() - outputs.double()).pow(2).sum().item()
        if "agreement" in names:
            self.agree += (outputs.argmax(1) == float_outputs.argmax(1)).sum().item()
        if "cosine" in names:
            cosine = cosine_per_sample(float_outputs, outputs)
            self.cosine_sum += cosine.sum().item()
            self.cosine_min = min(self.cosine_min, cosine.min().item())
        if "custom" in names and self.plan.custom is not None:
            self.gathered.append((float_outputs, outputs, labels))

    def result(self, with_interval: bool = True) -> dict[str, float]:
        name, names, n = self.name, self.plan.names, max(1, self.samples)
        metrics: dict[str, float] = {}
        if self.labelled and self.samples:
            if "accuracy" in names:
                metrics[metric_keys.eval_metric(name, metric_keys.ACCURACY)] = self.correct / n
                if with_interval:
                    low, high = wilson_interval(round(self.correct), self.samples)
                    metrics[metric_keys.eval_metric(name, metric_keys.ACCURACY_CI_LOW)] = low
                    metrics[metric_keys.eval_metric(name, metric_keys.ACCURACY_CI_HIGH)] = high
            if "topk" in names:
                metrics[metric_keys.eval_metric(name, metric_keys.top_k_accuracy(self.plan.top_k))] = (
                    self.top_correct / n
                )
        if not self.against_float or not self.compared:
            return metrics  # nothing was compared with float: no SQNR, agreement, cosine or custom metric
        n = self.compared
        if "sqnr" in names and (self.signal or self.noise):
            sqnr = float("inf") if self.noise == 0.0 else 10.0 * torch.log10(torch.tensor(self.signal / self.noise))
            metrics[metric_keys.eval_metric(name, metric_keys.SQNR_DB)] = float(sqnr)
        elif "sqnr" in names:
            metrics[metric_keys.eval_metric(name, metric_keys.SQNR_DB)] = float("inf")
        if "agreement" in names:
            metrics[metric_keys.eval_metric(name, metric_keys.AGREEMENT)] = self.agree / n
        if "cosine" in names:
            metrics[metric_keys.eval_metric(name, metric_keys.COSINE_MEAN)] = self.cosine_sum / n
            metrics[metric_keys.eval_metric(name, metric_keys.COSINE_MIN)] = self.cosine_min
        if "custom" in names and self.plan.custom is not None and self.gathered:
            float_outputs = torch.cat([part[0] for part in self.gathered])
            outputs = torch.cat([part[1] for part in self.gathered])
            labels = None if self.gathered[0][2] is None else torch.cat([part[2] for part in self.gathered])  # type: ignore[misc]
            metrics[metric_keys.eval_metric(name, metric_keys.CUSTOM)] = _call_custom(
                self.plan, float_outputs, outputs, labels
            )
        return metrics


def quality_metrics(
    name: str,
    outputs: torch.Tensor,
    float_outputs: torch.Tensor | None,
    labels: torch.Tensor | None,
    plan: MetricPlan | None = None,
) -> dict[str, float]:
    """The plan's metrics of model `name`: accuracy / top-k with labels (any model), and against float
    (a model other than float): SQNR, argmax agreement, cosine mean and minimum, the custom metric.
    No plan: accuracy (with labels), SQNR and agreement. (QualityAccumulator, one batch.)"""
    if plan is None:
        plan = MetricPlan(("accuracy", "sqnr", "agreement") if labels is not None else ("sqnr", "agreement"))
    accumulator = QualityAccumulator(name, plan, labels is not None)
    accumulator.update(outputs, float_outputs, labels)
    return accumulator.result(with_interval=False)


def float_score(criterion: str, float_outputs: torch.Tensor, labels: torch.Tensor | None, plan: MetricPlan) -> float:
    """The float model's own value of a search criterion: its accuracy / top-k, 1.0 for agreement and
    cosine (float against itself), inf for SQNR, the custom metric of float against float."""
    if criterion in ("accuracy", "topk"):
        assert labels is not None
        return top_k_accuracy(float_outputs, labels, 1 if criterion == "accuracy" else plan.top_k)
    if criterion == "custom":
        return _call_custom(plan, float_outputs, float_outputs, labels)
    return float("inf") if criterion == "sqnr" else 1.0


# --------------------------------------------------------------------------------------------------
# evaluate.custom_metric: a user's function by import path, resolved at start-up


def resolve_custom_metric(path: str, python_path: list[str]) -> CustomMetric:
    """Import `module.function` with `python_path` (model.python_path, data.python_path) at the front of
    sys.path, and check it takes (float_outputs, int8_outputs, labels); else one-paragraph ConfigError."""
    import importlib
    import inspect
    import sys
    from pathlib import Path

    from pipeline.errors import ConfigError, closest

    key = "evaluate.custom_metric"
    contract = "a function fn(float_outputs, int8_outputs, labels) -> float (labels is None without labels)"
    module_name, _, attribute = str(path).rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(
            f"{key}='{path}' is not an import path; write module.function, e.g. {key}=my_metrics.embedding_recall "
            f"with my_metrics.py in a folder listed in model.python_path. It must be {contract}."
        )
    folders = [str(Path(folder).resolve()) for folder in python_path]
    for folder in reversed(folders):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or module_name
        raise ConfigError(
            f"{key}='{path}': no module '{missing}' was found in model.python_path / data.python_path "
            f"{python_path or '(empty)'} nor on sys.path. If '{module_name.split('.')[0]}.py' is your own file, add "
            f"its folder, e.g. model.python_path=[path/to/folder] (relative to where you run). It must be {contract}."
        ) from None
    except Exception as error:
        raise ConfigError(
            f"{key}='{path}': importing '{module_name}' raised {type(error).__name__}: {error}"
        ) from error
    function = getattr(module, attribute, None)
    if function is None:
        names = [name for name in dir(module) if not name.startswith("_") and callable(getattr(module, name))]
        raise ConfigError(
            f"{key}='{path}': module '{module_name}' ({getattr(module, '__file__', '?')}) has no '{attribute}'."
            f"{closest(attribute, names)} It must be {contract}."
        )
    if not callable(function):
        raise ConfigError(f"{key}='{path}' is a {type(function).__name__}, not a function; it must be {contract}.")
    try:
        inspect.signature(function).bind(None, None, None)
    except TypeError:
        raise ConfigError(f"{key}='{path}' does not take three arguments; it must be {contract}.") from None
    except ValueError:
        pass  # no signature to check (a builtin): it is called anyway
    return function
