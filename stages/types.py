"""The typed values that flow between stages and the context the runner hands each stage.

Every stage module declares the same few names, read by the registry (pipeline/registry.py) and the
runner:
- `NAME`: the stage's name (its `stages:` entry and its folder in the run directory);
- `CONSUMES`: artifacts it needs (produced by an earlier stage); `USES`: artifacts it reads when present;
- `PRODUCES`: artifacts it returns from `compute`;
- `READS`: the config groups (PipelineSpec fields) it reads;
- `OPTIONAL`: an optional stage runs when listed in `stages` or when `<NAME>.enabled` is true;
- `FAILURE_IS_FATAL` (default True when not declared): False for an analysis whose result nothing
  later needs (diagnose, inspect). When such a stage raises, the runner logs a warning, writes the
  error and its traceback to `<NAME>/error.txt`, logs the metric `<NAME>/failed` = 1 (0 when it
  succeeds) and the tag `failed_optional_stages`, and the run goes on and can end FINISHED. Its
  artifacts are then absent, so a non-fatal stage's PRODUCES may appear only in later stages' USES,
  never in their CONSUMES (pipeline/registry.py checks this). A stage whose result feeds the run
  (search: its winner is the skip-list the run converts with) keeps the default: a failed search
  would otherwise silently give a model other than the one the user asked for;
- `MEASURES_TIME` (default False): True for a stage that times models (evaluate's and search's
  latency); a stage that times only in some runs also defines `measures_time(spec) -> bool` (evaluate:
  evaluate.latency.enabled).
  Before it starts, the runner waits for the tracker's background work (the MLflow store
  opening on its worker thread, pipeline/tracking/background.py) and makes tracking calls synchronous
  until it ends, so nothing else runs in the process while it measures; then they queue again;
- `check(spec)`: start-up checks that need more than the schema (raise ConfigError), before any work;
- `compute(ctx) -> dict[artifact name, value]` and `write(produced, ctx) -> metrics`, which writes
  the stage's files under `ctx.out_dir` (<run dir>/<NAME>/) and returns its metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.fx import GraphModule

from pipeline.batch import Batch, ModelInputs
from pipeline.batches import BatchList, BatchSource, DatasetBatches, as_source, first_batch
from pipeline.engine.base import ReferenceConversion

if TYPE_CHECKING:
    from pipeline.schema import PipelineSpec

# Batch and ModelInputs: pipeline/batch.py; BatchSource, BatchList, DatasetBatches: pipeline/batches.py, re-exported
__all__ = ["Batch", "BatchList", "BatchSource", "DataBundle", "DatasetBatches", "ModelInputs"]


@dataclass
class DataBundle:
    """Calibration and evaluation batches; labels may be None (then accuracy is not reported).

    A batch is `(inputs, labels)`. `calibration` and `evaluation` are BatchSources (pipeline/batches.py):
    re-iterable, with `len()` batches, `num_samples`, `head(max_batches, max_samples)`, `[i]`, `[:n]`. A
    factory may give a list of batches (held in memory, wrapped in a BatchList) or a lazy source such as
    DatasetBatches (decoded per batch, in DataLoader workers: image_folder). Inputs may be a ModelInputs, a
    tensor (one positional input), a tuple of tensors or a dict of named tensors (keyword inputs, e.g.
    input_ids and attention_mask), and `example_inputs` likewise: both are wrapped into ModelInputs here.
    `example_inputs` None: the first calibration sample."""

    name: str
    calibration: BatchSource
    evaluation: BatchSource
    example_inputs: ModelInputs | None
    has_labels: bool

    def __post_init__(self) -> None:
        self.calibration = as_source(self.calibration)
        self.evaluation = as_source(self.evaluation)
        if self.example_inputs is None:
            self.example_inputs = first_batch(self.calibration)[0][:1]
        self.example_inputs = ModelInputs.wrap(self.example_inputs)

    @property
    def num_calibration_samples(self) -> int:
        return self.calibration.num_samples

    @property
    def num_evaluation_samples(self) -> int:
        return self.evaluation.num_samples

    @property
    def lazy(self) -> bool:
        """True when a part is decoded per pass (not held in memory)."""
        return bool(getattr(self.calibration, "lazy", False) or getattr(self.evaluation, "lazy", False))

    def fingerprint(self) -> str:
        """Names both parts' batches (see BatchSource.fingerprint)."""
        return f"{self.calibration.fingerprint()}-{self.evaluation.fingerprint()}"


@dataclass
class Loaded:
    """Output of `load`: the float model in eval mode and its data."""

    model: nn.Module
    data: DataBundle
    model_name: str
    trained_weights: bool

    @property
    def has_accuracy(self) -> bool:
        """Accuracy means something: labelled data and trained weights (not model.trained=false)."""
        return self.data.has_labels and self.trained_weights


@dataclass(frozen=True)
class Calibrated:
    """Output of `calibrate`: the prepared (observed) model after calibration batches."""

    model: GraphModule
    num_batches: int
    num_samples: int
    cache_hit: bool = False
    cache_key: str | None = None


# Output of `reference_convert`: the reference model, the nodes left float, and what lowering needs from
# the convert step (`engine_state`: opaque here, created and read only by the engine that converted).
ReferenceModel = ReferenceConversion


@dataclass
class Lowered:
    """Output of `lower`: the model running the backend's quantized operators."""

    model: GraphModule
    engine: str
    node_counts: dict[str, int] = field(default_factory=dict)
    ignored_entries: list[str] = field(default_factory=list)  # mapping entries the backend left float


@dataclass(frozen=True)
class SearchedCalibration:
    """The search's recovery phase found other recovery settings better: the calibration made with them,
    which reference_convert (and diagnose) then use instead of the `calibrated` artifact and recovery.*."""

    calibrated: Calibrated
    recovery: Any  # a RecoverySpec (pipeline.schema)


@dataclass
class EvaluationReport:
    """Output of `evaluate`: flat metric names (as logged to MLflow) and a few per-form details."""

    metrics: dict[str, float]
    fastest_form: dict[str, str]
    # The lowered model's TorchScript forms as evaluate traced (and froze) them, on a batch of these input
    # shapes: export saves them instead of tracing again when its example has the same shapes. In memory only.
    lowered_forms: dict[str, Any] = field(default_factory=dict)
    lowered_forms_shapes: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class ExportBundle:
    """Output of `export`: files written, by format, and the formats skipped with the reason."""

    files: dict[str, Path]
    skipped: dict[str, str]
    metrics: dict[str, float]
    # Written files whose outputs disagree with the int8 torch model beyond export.min_sqnr_db /
    # export.min_agreement: {format: the figures, e.g. "14.4 dB SQNR"}.
    disagreements: dict[str, str] = field(default_factory=dict)
    # The TorchScript file's form ("frozen" or "unfrozen") and why (e.g. "fastest measured at batch 1").
    form: str | None = None
    form_reason: str = ""


def _no_child_run(name: str, params: dict[str, str], tags: dict[str, str], metrics: dict[str, float]) -> None:
    return None


@dataclass
class StageContext:
    """What the runner hands every stage: the validated config, the artifacts earlier stages produced
    (by name), and the runner's services: a stop check (a SIGTERM or Ctrl-C that library code swallowed)
    and tracking calls, so that stages never import the tracking layer above them."""

    spec: PipelineSpec
    out_dir: Path  # this stage's folder in the run directory (<run dir>/<NAME>/), made before write()
    artifacts: Mapping[str, Any] = field(default_factory=dict)
    check_stop: Callable[[], None] = lambda: None
    set_tags: Callable[[dict[str, str]], None] = lambda tags: None
    # A nested tracking run under this one: name, params, tags, metrics (e.g. one per search trial).
    log_child_run: Callable[[str, dict[str, str], dict[str, str], dict[str, float]], None] = _no_child_run
    # A warning the user must see (e.g. an exported file disagreeing with the int8 model): the runner logs
    # it at WARNING at once and repeats it in the run's summary (<run dir>/warnings.txt, the `warnings` tag).
    warn: Callable[[str], None] = lambda text: None
    # The data as a tracking dataset input: name, digest, source, profile (sizes, shapes), context.
    log_dataset: Callable[[str, str, str, dict[str, Any], str], None] = lambda *dataset: None
    # A deployable file as a tracking model (and, with tracking.register, a registry version): the file,
    # the quantized engine, example inputs and output (numpy), and tags for the registry version.
    log_model: Callable[[Path, str, list[Any], Any, dict[str, str]], None] = lambda *model: None


def write_json(path: Path, payload: Any) -> None:
    """Indented, key-sorted JSON; values JSON cannot hold are written as their str()."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
