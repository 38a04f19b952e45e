"""The one typed schema of a run's config, registered with Hydra's ConfigStore and validated once.

Each dataclass is a `*Spec` (never `*Config`, which would clash with torch's QConfig, BackendConfig,
PrepareCustomConfig...). OmegaConf rejects unknown keys and wrong types while composing; `validate`
then checks what types cannot say (names in closed sets, import paths, stage order) before any work.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

STAGES: tuple[str, ...] = ("load", "calibrate", "reference_convert", "lower", "evaluate", "export")
# A stage may run only if the stages it reads from run too.
STAGE_NEEDS: dict[str, tuple[str, ...]] = {
    "load": (),
    "calibrate": ("load",),
    "reference_convert": ("calibrate",),
    "lower": ("reference_convert",),
    "evaluate": ("load",),
    "export": ("lower",),
    "inspect": ("load",),
}
# Allowed in `stages` but not run by default: `inspect` lists names and what each mapping entry matches.
OPTIONAL_STAGES: tuple[str, ...] = ("inspect",)
ENGINES: tuple[str, ...] = ("fbgemm", "x86", "qnnpack", "onednn")
BACKEND_CONFIGS: tuple[str, ...] = ("native", "fbgemm", "x86", "qnnpack", "onednn")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is valid."""


def error_summary(error: BaseException, limit: int | None = 300) -> str:
    """`Type: first line of the message` for one-paragraph errors (an exception's message may be empty)."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:limit]}"


def closest(value: str, choices: list[str] | tuple[str, ...], n: int = 3) -> str:
    """'did you mean' text for error messages."""
    matches = difflib.get_close_matches(value, list(choices), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


@dataclass
class BackendSpec:
    engine: str = MISSING  # torch.backends.quantized.engine: fbgemm, x86, qnnpack, onednn
    backend_config: str = MISSING  # get_<name>_backend_config: native, fbgemm, x86, qnnpack, onednn
    default_qconfig: str = "backend_default"  # named qconfig the mapping's "default" resolves to


@dataclass
class ObjectTypeEntry:
    object_type: str = MISSING  # import path: torch.nn.Conv2d, torch.nn.functional.linear, operator.add
    qconfig: str | None = None


@dataclass
class ModuleNameRegexEntry:
    regex: str = MISSING
    qconfig: str | None = None


@dataclass
class ModuleNameEntry:
    module_name: str = MISSING
    qconfig: str | None = None


@dataclass
class ModuleNameObjectTypeOrderEntry:
    module_name: str = MISSING  # the parent module ("" for the top level)
    object_type: str = MISSING  # import path of the op called inside it
    index: int = MISSING  # which call of that op, counting from 0
    qconfig: str | None = None


@dataclass
class QConfigMappingSpec:
    """A QConfigMapping in YAML. Values are names from the qconfig library or null (= stay float)."""

    name: str = MISSING
    # backend_default: start from torch's get_default_qconfig_mapping(engine) (which also pins fixed-qparams
    # ops such as sigmoid); empty: start from an empty mapping.
    base: str = "backend_default"
    global_qconfig: str | None = "default"
    object_type: list[ObjectTypeEntry] = field(default_factory=list)
    module_name_regex: list[ModuleNameRegexEntry] = field(default_factory=list)
    module_name: list[ModuleNameEntry] = field(default_factory=list)
    module_name_object_type_order: list[ModuleNameObjectTypeOrderEntry] = field(default_factory=list)
    # true: convs / linears whose output feeds only ReLU6 / hardtanh observe the clipped range (found by
    # tracing the model at prepare time; each gets a module_name entry, explicit module_name entries win).
    clamp_bounded_activations: bool = False


@dataclass
class SkipSpec:
    """What stays float: entries set to None in the convert-time mapping only."""

    name: str = MISSING
    object_type: list[str] = field(default_factory=list)
    module_name_regex: list[str] = field(default_factory=list)
    module_name: list[str] = field(default_factory=list)
    module_name_object_type_order: list[ModuleNameObjectTypeOrderEntry] = field(default_factory=list)
    strict: bool = False  # an entry that matches nothing is an error instead of a warning


@dataclass
class CustomConfigSpec:
    """PrepareCustomConfig / ConvertCustomConfig as the dicts their from_dict methods take."""

    name: str = "none"
    prepare: dict[str, Any] = field(default_factory=dict)
    convert: dict[str, Any] = field(default_factory=dict)


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


@dataclass
class CalibrateSpec:
    max_batches: int | None = None  # null: every calibration batch


@dataclass
class LatencySpec:
    enabled: bool = True
    threads: int = 1  # torch.set_num_threads during latency runs
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 5
    repeats: int = 30
    forms: list[str] = field(default_factory=lambda: ["eager", "traced", "frozen"])


@dataclass
class EvaluateSpec:
    models: list[str] = field(default_factory=lambda: ["float", "reference", "lowered"])
    max_batches: int | None = None  # null: the whole evaluation part
    latency: LatencySpec = field(default_factory=LatencySpec)


@dataclass
class ExportSpec:
    torchscript: str = "trace"  # trace | script | none
    freeze: bool = True
    lite_interpreter: bool = True  # qnnpack only: a mobile .ptl file
    onnx: bool = True  # needs the [onnx] extra; skipped with a message when absent
    onnx_opset: int = 17


@dataclass
class SearchSpec:
    """Accuracy-aware skip search: the fastest model meeting a criterion, from one calibration."""

    strategy: str = "none"  # none | greedy
    criterion: str = "accuracy"  # accuracy (needs labels) | sqnr (output SQNR vs float; for unlabeled data)
    max_drop: float = 0.01  # accuracy criterion: the largest accepted drop below float
    drop_mode: str = "absolute"  # absolute (0.01 = one point) | relative (0.01 = 1% of float accuracy)
    min_sqnr_db: float = 30.0  # sqnr criterion: the lowest accepted output SQNR
    max_trials: int = 20  # conversions tried, the fully quantized one included
    requantize: bool = True  # after meeting the bar, try putting skipped layers back to int8


@dataclass
class DiagnoseSpec:
    """Per-layer numeric-suite report after `lower`: table, chart, plain-words diagnosis, suggested skip-list."""

    enabled: bool = True
    max_batches: int = 2  # evaluation batches fed through the numeric suite's loggers
    # The error "starts at the first layer" (a kernel or engine fault) when the first layer's cumulative
    # SQNR is below first_layer_db and no later op is more than later_margin_db worse.
    first_layer_db: float = 15.0
    later_margin_db: float = 6.0
    skip_below_db: float = 30.0  # suggested skip-list: layers whose own SQNR is below this ...
    max_skip: int = 3  # ... at most this many, worst first


@dataclass
class CacheSpec:
    enabled: bool = True
    dir: str = MISSING  # one folder per entry, named by its key; delete the folder to clear the cache


@dataclass
class TrackingSpec:
    enabled: bool = True
    tracking_uri: str = MISSING
    artifact_location: str | None = MISSING  # null: the tracking server's default (its artifact proxy)
    experiment_name: str = "fx-ptq"
    run_name: str | None = None


@dataclass
class PipelineSpec:
    backend: BackendSpec = MISSING
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
    cache: CacheSpec = MISSING
    stages: list[str] = field(default_factory=lambda: list(STAGES))
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


def skip_preset(name: str, config_sources: Any) -> SkipSpec | None:
    """conf/skip/<name>.yaml from the first config source that has it (Hydra's search order), as a SkipSpec."""
    import importlib.resources
    from pathlib import Path

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


def register() -> None:
    """Register the schema so config.yaml's defaults list can extend it (`- pipeline_schema`), and the
    `skip_label` resolver its run-folder names use."""
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineSpec)
    OmegaConf.register_new_resolver("skip_label", _skip_label_resolver, replace=True)
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


def validate(spec: PipelineSpec) -> None:
    """Checks that need more than a type: raise ConfigError before any work starts."""
    from pipeline import quantization  # torch import kept out of schema import time

    check_ranges(spec)
    _check_in("backend.engine", spec.backend.engine, ENGINES)
    import torch

    supported = [engine for engine in torch.backends.quantized.supported_engines if engine != "none"]
    if spec.backend.engine not in supported:
        raise ConfigError(
            f"backend.engine='{spec.backend.engine}' is not supported by this torch build on this CPU; "
            f"supported engines here are {supported}."
        )
    _check_in("backend.backend_config", spec.backend.backend_config, BACKEND_CONFIGS)
    _check_in("backend.default_qconfig", spec.backend.default_qconfig, tuple(quantization.QCONFIG_LIBRARY))
    for position, stage in enumerate(spec.stages):
        _check_in(f"stages[{position}]", stage, (*STAGES, *OPTIONAL_STAGES))
    if len(set(spec.stages)) != len(spec.stages):
        raise ConfigError(f"stages={list(spec.stages)} names a stage twice; list each stage once.")
    for stage in spec.stages:
        missing = [need for need in STAGE_NEEDS[stage] if need not in spec.stages]
        if missing:
            raise ConfigError(
                f"stages={list(spec.stages)} runs '{stage}' without {missing}, which it reads from. "
                f"Add them, or run a prefix of {list(STAGES)}."
            )
    if spec.export.torchscript not in ("trace", "script", "none"):
        raise ConfigError(
            f"export.torchscript='{spec.export.torchscript}' is not valid; use 'trace', 'script' or 'none'."
        )
    for position, form in enumerate(spec.evaluate.latency.forms):
        _check_in(f"evaluate.latency.forms[{position}]", form, ("eager", "traced", "frozen"))
    for position, model in enumerate(spec.evaluate.models):
        _check_in(f"evaluate.models[{position}]", model, ("float", "reference", "lowered"))
    _check_in("search.strategy", spec.search.strategy, ("none", "greedy"))
    _check_in("search.criterion", spec.search.criterion, ("accuracy", "sqnr"))
    _check_in("search.drop_mode", spec.search.drop_mode, ("absolute", "relative"))
    if spec.search.strategy != "none":
        blocker = quantization.numeric_suite_blocker(spec.custom_config)
        if blocker is not None:
            raise ConfigError(
                f"search.strategy='{spec.search.strategy}' ranks layers with torch's FX numeric suite, but {blocker}. "
                f"Use search.strategy=none and sweep skip-lists instead (python -m pipeline -m skip=...)."
            )
        if "calibrate" not in spec.stages:
            raise ConfigError(
                f"search.strategy='{spec.search.strategy}' needs the calibrate stage; stages={spec.stages}."
            )
        if spec.search.criterion == "accuracy" and not spec.model.trained:
            raise ConfigError(
                "search.criterion='accuracy' needs a trained model (model.trained=false means random weights); "
                "use search.criterion=sqnr with search.min_sqnr_db."
            )
    uri = spec.tracking.tracking_uri
    if spec.tracking.enabled and spec.tracking.artifact_location is None and not is_tracking_server(uri):
        raise ConfigError(
            f"tracking.artifact_location=null leaves artifacts to a tracking server, but tracking.tracking_uri='{uri}' "
            f"is not one (MLflow would write them to ./mlruns of whatever folder the run starts in). Give a folder "
            f"or a URI (tracking.artifact_location=outputs/mlartifacts, s3://bucket/mlflow), or an http(s) server."
        )
    for key, folders in (("model.python_path", spec.model.python_path), ("data.python_path", spec.data.python_path)):
        check_python_path(key, folders)
    # Names and import paths in the mappings and factories resolve now, not halfway through a run.
    quantization.check_specs(spec.backend, spec.qconfig_mapping, spec.skip)
    quantization.check_custom_config(spec.custom_config)
    from stages.load import resolve_factory  # imports the user's factory module: after the cheap checks

    resolve_factory(spec.model.factory, "model.factory", spec.model.python_path)
    resolve_factory(spec.data.factory, "data.factory", spec.data.python_path)


def check_python_path(key: str, folders: list[str]) -> None:
    """Every python_path entry is an existing folder (a typo would otherwise surface as a failed import)."""
    from pathlib import Path

    for position, folder in enumerate(folders):
        if not Path(folder).is_dir():
            raise ConfigError(
                f"{key}[{position}]='{folder}' is not a folder (it {path_status(folder)}; resolved against the "
                f"current directory {Path.cwd()}: {Path(folder).resolve()}); list the folders that hold "
                f"your .py files, e.g. {key}=[./my_project]."
            )


def _check_in(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}='{value}' is not valid; choose one of {list(valid)}.{closest(value, valid)}")


# --------------------------------------------------------------------------------------------------
# Ranges: every field of every *Spec has a valid range, checked before any work (issue 17). Pure
# checks: the standard library, and torch only for the installed exporter's opset range.

SEED_MAX = 2**64 - 1  # torch.manual_seed takes 0 .. 2**64 - 1
NAME_MAX_CHARS = 200  # names become folder names (skip.name, backend) and MLflow tags
NAME_MAX_BYTES, PATH_MAX_BYTES = 255, 4096  # Linux's NAME_MAX and PATH_MAX
MAX_BATCH_SIZE = 65536  # latency inputs are the evaluation data repeated to this size, in memory
MAX_LATENCY_RUNS = 100_000  # warm-up and timed runs per model, form and batch size
MAX_SQNR_DB = 100.0  # int8 layers give 35-45 dB; float32 rounding alone gives ~140 dB
# QDQ export of quantized models needs QuantizeLinear with an axis (per-channel weights): opset 13.
ONNX_MIN_QUANTIZED_OPSET = 13


def onnx_opsets() -> range:
    """The opsets the installed TorchScript ONNX exporter (the one export uses) writes for quantized models."""
    from torch.onnx import _constants

    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET)
    return range(max(ONNX_MIN_QUANTIZED_OPSET, _constants.ONNX_MIN_OPSET), high + 1)


def describe_path(path: str | Path) -> str:
    """What is at `path`, for error messages: 'a folder', 'an empty file', 'a zip archive', 'a text
    file (starts "# Title")', 'a legacy pickle', ... or 'missing'. Sniffs the first bytes only."""
    file = Path(path)
    try:
        if file.is_symlink() and not file.exists():
            return f"a broken symbolic link (to {os.readlink(file)})"
        if not file.exists():
            return "missing (nothing at that path)"
        if file.is_dir():
            return "a folder"
        if not file.is_file():
            return "a special file (a device, pipe or socket)"
        size = file.stat().st_size
        if size == 0:
            return "an empty file (0 bytes)"
        with file.open("rb") as handle:
            head = handle.read(512)
    except OSError as error:
        return f"unreadable ({error.strerror or type(error).__name__})"
    if head.startswith(b"PK\x03\x04"):
        return f"a zip archive of {size} bytes (torch.save's format)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"a legacy pickle of {size} bytes (pickle.dump, or torch.save without zip)"
    if head.startswith(b"\x93NUMPY"):
        return f"a NumPy .npy array of {size} bytes"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")):
        return f"an image of {size} bytes"
    if head.startswith(b"SQLite format 3\x00"):
        return f"an SQLite database of {size} bytes"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not just a multi-byte character cut by the 512-byte read
            return f"a binary file of {size} bytes"
        text = head[: error.start].decode("utf-8")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"a text file of {size} bytes (starts {first[:40]!r})"


def path_status(path: str | Path) -> str:
    """'does not exist', or 'is <what describe_path finds>': for messages `key='value' <status>; ...`."""
    what = describe_path(path)
    return "does not exist" if what.startswith("missing") else f"is {what}"


def is_torch_file(path: str | Path) -> bool:
    """torch.load can only read zip archives (torch.save) and legacy pickles."""
    return describe_path(path).startswith(("a zip archive", "a legacy pickle"))


def check_writable_folder(key: str, value: str) -> None:
    """`value` is a folder this process can create files in, or can be created: the nearest existing
    folder on its path takes a new subfolder (probed with a temporary one, removed at once; as root,
    os.access says yes even for /proc and read-only mounts)."""
    if not str(value).strip():
        raise ConfigError(f"{key}='{value}' is empty; give a folder, e.g. {key}=outputs.")
    _check_path_length(key, value)
    folder = Path(value)
    existing = folder
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        what = describe_path(existing)
        where = "is" if existing == folder else f"is below '{existing}', which is"
        raise ConfigError(f"{key}='{value}' {where} {what}, not a folder; give a folder that can hold new files.")
    try:
        probe = tempfile.mkdtemp(prefix=".write-check-", dir=existing)
        os.rmdir(probe)
    except OSError as error:
        shown = (
            "" if existing == folder else f" (it does not exist yet, and its nearest existing folder is '{existing}')"
        )
        raise ConfigError(
            f"{key}='{value}' is not writable{shown}: creating a folder there fails with "
            f"'{error.strerror or error}'. Give a folder you can write to, e.g. {key}=outputs."
        ) from None


def _check_path_length(key: str, value: str) -> None:
    """Checked before the path is looked at: the file system refuses (ENAMETOOLONG) even to look."""
    too_long = [part for part in Path(value).parts if len(part.encode()) > NAME_MAX_BYTES]
    if too_long or len(str(value).encode()) > PATH_MAX_BYTES:
        shown = f"{str(value)[:60]}..." if len(str(value)) > 60 else str(value)
        problem = f"a name of {len(too_long[0].encode())} bytes" if too_long else f"{len(str(value).encode())} bytes"
        raise ConfigError(
            f"{key}='{shown}' has {problem}; file systems allow {NAME_MAX_BYTES} bytes per name and "
            f"{PATH_MAX_BYTES} per path. Use a shorter path (the run folder's name also holds backend and skip.name)."
        )


def _check_name(key: str, value: str | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    text = str(value)
    if not text.strip():
        valid = "a name, or null" if optional else "a name"
        raise ConfigError(f"{key}='{text}' is empty; it needs {valid} (letters, digits, '-', '_', '.').")
    bad = sorted({char for char in text if char in "/\\" or not char.isprintable()})
    if bad or len(text) > NAME_MAX_CHARS:
        problem = f"contains {[*bad]}" if bad else f"is {len(text)} characters long"
        raise ConfigError(
            f"{key}='{text[:60]}{'...' if len(text) > 60 else ''}' {problem}; names appear in folder names and "
            f"MLflow tags, so use up to {NAME_MAX_CHARS} printable characters without '/' or '\\\\'."
        )


def _check_int(
    key: str, value: int | None, low: int, high: int | None = None, none_means: str = "", why: str = ""
) -> None:
    if value is None and none_means:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        valid = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}{why}"
        raise ConfigError(
            f"{key}={value} is out of range; use {valid}" + (f", or null ({none_means})." if none_means else ".")
        )


def _check_float(
    key: str, value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False, why: str = ""
) -> None:
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value} is out of range; use a number in {interval}{why}.")


def _check_list(key: str, values: list, *, empty_ok: bool = True, why: str = "") -> None:
    if not empty_ok and not values:
        raise ConfigError(f"{key}=[] is empty; {why}.")
    repeated = sorted({str(value) for value in values if list(values).count(value) > 1})
    if repeated:
        raise ConfigError(f"{key}={list(values)} lists {repeated} more than once; list each once.")


def check_ranges(spec: PipelineSpec) -> None:
    """Every field of every *Spec in its valid range (names, counts, thresholds, files and folders),
    raising a one-paragraph ConfigError that names the key, the value and what is valid."""
    stages = set(spec.stages)
    _check_list("stages", spec.stages, empty_ok=False, why=f"run at least 'load', e.g. stages={list(STAGES)}")
    _check_int("seed", spec.seed, 0, SEED_MAX)
    check_writable_folder("output_dir", spec.output_dir)
    # Names.
    for key, value in (
        ("backend.default_qconfig", spec.backend.default_qconfig),
        ("qconfig_mapping.name", spec.qconfig_mapping.name),
        ("skip.name", spec.skip.name),
        ("custom_config.name", spec.custom_config.name),
        ("model.name", spec.model.name),
        ("data.name", spec.data.name),
        ("tracking.experiment_name", spec.tracking.experiment_name),
    ):
        _check_name(key, value)
    _check_name("tracking.run_name", spec.tracking.run_name, optional=True)
    # Mappings and skip-lists: names and import paths are resolved by validate; here the plain values.
    _check_in("qconfig_mapping.base", spec.qconfig_mapping.base, ("backend_default", "empty"))
    for owner, entries in (
        ("qconfig_mapping", spec.qconfig_mapping.module_name_object_type_order),
        ("skip", spec.skip.module_name_object_type_order),
    ):
        for position, entry in enumerate(entries):
            _check_int(f"{owner}.module_name_object_type_order[{position}].index", entry.index, 0)
    mapping = spec.qconfig_mapping
    entries = [*mapping.object_type, *mapping.module_name_regex, *mapping.module_name]
    if mapping.global_qconfig is None and not any(
        e.qconfig for e in [*entries, *mapping.module_name_object_type_order]
    ):
        raise ConfigError(
            f"qconfig_mapping.global_qconfig=null and no entry of qconfig_mapping={mapping.name} names a qconfig, so "
            f"nothing would be quantized (the lower stage would fail after calibrating). Set "
            f"qconfig_mapping.global_qconfig=default, or list what to quantize, e.g. "
            f"qconfig_mapping.object_type=[{{object_type: torch.nn.Conv2d, qconfig: default}}]."
        )
    for key, pattern in [
        *(
            (f"qconfig_mapping.module_name_regex[{i}].regex", e.regex)
            for i, e in enumerate(spec.qconfig_mapping.module_name_regex)
        ),
        *((f"skip.module_name_regex[{i}]", pattern) for i, pattern in enumerate(spec.skip.module_name_regex)),
    ]:
        if not str(pattern).strip():
            raise ConfigError(
                f"{key}='{pattern}' is empty, and an empty regular expression matches every module; give a "
                f"pattern of module names (e.g. 'features\\.1[0-9]'), or remove the entry."
            )
    for owner, names in (
        ("qconfig_mapping.module_name", [entry.module_name for entry in spec.qconfig_mapping.module_name]),
        ("skip.module_name", spec.skip.module_name),
    ):
        for position, name in enumerate(names):
            if not str(name).strip():
                raise ConfigError(
                    f"{owner}[{position}]='{name}' is empty; give a module's full name (e.g. 'features.0'; "
                    f"stages=[load,inspect] lists them)."
                )
    # Model and data.
    if not str(spec.model.factory.get("_target_", "") or "").strip():
        raise ConfigError(
            f"model.factory={dict(spec.model.factory)} has no _target_; give the import path of a function "
            f"returning an nn.Module, e.g. model.factory._target_=stages.sources.digits.digits_cnn."
        )
    if not str(spec.data.factory.get("_target_", "") or "").strip():
        raise ConfigError(
            f"data.factory={dict(spec.data.factory)} has no _target_; give the import path of a function "
            f"returning a stages.types.DataBundle, e.g. data.factory._target_=stages.sources.digits.digits_data."
        )
    if spec.model.checkpoint is not None:
        checkpoint = spec.model.checkpoint
        if not str(checkpoint).strip() or not is_torch_file(checkpoint):
            status = path_status(checkpoint) if str(checkpoint).strip() else "is empty"
            raise ConfigError(
                f"model.checkpoint='{checkpoint}' {status} "
                f"(resolved: {Path(checkpoint).resolve()}); it must be a state_dict saved with "
                f"torch.save(model.state_dict(), path), or null for the factory's own weights."
            )
    # Calibrate, evaluate, export.
    _check_int("calibrate.max_batches", spec.calibrate.max_batches, 1, none_means="every calibration batch")
    _check_int("evaluate.max_batches", spec.evaluate.max_batches, 1, none_means="every evaluation batch")
    _check_list("evaluate.models", spec.evaluate.models)
    if "evaluate" in stages:
        produced = {"float"} | ({"reference"} if "reference_convert" in stages else set())
        produced |= {"lowered"} if "lower" in stages else set()
        if not produced & set(spec.evaluate.models):
            raise ConfigError(
                f"evaluate.models={list(spec.evaluate.models)} names no model that stages={list(spec.stages)} "
                f"produce ({sorted(produced)}), so evaluate would measure nothing; list one of them."
            )
    latency = spec.evaluate.latency
    if latency.enabled:
        cpus = os.cpu_count() or 1
        _check_int("evaluate.latency.threads", latency.threads, 1, cpus, why=f" (the {cpus} CPUs here)")
        _check_int("evaluate.latency.warmup", latency.warmup, 0, MAX_LATENCY_RUNS)
        _check_int("evaluate.latency.repeats", latency.repeats, 1, MAX_LATENCY_RUNS)
        _check_list(
            "evaluate.latency.batch_sizes",
            latency.batch_sizes,
            empty_ok=False,
            why=("list at least one batch size (e.g. [1, 32]), or set evaluate.latency.enabled=false"),
        )
        for position, size in enumerate(latency.batch_sizes):
            _check_int(f"evaluate.latency.batch_sizes[{position}]", size, 1, MAX_BATCH_SIZE)
        _check_list(
            "evaluate.latency.forms",
            latency.forms,
            empty_ok=False,
            why=("list at least one of eager, traced, frozen, or set evaluate.latency.enabled=false"),
        )
    if spec.export.onnx and "export" in stages:
        opsets = onnx_opsets()
        if isinstance(spec.export.onnx_opset, bool) or spec.export.onnx_opset not in opsets:
            raise ConfigError(
                f"export.onnx_opset={spec.export.onnx_opset} cannot be written for a quantized model by the "
                f"installed torch.onnx exporter; use {opsets.start} to {opsets.stop - 1} (quantized ops need "
                f"{ONNX_MIN_QUANTIZED_OPSET}), or export.onnx=false."
            )
    # Search.
    search = spec.search
    _check_int("search.max_trials", search.max_trials, 1)
    if search.drop_mode == "absolute":
        why = " (absolute: 0.01 accepts one point of accuracy below float; 1 would accept any model)"
    else:
        why = " (relative: 0.01 accepts 1% of float accuracy lost; 1 would accept any model)"
    _check_float("search.max_drop", search.max_drop, 0.0, 1.0, high_open=True, why=why)
    _check_float(
        "search.min_sqnr_db",
        search.min_sqnr_db,
        0.0,
        MAX_SQNR_DB,
        low_open=True,
        why=" dB (int8 layers typically give 35-45 dB; 0 dB is noise as loud as the signal)",
    )
    # Diagnose.
    diagnose = spec.diagnose
    _check_int("diagnose.max_batches", diagnose.max_batches, 1)
    _check_int("diagnose.max_skip", diagnose.max_skip, 1)
    for key in ("first_layer_db", "skip_below_db"):
        _check_float(f"diagnose.{key}", getattr(diagnose, key), -MAX_SQNR_DB, MAX_SQNR_DB, why=" dB")
    _check_float("diagnose.later_margin_db", diagnose.later_margin_db, 0.0, MAX_SQNR_DB, why=" dB")
    # Folders written to.
    if spec.cache.enabled and "calibrate" in stages:
        check_writable_folder("cache.dir", spec.cache.dir)
    tracking = spec.tracking
    if tracking.enabled:
        uri = str(tracking.tracking_uri)
        if not uri.strip():
            raise ConfigError(
                "tracking.tracking_uri='' is empty; give a store (sqlite:///outputs/mlflow.db, http://host:5000), "
                "or tracking=off."
            )
        if len(urlparse(uri).scheme) <= 1:  # a bare path (or a Windows drive): MLflow's deprecated file store
            raise ConfigError(
                f"tracking.tracking_uri='{uri}' is not a URI; give sqlite:///<file>.db (e.g. "
                f"sqlite:///outputs/mlflow.db), http(s)://<server>, or file:<folder> for MLflow's file store."
            )
        if uri.startswith("sqlite:///"):
            database = uri.removeprefix("sqlite:///")
            _check_path_length("tracking.tracking_uri", database)
            what = describe_path(database)
            if not what.startswith(("missing", "an empty file", "an SQLite database")):
                raise ConfigError(
                    f"tracking.tracking_uri='{uri}' points at {what}, not an SQLite database; give a new or "
                    f"existing .db file, e.g. tracking.tracking_uri=sqlite:///outputs/mlflow.db."
                )
            check_writable_folder("tracking.tracking_uri (its folder)", str(Path(database).parent))
        location = tracking.artifact_location
        if location is not None and len(urlparse(str(location)).scheme) <= 1:  # a local folder
            check_writable_folder("tracking.artifact_location", str(location))
