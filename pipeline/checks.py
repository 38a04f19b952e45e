"""Start-up checks of a spec that need nothing beyond it: closed sets, every field's valid range, and
the files and folders it names. pipeline.validation.validate runs `check` first, then the checks that
need the engine or a stage. Each failure is a one-paragraph ConfigError naming the key, the value and
what is valid."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import ConfigError, closest
from pipeline.metric_keys import EVALUATE_METRICS, SEARCH_CRITERIA
from pipeline.paths import describe_path, is_torch_file, path_status
from pipeline.schema import (
    BACKEND_CONFIGS,
    ENGINES,
    FLOWS,
    PipelineSpec,
    is_tracking_server,
)


def check(spec: PipelineSpec) -> None:
    """The checks that need more than a type but nothing beyond the spec (closed sets, ranges, stage
    order, paths): raise ConfigError. pipeline.validation.validate runs these first, then the checks
    that need the engine or a stage."""
    check_ranges(spec)
    _check_in("engine.name", spec.engine.name, FLOWS)
    _check_float("engine.min_compiled_sqnr_db", spec.engine.min_compiled_sqnr_db, 0.0, 200.0)
    _check_in("backend.engine", spec.backend.engine, ENGINES)
    if spec.engine.name == "pt2e":
        check_pt2e_stages(spec)
    _check_in("backend.backend_config", spec.backend.backend_config, BACKEND_CONFIGS)
    if spec.export.torchscript not in ("trace", "script", "none"):
        raise ConfigError(
            f"export.torchscript='{spec.export.torchscript}' is not valid; use 'trace', 'script' or 'none'."
        )
    _check_in("export.form", spec.export.form, ("auto", "frozen", "unfrozen"))
    for position, form in enumerate(spec.evaluate.latency.forms):
        _check_in(f"evaluate.latency.forms[{position}]", form, ("eager", "traced", "frozen"))
    for position, model in enumerate(spec.evaluate.models):
        _check_in(f"evaluate.models[{position}]", model, ("float", "reference", "lowered"))
    _check_in("search.strategy", spec.search.strategy, ("greedy",))
    for position, metric in enumerate(spec.evaluate.metrics):
        _check_in(f"evaluate.metrics[{position}]", metric, EVALUATE_METRICS)
    _check_in("search.criterion", spec.search.criterion, SEARCH_CRITERIA)
    _check_in("search.drop_mode", spec.search.drop_mode, ("absolute", "relative"))
    uri = spec.tracking.tracking_uri
    if spec.tracking.enabled and spec.tracking.artifact_location is None and not is_tracking_server(uri):
        raise ConfigError(
            f"tracking.artifact_location=null leaves artifacts to a tracking server, but tracking.tracking_uri='{uri}' "
            f"is not one (MLflow would write them to ./mlruns of whatever folder the run starts in). Give a folder "
            f"or a URI (tracking.artifact_location=outputs/mlartifacts, s3://bucket/mlflow), or an http(s) server."
        )
    for key, folders in (
        ("model.python_path", spec.model.python_path),
        ("data.python_path", spec.data.python_path),
        ("custom_config.python_path", spec.custom_config.python_path),
    ):
        check_python_path(key, folders)


def check_pt2e_stages(spec: PipelineSpec) -> None:
    """engine=pt2e runs without the stages built on FX-only machinery (convert-time skip-lists, FX node names)."""
    if spec.search.enabled or "search" in spec.stages:
        raise ConfigError(
            "search=greedy with engine=pt2e: the skip search converts one calibrated model with many skip-lists, "
            "and pt2e's skip-lists exist only at prepare time (each would need its own calibration). Use engine=fx "
            "for the search, or sweep skip-lists on pt2e: python -m pipeline -m engine=pt2e skip=none,first_last."
        )
    if spec.inspect.enabled or "inspect" in spec.stages:
        raise ConfigError(
            "inspect with engine=pt2e: the inspect stage lists FX node names and what FX mapping entries match; "
            "pt2e's names are torch.export's aten nodes. Run it with engine=fx (module names are the same)."
        )


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
MAX_LATENCY_BUDGET_S = 3600.0  # seconds of timing per model, form and batch size
MAX_TOP_K = 1000  # evaluate.top_k (capped at the number of outputs when measured)
MAX_SQNR_DB = 100.0  # int8 layers give 35-45 dB; float32 rounding alone gives ~140 dB
# QDQ export of quantized models needs QuantizeLinear with an axis (per-channel weights): opset 13.
ONNX_MIN_QUANTIZED_OPSET = 13


def onnx_opsets() -> range:
    """The opsets the installed TorchScript ONNX exporter (the one export uses) writes for quantized models."""
    from torch.onnx import _constants

    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET)
    return range(max(ONNX_MIN_QUANTIZED_OPSET, _constants.ONNX_MIN_OPSET), high + 1)


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


def _search_on(spec: PipelineSpec) -> set[str]:
    return {"search"} if spec.search.enabled else set()


def check_ranges(spec: PipelineSpec) -> None:
    """Every field of every *Spec in its valid range (names, counts, thresholds, files and folders),
    raising a one-paragraph ConfigError that names the key, the value and what is valid."""
    stages = set(spec.stages)
    _check_list("stages", spec.stages, empty_ok=False, why="run at least 'load', e.g. stages=[load,calibrate]")
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
    _check_name("tracking.register", spec.tracking.register, optional=True)
    _check_name("tracking.register_alias", spec.tracking.register_alias)
    if spec.tracking.register is not None and not spec.tracking.enabled:
        raise ConfigError(
            f"tracking.register='{spec.tracking.register}' needs MLflow, but tracking is off: register with "
            f"tracking=sqlite (the default) or a tracking server, or drop tracking.register."
        )
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
    _check_float("export.min_sqnr_db", spec.export.min_sqnr_db, -MAX_SQNR_DB, MAX_SQNR_DB, why=" dB")
    _check_float("export.min_agreement", spec.export.min_agreement, 0.0, 1.0, why=" (a fraction)")
    _check_int("export.target_batch_size", spec.export.target_batch_size, 1, MAX_BATCH_SIZE)
    _check_int("calibrate.max_batches", spec.calibrate.max_batches, 1, none_means="every calibration batch")
    _check_int("evaluate.max_batches", spec.evaluate.max_batches, 1, none_means="every evaluation batch")
    _check_int("evaluate.max_samples", spec.evaluate.max_samples, 1, none_means="every evaluation sample")
    _check_int("data.num_workers", spec.data.num_workers, 0)
    _check_list("evaluate.models", spec.evaluate.models)
    if "evaluate" in stages:
        produced = {"float"} | ({"reference"} if "reference_convert" in stages else set())
        produced |= {"lowered"} if "lower" in stages else set()
        if not produced & set(spec.evaluate.models):
            raise ConfigError(
                f"evaluate.models={list(spec.evaluate.models)} names no model that stages={list(spec.stages)} "
                f"produce ({sorted(produced)}), so evaluate would measure nothing; list one of them."
            )
    _check_list("evaluate.metrics", spec.evaluate.metrics, empty_ok=False, why="list at least one, e.g. [auto]")
    _check_int("evaluate.top_k", spec.evaluate.top_k, 1, MAX_TOP_K)
    custom_needed = [
        key
        for key, used in (
            ("evaluate.metrics lists custom", "custom" in spec.evaluate.metrics),
            ("search.criterion=custom", spec.search.criterion == "custom" and "search" in stages | _search_on(spec)),
        )
        if used
    ]
    if spec.evaluate.custom_metric is None and custom_needed:
        raise ConfigError(
            f"{' and '.join(custom_needed)}, but evaluate.custom_metric=null names no function; set it to "
            f"module.function, e.g. evaluate.custom_metric=my_metrics.recall_at_1 (a function "
            f"fn(float_outputs, int8_outputs, labels) -> float, in a folder of model.python_path)."
        )
    if spec.evaluate.custom_metric is not None and not str(spec.evaluate.custom_metric).strip():
        raise ConfigError(
            "evaluate.custom_metric='' is empty; give module.function (e.g. my_metrics.recall_at_1), or null."
        )
    latency = spec.evaluate.latency
    if latency.enabled:
        cpus = os.cpu_count() or 1
        _check_int("evaluate.latency.threads", latency.threads, 1, cpus, why=f" (the {cpus} CPUs here)")
        _check_int("evaluate.latency.warmup", latency.warmup, 0, MAX_LATENCY_RUNS)
        _check_int("evaluate.latency.repeats", latency.repeats, 1, MAX_LATENCY_RUNS)
        _check_float("evaluate.latency.target_ci", latency.target_ci, 0.001, 1.0, why=" (a fraction of the median)")
        _check_float("evaluate.latency.budget_s", latency.budget_s, 0.01, MAX_LATENCY_BUDGET_S, why=" seconds")
        _check_list(
            "evaluate.latency.batch_sizes",
            latency.batch_sizes,
            empty_ok=False,
            why=("list at least one batch size (e.g. [1, 8]), or set evaluate.latency.enabled=false"),
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
    _check_int("search.max_trials", search.max_trials, 1, none_means="2*ceil(log2(layers))+4")
    _check_float("search.latency_tie", search.latency_tie, 0.0, 1.0, why=" (a share of the faster latency)")
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
    _check_float(
        "search.min_cosine",
        search.min_cosine,
        -1.0,
        1.0,
        low_open=True,
        why=" (the mean cosine similarity of outputs against float; 1 = identical, int8 layers give ~0.99)",
    )
    if not math.isfinite(search.min_value):
        raise ConfigError(
            f"search.min_value={search.min_value} is not a finite number; give the lowest accepted value of "
            f"evaluate.custom_metric (the custom criterion's bar)."
        )

    # Recovery.
    recovery = spec.recovery
    _check_in("recovery.activation_bits", str(recovery.activation_bits), ("auto", "7", "8"))
    _check_in("recovery.bounded_activations", recovery.bounded_activations, ("auto", "on", "off"))
    _check_int("recovery.bias_correction_samples", recovery.bias_correction_samples, 1)
    _check_in("recovery.bias_correction_method", recovery.bias_correction_method, ("auto", "empirical", "analytic"))
    _check_float(
        "recovery.smoothquant_alpha",
        recovery.smoothquant_alpha,
        0.0,
        1.0,
        why=" (0 turns SmoothQuant off; 0.5 moves half the activation range, in log scale, into the weights)",
    )
    # Diagnose.
    diagnose = spec.diagnose
    _check_int("diagnose.max_batches", diagnose.max_batches, 1)
    _check_int("diagnose.max_skip", diagnose.max_skip, 1)
    for key in ("kernel_db", "skip_below_db"):
        _check_float(f"diagnose.{key}", getattr(diagnose, key), -MAX_SQNR_DB, MAX_SQNR_DB, why=" dB")
    _check_float("diagnose.min_gain_db", diagnose.min_gain_db, 0.0, MAX_SQNR_DB, why=" dB")
    _check_float("diagnose.wide_range_ratio", diagnose.wide_range_ratio, 1.0, 1e6, low_open=True, why=" (x the clip)")
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
