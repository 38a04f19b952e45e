"""A seeded fuzz of the whole config surface (issue 17), and the cases it found as named regression tests.

For every field of every *Spec in pipeline/schema.py, values of the wrong type, empty, zero, negative,
huge, a missing path, an unwritable path and a file of the wrong kind go through what
`python -m pipeline <key>=<value>` does before any work: Hydra's override parsing and merge, `from_config`
and `validate`. Each case must either be refused with one paragraph naming the key (ConfigError, or
Hydra's own type error at compose time), never another exception (which the CLI would print as a
traceback), or be accepted; a seeded sample of the accepted cases that change the numbers then runs
end to end with cheap settings and must give a lowered model whose output SQNR vs float is above a
floor, with every planned stage done. A handful of refused cases run through the CLI: exit 2, the key
on the console, no traceback.

The generator is seeded and bounded (FUZZ_SEED, FUZZ_PAIRS, FUZZ_RUNS in the environment change
them); a failure prints the overrides that reproduce it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import random
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from pipeline import checks, paths, registry, schema
from pipeline.errors import ConfigError
from pipeline.validation import validate
from tests.conftest import CONF_DIR, FAST, REPO_ROOT, compose_config, to_spec

SEED = int(os.environ.get("FUZZ_SEED", "17"))
PAIRS = int(os.environ.get("FUZZ_PAIRS", "140"))  # in-process cases: every field's values, then this many pairs
RUNS = int(os.environ.get("FUZZ_RUNS", "6"))  # accepted cases run end to end
CLI_CASES = 3  # refused cases also run through `python -m pipeline`
SQNR_FLOOR_DB = 20.0  # the default digits model gives ~40 dB; an uncalibrated one gave 1.2 dB

# Cheap settings for the end-to-end runs; dropped when the fuzzed key is in the same section, so a fuzzed
# evaluate.latency.warmup is checked (and run) with latency on.
CHEAP = {
    "diagnose.enabled": "false",
    "evaluate.latency.enabled": "false",
    "export.onnx": "false",
    "export.torchscript": "none",
    "tracking.enabled": "false",
    "cache.enabled": "false",
}
# Fields whose value changes the calibrated or lowered numbers: the end-to-end runs prefer these.
NUMERIC_PREFIXES = ("calibrate.", "seed", "search.", "backend.", "qconfig_mapping.", "stages", "evaluate.max_batches")
# A fuzzed key of these sections is checked and run with the section switched on.
SECTION_ON = {"search": ["search.enabled=true", "search.max_trials=3"]}
PATH_FIELDS = {"output_dir", "cache.dir", "model.checkpoint", "tracking.artifact_location"}


# --------------------------------------------------------------------------------------------------
# The fields of the schema and the values generated for each


@dataclass(frozen=True)
class Field:
    key: str
    kind: str  # int, float, bool, str, list[str], list[int], dict, entries (a list of dataclass entries)
    optional: bool
    entry_type: type | None = None


def schema_fields(spec_type: type = schema.PipelineSpec, prefix: str = "") -> list[Field]:
    """Every leaf of the schema, walked from the dataclasses (a field added later is fuzzed too)."""
    found = []
    for name, hint in typing.get_type_hints(spec_type).items():
        key = f"{prefix}{name}"
        args = typing.get_args(hint)
        optional = type(None) in args
        if optional:
            hint = next(arg for arg in args if arg is not type(None))
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            found += schema_fields(hint, f"{key}.")
        elif origin is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            found.append(Field(key, "entries", optional, typing.get_args(hint)[0]))
        elif origin is list:
            found.append(Field(key, f"list[{typing.get_args(hint)[0].__name__}]", optional))
        elif origin is dict:
            found.append(Field(key, "dict", optional))
        else:
            found.append(Field(key, hint.__name__, optional))
    return found


def _paths(tmp: Path) -> dict[str, str]:
    return {
        "missing": str(tmp / "no" / "such" / "thing.pt"),
        "unwritable": "/proc/x",
        "text_file": str(REPO_ROOT / "README.md"),
        "folder": str(tmp),
        "empty_file": str(tmp / "empty.pt"),
    }


def values_for(field: Field, tmp: Path) -> list[tuple[str, str]]:
    """(label, override value) pairs: wrong type, empty, zero, negative, huge, and paths where a path goes."""
    paths = _paths(tmp)
    if field.kind == "int":
        values = [("wrong_type", "abc"), ("fraction", "1.5"), ("empty", "''"), ("zero", "0"), ("negative", "-1")]
        values += [("one", "1"), ("huge", str(2**64)), ("large", "100000000")]
    elif field.kind == "float":
        values = [("wrong_type", "abc"), ("empty", "''"), ("zero", "0"), ("negative", "-1"), ("nan", "nan")]
        values += [("inf", "inf"), ("huge", "1e308"), ("one", "1")]
    elif field.kind == "bool":
        values = [("wrong_type", "maybe"), ("empty", "''"), ("number", "2")]
    elif field.kind == "str":
        values = [("empty", "''"), ("blank", "' '"), ("huge", "x" * 300), ("slash", "a/b"), ("number", "0")]
        values += [("unknown", "no_such_thing")]
        if field.key in PATH_FIELDS:
            values += [(label, f"'{path}'") for label, path in paths.items()]
        if field.key == "tracking.tracking_uri":
            values += [
                ("unwritable", "'sqlite:////proc/x/mlflow.db'"),
                ("text_file", f"'sqlite:///{paths['text_file']}'"),
            ]
            values += [("folder", f"'sqlite:///{paths['folder']}'")]
    elif field.kind == "list[str]":
        values = [("empty", "[]"), ("empty_item", "['']"), ("not_a_list", "abc"), ("number_item", "[1]")]
        values += [("repeated", "[a,a]"), ("unknown", "[no_such_thing]")]
        if field.key.endswith("python_path"):
            values += [(label, f"['{path}']") for label, path in paths.items()]
    elif field.kind == "list[int]":
        values = [("empty", "[]"), ("zero", "[0]"), ("negative", "[-1]"), ("huge", "[100000000]")]
        values += [("wrong_type", "[a]"), ("repeated", "[1,1]")]
    elif field.kind == "dict":
        values = [("empty", "{}"), ("empty_target", "{_target_: ''}"), ("unknown", "{_target_: no.such.thing}")]
        values += [("not_a_dict", "abc")]
    else:  # entries: one entry, each of its fields broken in turn
        values = [("not_a_list", "abc"), ("empty_entry", "[{}]")]
        good = {"module_name": "conv1", "object_type": "torch.nn.Conv2d", "index": "0", "regex": "conv.*"}
        for name in typing.get_type_hints(field.entry_type):
            fields = {key: good[key] for key in typing.get_type_hints(field.entry_type) if key in good}
            for label, broken in (("empty", "''"), ("negative", "-1"), ("wrong", "'(unclosed'")):
                entry = {**fields, name: broken}
                text = ", ".join(f"{key}: {value}" for key, value in entry.items())
                values.append((f"{name}_{label}", f"[{{{text}}}]"))
    if field.optional or field.kind in ("str", "list[str]", "list[int]", "dict"):
        values.append(("null", "null"))
    return values


@dataclass
class Case:
    overrides: list[str]  # key=value, the fuzzed ones
    keys: list[str]
    labels: list[str]

    def __str__(self) -> str:
        return " ".join(self.overrides)


def generate_cases(tmp: Path, seed: int = SEED, pairs: int = PAIRS) -> list[Case]:
    """Every field with each of its values (all of them: a field added to the schema is fuzzed too), then
    `pairs` seeded pairs of two fields."""
    rng = random.Random(seed)
    singles = [
        Case([f"{field.key}={value}"], [field.key], [label])
        for field in schema_fields()
        for label, value in values_for(field, tmp)
    ]
    cases = list(singles)
    while len(cases) < len(singles) + pairs:
        first, second = rng.sample(singles, 2)
        if first.keys[0] != second.keys[0]:
            cases.append(
                Case(first.overrides + second.overrides, first.keys + second.keys, first.labels + second.labels)
            )
    return cases


# --------------------------------------------------------------------------------------------------
# Composing a case as `python -m pipeline` would, fast: the defaults composed once, each case's
# key=value overrides parsed and applied by Hydra's own override code (what compose does for them).


class Composer:
    def __init__(self, base: list[str]) -> None:
        self.pickled = pickle.dumps(compose_config(base))  # unpickled per case: 7x faster than deepcopy
        self.parser = OverridesParser.create()

    def __call__(self, overrides: list[str]) -> DictConfig:
        cfg = pickle.loads(self.pickled)
        ConfigLoaderImpl._apply_overrides_to_config(self.parser.parse_overrides(overrides), cfg)
        return cfg


@dataclass
class Outcome:
    case: Case
    accepted: bool
    error: BaseException | None = None


def check_case(compose_case: Composer, case: Case, settings: list[str]) -> Outcome:
    """Compose + from_config + validate; a refusal must be a ConfigError (or Hydra's composition error)
    of one paragraph naming one of the fuzzed keys. Anything else fails the test with the case."""
    try:
        cfg = compose_case([*settings, *case.overrides])
    except Exception as error:  # Hydra's own refusal of a value's type (the CLI prints it, no traceback)
        assert type(error).__module__.startswith(("hydra", "omegaconf")), f"{case}: {type(error).__name__}: {error}"
        text = str(error) + str(getattr(error, "__cause__", ""))
        assert any(key.split(".")[-1] in text for key in case.keys), f"{case}: Hydra's error names no key: {text}"
        return Outcome(case, False, error)
    try:
        spec = schema.from_config(cfg)
        validate(spec)
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message.strip(), f"{case}: not one paragraph: {message}"
        assert any(key in message for key in case.keys), f"{case}: the error names none of {case.keys}: {message}"
        return Outcome(case, False, error)
    except Exception as error:
        pytest.fail(f"{case}: validation raised {type(error).__name__} (a traceback on the console): {error}")
    return Outcome(case, True)


def cheap_settings(case: Case) -> list[str]:
    sections = {key.rsplit(".", 1)[0] for key in case.keys}
    cheap = [f"{key}={value}" for key, value in CHEAP.items() if key.rsplit(".", 1)[0] not in sections]
    return cheap + [setting for section in sorted(sections) for setting in SECTION_ON.get(section, [])]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "empty.pt").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def composer(fuzz_dir: Path) -> Iterator[Composer]:
    yield Composer([f"output_dir={fuzz_dir / 'out'}", *FAST])


# --------------------------------------------------------------------------------------------------
# The fuzz test


@pytest.mark.slow
def test_fuzz_every_config_field_is_refused_cleanly_or_runs_to_a_sound_result(
    fuzz_dir: Path, composer: Composer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import runner

    # Relative values (cache.dir=a/b, output_dir=0) resolve against the working directory: never the checkout.
    monkeypatch.chdir(fuzz_dir)
    start = time.perf_counter()
    cases = generate_cases(fuzz_dir)
    outcomes = [check_case(composer, case, cheap_settings(case)) for case in cases]
    accepted = [outcome.case for outcome in outcomes if outcome.accepted]
    refused = [outcome for outcome in outcomes if not outcome.accepted]
    validated = time.perf_counter() - start
    assert len(cases) > PAIRS and refused and accepted

    # End to end: a seeded sample of the accepted cases that change the numbers, one per field first.
    rng = random.Random(SEED)
    numeric = [case for case in accepted if all(key.startswith(NUMERIC_PREFIXES) for key in case.keys)]
    by_key: dict[str, list[Case]] = {}
    for case in rng.sample(numeric, len(numeric)):
        by_key.setdefault(" ".join(case.keys), []).append(case)
    spread = [case for round_ in itertools.zip_longest(*by_key.values()) for case in round_ if case is not None]
    ran = []
    for number, case in enumerate(spread[:RUNS]):
        cfg = composer([*cheap_settings(case), *case.overrides])
        spec = schema.from_config(cfg)
        run_dir = fuzz_dir / f"run{number}"
        try:
            state = runner.run(spec, cfg, run_dir)
        except Exception as error:
            pytest.fail(f"{case}: validated, then the run failed: {type(error).__name__}: {error}")
        planned = [stage.NAME for stage in registry.plan(spec)]
        undone = [stage for stage in planned if f"stage/{stage}/seconds" not in state.metrics]
        assert not undone, f"{case}: FINISHED without running {undone}"
        sqnr = state.metrics.get("eval/lowered/sqnr_db")
        if "lower" in planned and "evaluate" in planned and "lowered" in spec.evaluate.models:
            assert sqnr is not None and sqnr >= SQNR_FLOOR_DB, f"{case}: lowered SQNR {sqnr} dB < {SQNR_FLOOR_DB}"
        ran.append(f"{case} ({f'{sqnr:.1f} dB' if sqnr is not None else 'no lowered SQNR: ' + ','.join(planned)})")

    # The console: a few refused cases through the CLI, started together.
    cli_cases = [outcome.case for outcome in rng.sample(refused, CLI_CASES)]
    processes = [
        _start_cli([f"output_dir={fuzz_dir / f'cli{n}'}", *cheap_settings(case), *case.overrides], fuzz_dir)
        for n, case in enumerate(cli_cases)
    ]
    for case, process in zip(cli_cases, processes, strict=True):
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 2, f"{case}: exit {process.returncode}\n{output}"
        assert "Traceback" not in output, f"{case}: a traceback on the console\n{output}"
        assert any(key.split(".")[-1] in output for key in case.keys), f"{case}: the console names no key\n{output}"
    print(
        f"\nfuzz: {len(cases)} cases ({len(refused)} refused, {len(accepted)} accepted) validated in {validated:.1f}s; "
        f"{len(ran)} run end to end, {CLI_CASES} through the CLI; {time.perf_counter() - start:.1f}s"
    )
    print("\n".join(["end to end:", *ran, "CLI:", *map(str, cli_cases)]))


def _start_cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


def test_every_schema_field_is_fuzzed(fuzz_dir: Path) -> None:
    fields = schema_fields()
    fuzzed = {key for case in generate_cases(fuzz_dir) for key in case.keys}
    assert {field.key for field in fields} <= fuzzed
    assert len(fields) > 60  # the walk reaches into every nested Spec


def test_the_fast_composer_matches_hydra_compose(fuzz_dir: Path, composer: Composer) -> None:
    """The fuzz applies overrides the way compose does; check it on a few shapes of value."""
    overrides = [
        "seed=3",
        "evaluate.latency.batch_sizes=[2,4]",
        "model.factory={_target_: x.y}",
        "tracking.run_name=null",
    ]
    base = [f"output_dir={fuzz_dir / 'out'}", *FAST]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        expected = compose(config_name="config", overrides=[*base, *overrides])
    assert composer(overrides) == expected


# --------------------------------------------------------------------------------------------------
# Named regressions: the cases the issue lists, then the ones the fuzz found


def _refused(overrides: list[str], tmp_path: Path) -> str:
    spec = to_spec(compose_config(overrides, output_dir=tmp_path))
    with pytest.raises(ConfigError) as error:
        validate(spec)
    message = str(error.value)
    assert "\n" not in message
    return message


def _accepted(overrides: list[str], tmp_path: Path) -> None:
    validate(to_spec(compose_config(overrides, output_dir=tmp_path)))


@pytest.mark.slow
def test_regression_unwritable_output_dir_is_one_paragraph_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "output_dir=/proc/x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "Traceback" not in output and "FileNotFoundError" not in output
    assert "output_dir='/proc/x' is not writable" in output
    assert len(output.strip().splitlines()) == 1, output
    assert "output_dir='/proc/x' is not writable" in _refused(["output_dir=/proc/x"], Path("/proc/x"))


def test_regression_empty_experiment_name_is_a_config_error(tmp_path: Path) -> None:
    assert "tracking.experiment_name='' is empty" in _refused(["tracking.experiment_name=''"], tmp_path)


def test_regression_zero_calibration_batches_is_refused_not_run_uncalibrated(tmp_path: Path) -> None:
    message = _refused(["calibrate.max_batches=0"], tmp_path)
    assert "calibrate.max_batches=0" in message and "null" in message
    _accepted(["calibrate.max_batches=1"], tmp_path)


def test_regression_negative_max_drop_is_refused(tmp_path: Path) -> None:
    message = _refused(["search=greedy", "search.max_drop=-1"], tmp_path)
    assert "search.max_drop=-1.0 is out of range; use a number in [0, 1)" in message
    assert "search.max_drop=1.0" in _refused(
        ["search=greedy", "search.drop_mode=relative", "search.max_drop=1"], tmp_path
    )
    _accepted(["search=greedy", "search.max_drop=0"], tmp_path)


def test_regression_an_opset_the_exporter_cannot_write_is_refused_at_start(tmp_path: Path) -> None:
    opsets = checks.onnx_opsets()
    message = _refused(["export.onnx_opset=3"], tmp_path)
    assert f"use {opsets.start} to {opsets.stop - 1}" in message
    _refused([f"export.onnx_opset={opsets.stop}"], tmp_path)
    _accepted(["export.onnx_opset=3", "export.onnx=false"], tmp_path)
    _accepted([f"export.onnx_opset={opsets.start}"], tmp_path)


@pytest.mark.slow
def test_regression_opsets_at_both_ends_of_the_range_export(run_pipeline) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime")
    opsets = checks.onnx_opsets()
    cheap = ["diagnose.enabled=false", "evaluate.latency.enabled=false", "export.torchscript=none", "tracking=off"]
    for opset in (opsets.start, opsets.stop - 1):
        _, state, _ = run_pipeline([*cheap, f"export.onnx_opset={opset}", "cache.enabled=false"])
        assert state.metrics["export/onnx/agreement"] > 0.9, opset


def test_regression_a_text_file_checkpoint_is_called_a_text_file(tmp_path: Path) -> None:
    message = _refused([f"model.checkpoint={REPO_ROOT / 'README.md'}"], tmp_path)
    assert "is a text file of" in message and "pickled" not in message
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "is an empty file" in _refused([f"model.checkpoint={tmp_path / 'empty.pt'}"], tmp_path)
    assert "is a folder" in _refused([f"model.checkpoint={tmp_path}"], tmp_path)
    assert "does not exist" in _refused([f"model.checkpoint={tmp_path / 'nope.pt'}"], tmp_path)


def test_regression_zero_warmup_is_valid_and_negative_names_the_range(tmp_path: Path) -> None:
    message = _refused(["evaluate.latency.warmup=-5"], tmp_path)
    assert "evaluate.latency.warmup=-5 is out of range; use an integer from 0 to" in message
    _accepted(["evaluate.latency.warmup=0"], tmp_path)


def test_describe_path_names_what_a_file_is(tmp_path: Path) -> None:
    import pickle

    import torch

    torch.save({"w": torch.zeros(1)}, tmp_path / "zip.pt")
    (tmp_path / "legacy.pkl").write_bytes(pickle.dumps({"w": 1}, protocol=2))
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    (tmp_path / "empty").write_bytes(b"")
    assert paths.describe_path(tmp_path / "zip.pt").startswith("a zip archive")
    assert paths.describe_path(tmp_path / "legacy.pkl").startswith("a legacy pickle")
    assert paths.describe_path(tmp_path / "binary.bin").startswith("a binary file of 256 bytes")
    assert paths.describe_path(tmp_path / "empty") == "an empty file (0 bytes)"
    assert paths.describe_path(tmp_path) == "a folder"
    assert paths.path_status(tmp_path / "nope") == "does not exist"
    assert paths.is_torch_file(tmp_path / "zip.pt") and not paths.is_torch_file(REPO_ROOT / "README.md")


# Found by the fuzz (seed 17) on main 6e530c3, beyond the list.


def test_regression_an_unknown_default_qconfig_names_backend_default_qconfig(tmp_path: Path) -> None:
    # It was reported as qconfig_mapping.global_qconfig='no_such_thing', a key the user never set.
    message = _refused(["backend.default_qconfig=no_such_thing"], tmp_path)
    assert message.startswith("backend.default_qconfig='no_such_thing' is not valid")


@pytest.mark.parametrize("key", ["output_dir", "cache.dir", "tracking.artifact_location"])
def test_regression_a_folder_name_too_long_for_the_file_system_is_a_config_error(tmp_path: Path, key: str) -> None:
    # OSError(ENAMETOOLONG) tracebacks: from Hydra's mkdir of the run folder, from the cache's mkdir after
    # loading, and (found in this change's first folder check) from Path.exists() itself.
    assert f"{key}='" in _refused([f"{key}={tmp_path / ('x' * 300)}"], tmp_path)


def test_regression_an_empty_skip_regex_is_refused_not_run_with_everything_float(tmp_path: Path) -> None:
    # '' matches every module: the run calibrated, then lower failed with nothing quantized.
    assert "skip.module_name_regex[0]='' is empty" in _refused(["skip.module_name_regex=['']"], tmp_path)
    assert "qconfig_mapping.module_name_regex[0].regex=''" in _refused(
        ["qconfig_mapping.module_name_regex=[{regex: ''}]"], tmp_path
    )


def test_regression_a_mapping_that_quantizes_nothing_is_refused_before_calibrating(tmp_path: Path) -> None:
    # global_qconfig=null with no entry: validated, calibrated, then NothingQuantizedError in lower (exit 1).
    message = _refused(["qconfig_mapping.global_qconfig=null"], tmp_path)
    assert "nothing would be quantized" in message
    _accepted(
        [
            "qconfig_mapping.global_qconfig=null",
            "qconfig_mapping.object_type=[{object_type: torch.nn.Linear, qconfig: default}]",
        ],
        tmp_path,
    )


def test_regression_a_tracking_uri_that_is_a_bare_path_is_refused(tmp_path: Path) -> None:
    # MLflow took it as a file store folder under whatever directory the run started in.
    assert "tracking.tracking_uri='no_such_thing' is not a URI" in _refused(
        ["tracking.tracking_uri=no_such_thing"], tmp_path
    )
    text_db = f"sqlite:///{REPO_ROOT / 'README.md'}"
    assert "points at a text file" in _refused([f"tracking.tracking_uri={text_db}"], tmp_path)


def test_regression_a_huge_thread_count_is_refused_before_it_reaches_torch(tmp_path: Path) -> None:
    # 100000000 segfaulted the process in libgomp during evaluate (no message, run left RUNNING);
    # 2**64 failed the evaluate stage with 'Overflow when unpacking long long'.
    for threads in ("100000000", str(2**64)):
        assert f"evaluate.latency.threads={threads} is out of range" in _refused(
            [f"evaluate.latency.threads={threads}"], tmp_path
        )
    _accepted(["evaluate.latency.threads=1"], tmp_path)
