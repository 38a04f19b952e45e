"""The one typed schema of a run's config, registered with Hydra's ConfigStore and validated once.

Each dataclass is a `*Spec` (never `*Config`, which would clash with torch's QConfig, BackendConfig,
PrepareCustomConfig...). OmegaConf rejects unknown keys and wrong types while composing; `check`
then checks what types cannot say (names in closed sets, ranges, stage order) before any work.
Imports no engine and no stage: pipeline.validation adds the checks that need them. The quantization
groups (engine, backend, qconfig_mapping, skip, custom_config) are in schema_quant.py, re-exported here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from pipeline.errors import ConfigError, closest
from pipeline.schema_quant import (  # noqa: F401 (the quantization groups, re-exported: schema.SkipSpec works)
    BACKEND_CONFIGS,
    ENGINES,
    FLOWS,
    BackendSpec,
    CustomConfigSpec,
    EngineSpec,
    ModuleNameEntry,
    ModuleNameObjectTypeOrderEntry,
    ModuleNameRegexEntry,
    ObjectTypeEntry,
    QConfigMappingSpec,
    SkipSpec,
)


@dataclass
class ModelSpec:
    name: str = MISSING
    # Hydra-instantiated factory returning an nn.Module: {_target_: import.path, **kwargs}.
    factory: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # a state_dict file, loaded with weights_only=True after the factory
    trained: bool = True  # false for random weights: accuracy is then logged as meaningless
    # Folders put at the front of sys.path before the factory is imported (relative to where you run), so
    # _target_ can name a function in your own .py file: this runs that file's code, by design.
    python_path: list[str] = field(default_factory=list)


@dataclass
class DataSpec:
    name: str = MISSING
    # Hydra-instantiated factory returning a stages.types.DataBundle.
    factory: dict[str, Any] = field(default_factory=dict)
    python_path: list[str] = field(default_factory=list)  # as model.python_path, for a data factory of your own
    # DataLoader worker processes decoding a lazy source's batches (image_folder) while the model runs; 0:
    # in the run's own process. 1 measured best on 2 cores (README "Data at scale").
    num_workers: int = 1


@dataclass
class CalibrateSpec:
    max_batches: int | None = None  # null: every calibration batch


@dataclass
class LatencySpec:
    enabled: bool = True
    threads: int = 1  # torch.set_num_threads during latency runs
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    warmup: int = 3  # untimed runs first, at least (then until 2 calls agree within 2x); outside budget_s
    repeats: int = 6  # timed runs at least; more until the median's interval is within target_ci
    target_ci: float = 0.05  # stop when the median's 95% interval half-width is within this fraction of it
    budget_s: float = 0.5  # ... or when this many seconds are spent on one (model, form, batch size)
    prune: bool = True  # larger batch sizes time only the form fastest at the smallest one
    forms: list[str] = field(default_factory=lambda: ["eager", "traced", "frozen"])


@dataclass
class EvaluateSpec:
    models: list[str] = field(default_factory=lambda: ["float", "lowered"])
    max_batches: int | None = None  # null: the whole evaluation part
    # null: every sample (of max_batches); a count scores on the first samples only (a search or sweep on a
    # subset, the final run on the full set); accuracy's 95% Wilson interval is logged beside it.
    max_samples: int | None = None
    latency: LatencySpec = field(default_factory=LatencySpec)
    # Quality metrics (metric_keys.EVALUATE_METRICS): auto = accuracy, sqnr, agreement, cosine with labels
    # and trained weights; sqnr, cosine without. Also accuracy, topk, sqnr, agreement, cosine, custom.
    metrics: list[str] = field(default_factory=lambda: ["auto"])
    top_k: int = 5  # the topk metric's k
    # `module.function` taking (float_outputs, int8_outputs, labels or None) and returning a float; it may
    # live in a folder of model.python_path. Logged as eval/<model>/custom.
    custom_metric: str | None = None


@dataclass
class ExportSpec:
    torchscript: str = "trace"  # trace | script | none
    # auto: frozen or not as evaluate measured the lowered model fastest at target_batch_size (and
    # evaluate.latency.threads); frozen | unfrozen: forced
    form: str = "auto"
    target_batch_size: int = 1  # the deployment batch size auto reads evaluate's measurement at
    lite_interpreter: bool = True  # qnnpack only: a mobile .ptl file
    onnx: bool = True  # needs the [onnx] extra; skipped with a message when absent
    onnx_opset: int = 17
    aot_inductor: bool = True  # engine=pt2e: also an AOTInductor package (.pt2, static batch), ~15 s to build
    # An exported file whose outputs (reloaded, on the first evaluation batch) disagree with the int8 torch
    # model below either bar is a warning naming the file and the figure (not an error: the file is written).
    min_sqnr_db: float = 30.0  # output SQNR of the file vs the int8 torch model
    min_agreement: float = 0.98  # top-1 agreement with the int8 torch model (class-score outputs only)


@dataclass
class SearchSpec:
    """Accuracy-aware skip search: the fastest model meeting a criterion, from one calibration."""

    enabled: bool = False  # search=greedy turns it on
    strategy: str = "greedy"  # greedy
    # accuracy | topk (need labels) | agreement (argmax vs float) | sqnr | cosine (mean per-sample cosine
    # vs float) | custom (evaluate.custom_metric, higher is better)
    criterion: str = "accuracy"
    max_drop: float = 0.01  # accuracy, topk, agreement: the largest accepted drop below float (agreement: 1.0)
    drop_mode: str = "absolute"  # absolute (0.01 = one point) | relative (0.01 = 1% of float accuracy)
    min_sqnr_db: float = 30.0  # sqnr criterion: the lowest accepted output SQNR
    min_cosine: float = 0.99  # cosine criterion: the lowest accepted mean cosine similarity
    min_value: float = 0.0  # custom criterion: the lowest accepted value of evaluate.custom_metric
    # conversions tried, the fully quantized one included; null: 2*ceil(log2(layers))+4, enough for a
    # bisection over the sensitivity order and some put-backs
    max_trials: int | None = None
    requantize: bool = True  # after meeting the bar, try putting skipped layers back to int8
    fail_on_miss: bool = True  # no trial met the bar: the run still finishes, then the command exits 3
    # Before skipping layers, when trial 0 misses: one trial with every recovery option at its default
    # (re-calibrated when that changes calibration), kept when it scores higher.
    recovery_phase: bool = True
    latency_tie: float = 0.05  # latencies within max(measured spread, this share) are a tie: fewer float layers win


@dataclass
class DiagnoseSpec:
    """Per-layer numeric-suite report (the last stage): table, chart, plain-words diagnosis, suggested skip-list."""

    enabled: bool = True
    max_batches: int = 1  # evaluation batches compared (and verified on); full=true: all (the full analysis)
    kernel_db: float = 25.0  # an int8 kernel below this against its own float simulation = an engine fault
    skip_below_db: float = 30.0  # skip candidates: layers whose own SQNR is below this ...
    max_skip: int = 3  # ... at most this many, worst first, each verified
    verify: bool = True  # re-convert from the calibration with each suggestion and measure its gain
    min_gain_db: float = 1.0  # a suggestion raising output SQNR by less than this is not presented as a fix
    wide_range_ratio: float = 2.0  # an output feeding ReLU6/hardtanh observed over this many times the clip: wide
    full: bool = False  # true: every evaluation batch and every candidate below skip_below_db (slow)


@dataclass
class RecoverySpec:
    """Accuracy recovery: what the engine does beyond plain observers (conf/recovery/default.yaml)."""

    # Activation bit width of uint8 activations: auto = 8, except 7 (reduce_range) on fbgemm/x86 when the
    # CPU has no VNNI (its int8 dot product can overflow at 8 bits); 7 or 8 force it.
    activation_bits: str = "auto"
    # Conv/linear outputs feeding only ReLU6/hardtanh observe the clipped range: auto = on except on
    # qnnpack (whose quantized ReLU6 is wrong anyway); on; off. qconfig_mapping=relu6_aware forces it on.
    bounded_activations: str = "auto"
    bias_correction: bool = True  # shift each int8 conv/linear's bias by its output-mean error on calibration data
    # calibration samples (the first ones) bias correction runs in one batch; 64: bench/bias_correction.py measured
    # 256 no better (<= 0.05 dB) at 4x the time (ResNet-18 shape, 224 px)
    bias_correction_samples: int = 64
    # empirical: one reference-model pass over those samples; analytic: the weights' error times the layers'
    # recorded input means, no pass; auto: empirical when samples x multiply-adds a sample <= 20 G, else analytic
    bias_correction_method: str = "auto"
    smoothquant_alpha: float = 0.5  # SmoothQuant migration strength for Linears after LayerNorm/Linear; 0: off


@dataclass
class InspectSpec:
    """Optional stage after load: module and node names, and what each skip/mapping entry matches."""

    enabled: bool = False


@dataclass
class CacheSpec:
    enabled: bool = True
    dir: str = MISSING  # one folder per entry, named by its key; delete the folder to clear the cache
    # Float outputs of the evaluation set, computed once per (model, data) and reused by every job of a
    # sweep and every search trial (under <dir>/float_outputs/); needs enabled.
    float_outputs: bool = True


@dataclass
class TrackingSpec:
    enabled: bool = True
    tracking_uri: str = MISSING
    artifact_location: str | None = MISSING  # null: the tracking server's default (its artifact proxy)
    experiment_name: str = "fx-ptq"
    run_name: str | None = None  # null: the pipeline's name for the run (schema.run_label)
    register: str | None = None  # a Model Registry name: register the run's model (a sweep's best, a search's winner)
    register_alias: str = "candidate"  # the alias the registered version gets


@dataclass
class PipelineSpec:
    backend: BackendSpec = MISSING
    engine: EngineSpec = field(default_factory=EngineSpec)
    qconfig_mapping: QConfigMappingSpec = MISSING
    skip: SkipSpec = MISSING
    custom_config: CustomConfigSpec = MISSING
    model: ModelSpec = MISSING
    data: DataSpec = MISSING
    calibrate: CalibrateSpec = field(default_factory=CalibrateSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    tracking: TrackingSpec = MISSING
    search: SearchSpec = field(default_factory=SearchSpec)
    diagnose: DiagnoseSpec = field(default_factory=DiagnoseSpec)
    inspect: InspectSpec = field(default_factory=InspectSpec)
    recovery: RecoverySpec = field(default_factory=RecoverySpec)
    cache: CacheSpec = MISSING
    # The stages to run, in pipeline order (conf/config.yaml lists the default); the registry checks them.
    stages: list[str] = MISSING
    seed: int = 0
    output_dir: str = "outputs"


_SKIP_KEY_COMMENTS = {
    "name": "shown in run names and MLflow tags",
    "object_type": "op types left float, as import paths (fused forms included)",
    "module_name_regex": "modules left float whose full name matches one of these (re.match)",
    "module_name": "modules left float, by full name (inspect: stages=[load,inspect])",
    "module_name_object_type_order": "the index-th call of object_type inside module_name left float",
    "strict": "true: an entry that matches nothing is an error instead of a warning",
}


def skip_yaml(skip: SkipSpec, header: str) -> str:
    """A SkipSpec as a conf/skip file: `header` as comment lines on top, then every key commented."""
    from omegaconf import OmegaConf

    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    for line in OmegaConf.to_yaml(OmegaConf.structured(skip)).splitlines():
        key = line.split(":", 1)[0]
        comment = _SKIP_KEY_COMMENTS.get(key) if not line.startswith((" ", "-")) else None
        lines.append(f"{line}  # {comment}" if comment else line)
    return "\n".join(lines) + "\n"


_SKIP_LISTS = ("object_type", "module_name_regex", "module_name", "module_name_object_type_order")
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._,=+:-")


def skip_label(skip: SkipSpec, preset: SkipSpec | None = None) -> str:
    """The skip-list that actually runs, for run-folder names and the `skip` tag: `skip.name` when its entries
    are those of `preset` (the conf/skip file of that name; None: there is no such file, e.g. a searched list),
    else a label made from the entries (`module_name=fc`, `object_type=torch.nn.Linear+module_name=fc`),
    `none` if there are none, or `custom-<hash>` if that label would be long or unsafe in a folder name."""

    def entries(spec: SkipSpec) -> dict[str, list[str]]:
        orders = [f"{e.module_name}:{e.object_type}:{e.index}" for e in spec.module_name_object_type_order]
        return {key: list(getattr(spec, key)) for key in _SKIP_LISTS[:3]} | {_SKIP_LISTS[3]: orders}

    own = entries(skip)
    if preset is not None and entries(preset) == own:
        return skip.name
    label = "+".join(f"{key}={','.join(values)}" for key, values in own.items() if values) or "none"
    if len(label) <= 64 and set(label) <= _LABEL_CHARS:
        return label
    import hashlib
    import json

    return f"custom-{hashlib.sha1(json.dumps(own, sort_keys=True).encode()).hexdigest()[:8]}"


def run_label(spec: PipelineSpec, skip: str) -> str:
    """What distinguishes a run, for its MLflow run name and its folder: `digits_cnn fx x86 backend_default
    skip=add` (model, engine.name, backend, mapping; `skip` is skip_label's text); with a search,
    `search=<strategy>` instead of the skip-list it searches for. The engine is always named: a sweep over
    engine=fx,pt2e otherwise gives pairs of runs and folders with the same name."""
    search = spec.search.strategy if spec.search.enabled else None
    return _label(spec.model.name, spec.engine.name, spec.backend.engine, spec.qconfig_mapping.name, search, skip)


def _label(model: str, flow: str, backend: str, mapping: str, search: str | None, skip: str) -> str:
    return f"{model} {flow} {backend} {mapping} " + (f"search={search}" if search else f"skip={skip}")


def folder_name(label: str) -> str:
    """A run label as a folder name: spaces become underscores."""
    return label.replace(" ", "_")


def skip_preset(name: str, config_sources: Any) -> SkipSpec | None:
    """conf/skip/<name>.yaml from the first config source that has it (Hydra's search order), as a SkipSpec."""
    import importlib.resources

    for source in config_sources or []:
        if source.schema == "file":
            candidate: Any = Path(source.path) / "skip" / f"{name}.yaml"
        elif source.schema == "pkg":
            try:
                candidate = importlib.resources.files(source.path.replace("/", ".")) / "skip" / f"{name}.yaml"
            except ModuleNotFoundError:
                continue
        else:
            continue
        if candidate.is_file():
            loaded = OmegaConf.create(candidate.read_text())
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SkipSpec), loaded))  # type: ignore[return-value]
    return None


def _skip_label_resolver(skip: DictConfig, *, _root_: DictConfig) -> str:
    """`${skip_label:${skip}}` in hydra.run.dir / hydra.sweep.subdir: skip_label against the chosen preset file."""
    spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SkipSpec), skip))
    runtime = OmegaConf.select(_root_, "hydra.runtime", default=None)
    choice = OmegaConf.select(runtime, "choices.skip", default=None) if runtime is not None else None
    preset = skip_preset(choice, runtime.config_sources) if choice else None
    return skip_label(spec, preset)  # type: ignore[arg-type]


def _run_label_resolver(*, _root_: DictConfig) -> str:
    """`${run_label:}` in hydra.run.dir / hydra.sweep.subdir: run_label as a folder name."""
    skip = _skip_label_resolver(_root_.skip, _root_=_root_)
    model = OmegaConf.select(_root_, "model.name", default="model")
    flow = OmegaConf.select(_root_, "engine.name", default="engine")
    backend = OmegaConf.select(_root_, "backend.engine", default="backend")
    mapping = OmegaConf.select(_root_, "qconfig_mapping.name", default="mapping")
    search = OmegaConf.select(_root_, "search.strategy") if OmegaConf.select(_root_, "search.enabled") else None
    return folder_name(_label(model, flow, backend, mapping, search, skip))


def register() -> None:
    """Register the schema so config.yaml's defaults list can extend it (`- pipeline_schema`), and the
    `skip_label` resolver its run-folder names use."""
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineSpec)
    OmegaConf.register_new_resolver("skip_label", _skip_label_resolver, replace=True)
    OmegaConf.register_new_resolver("run_label", _run_label_resolver, replace=True)
    # ${pid:} in conf/config.yaml's run folder name: runs started in the same second get their own folder.
    OmegaConf.register_new_resolver("pid", os.getpid, replace=True)


def from_config(cfg: DictConfig) -> PipelineSpec:
    """The composed config as a PipelineSpec, or ConfigError: a key the schema does not have (Hydra
    lets `+key=value` add one anywhere) or a required value left empty (an entry without `index`)."""
    _reject_unknown_keys(cfg, PipelineSpec, "")
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except MissingMandatoryValue as error:  # a `???` left unset, e.g. data.factory.root of data=image_folder
        owner = error.object_type
        is_spec = owner is not None and dataclasses.is_dataclass(owner)
        needed = [f.name for f in dataclasses.fields(owner) if f.default is MISSING] if is_spec else []
        raise ConfigError(
            f"{error.full_key} has no value and is required (it is ??? in the config); set it, e.g. "
            f"{error.full_key}=<value>" + (f". Every {owner.__name__} needs {needed}." if needed else ".")
        ) from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{getattr(error, 'full_key', '') or 'config'}: {str(error).splitlines()[0]}") from None


def is_tracking_server(uri: str) -> bool:
    """An MLflow tracking server (http[s]), as opposed to a database or folder the client writes itself."""
    return uri.startswith(("http://", "https://"))


def unknown_key_hint(override: str) -> str | None:
    """For a command-line override whose key the schema does not have (`evaluate.latncy.threads=2`), the
    valid keys at the first wrong segment: Hydra's own message names the key but not what is valid."""
    key = override.split("=", 1)[0]
    if "=" not in override or key.startswith(("+", "~", "hydra.")) or "/" in key:
        return None
    spec_type: Any = PipelineSpec
    for depth, segment in enumerate(key.split(".")):
        if not dataclasses.is_dataclass(spec_type):
            return None  # below a free-form node (a factory's kwargs)
        hints = typing.get_type_hints(spec_type)
        if segment not in hints:
            where = ".".join(key.split(".")[:depth]) or "the top level"
            return (
                f"'{key}' is not a config key: {where} has no '{segment}'.{closest(segment, list(hints))} "
                f"The keys of {where} ({spec_type.__name__}) are {list(hints)}."
            )
        spec_type = hints[segment]
    return None


def group_options(group: str, config_dirs: list[Path]) -> list[str] | None:
    """The options of config group `group` (its YAML files) across config_dirs; None if no folder has it."""
    folders = [folder / group for folder in config_dirs if (folder / group).is_dir()]
    if not folders:
        return None
    return sorted({path.stem for folder in folders for path in folder.glob("*.yaml")})


def command_line_problems(argv: list[str], config_dirs: list[Path]) -> list[str]:
    """For the overrides on a command line: an option a config group does not have (`backend=fbgem`),
    with the group's options and a "did you mean", and a key the schema does not have (unknown_key_hint).
    Sweep values (`backend=fbgemm,qnnpack`) are checked one by one; `+`/`~` overrides, hydra's own keys and
    sweep functions (`choice(...)`) are left to Hydra. No config_dirs: nothing is checked."""
    if not config_dirs:
        return []
    problems = []
    for override in argv:
        if override.startswith("-") or "=" not in override:
            continue
        key, value = override.split("=", 1)
        if key.startswith(("+", "~", "hydra")) or "/" in key:
            continue
        options = group_options(key, config_dirs)
        if options is not None:
            if not re.fullmatch(r"[\w.\-]+(,[\w.\-]+)*", value):
                continue  # a sweep function, interpolation or quoting: Hydra parses it
            for choice in value.split(","):
                if choice not in options and choice != "null":
                    problems.append(
                        f"{key}={choice}: the config group '{key}' has no option '{choice}'.{closest(choice, options)}"
                        f" Its options are {options} (conf/{key}/*.yaml, or your --config-dir)."
                    )
            continue
        hint = unknown_key_hint(override)
        if hint is not None:
            problems.append(hint)
    return problems


def _reject_unknown_keys(node: Any, spec_type: type, prefix: str) -> None:
    hints = typing.get_type_hints(spec_type)
    for key in node:
        full_key = f"{prefix}{key}"
        if key not in hints:
            shown = node[key]
            shown = OmegaConf.to_container(shown) if OmegaConf.is_config(shown) else shown
            raise ConfigError(
                f"{full_key}={shown} names no config key.{closest(str(key), list(hints))} The keys here "
                f"({spec_type.__name__}) are {list(hints)}; `+key=value` cannot add others "
                f"(only a factory's kwargs take new keys)."
            )
        if OmegaConf.is_missing(node, key):
            continue
        value, hint = node[key], hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, DictConfig):
            _reject_unknown_keys(value, hint, f"{full_key}.")
        item_type = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(item_type) and isinstance(value, ListConfig):
            for position, item in enumerate(value):
                if isinstance(item, DictConfig):
                    _reject_unknown_keys(item, item_type, f"{full_key}[{position}].")
