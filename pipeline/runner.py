"""Runs the configured stages in order: progress, timing, each stage's outputs written to the run
directory (and logged to MLflow) as soon as it finishes, and a run status that says how it ended."""

from __future__ import annotations

import json
import logging
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.cache import CalibrationCache, cache_key
from pipeline.engine import custom_modules, get_engine
from pipeline.errors import ConfigError
from pipeline.schema import STAGES, PipelineSpec, SkipSpec, skip_yaml
from pipeline.tracking import Tracker, make_tracker, run_tags
from stages.calibrate import calibrate, prepare
from stages.diagnose import diagnose, write_outputs
from stages.evaluate import evaluate
from stages.export import export
from stages.inspect import inspect
from stages.load import load
from stages.lower import lower
from stages.reference_convert import reference_convert
from stages.search import SearchResult, Trial, search
from stages.types import Calibrated, Loaded, Lowered, ReferenceModel

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A stage raised; the message names the stage, the error and where the earlier outputs are."""

    def __init__(self, stage: str, run_dir: Path, error: BaseException) -> None:
        self.stage = stage
        super().__init__(
            f"stage '{stage}' failed: {type(error).__name__}: {error} Outputs of the stages before it are in "
            f"{run_dir}; the traceback is in {run_dir / 'error.txt'}."
        )

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # A joblib worker sends a failed job's exception back to the launcher by pickle; one that does
        # not unpickle makes joblib abort the sweep and kill the other jobs mid-run.
        return _rebuild_stage_failed, (self.stage, str(self))


def _rebuild_stage_failed(stage: str, message: str) -> StageFailed:
    error = StageFailed.__new__(StageFailed)
    RuntimeError.__init__(error, message)
    error.stage = stage
    return error


# The signal that asked this process to stop, once one has (see stop_on_signal).
_stop_signal: str | None = None


def stop_on_signal(signum: int, frame: object) -> None:
    """Handler for SIGTERM and SIGINT: stop the run like Ctrl-C (the MLflow run ends KILLED, nothing is
    cached). Raised at once and also remembered, because library code can swallow it (seen: a SIGTERM
    during prepare_fx's first trace, which lazily imports torch._inductor): the run then stops at the
    next check (before caching, and between stages) instead of finishing."""
    global _stop_signal
    _stop_signal = signal.Signals(signum).name
    raise KeyboardInterrupt(_stop_signal)


def _check_stop() -> None:
    if _stop_signal is not None:
        raise KeyboardInterrupt(_stop_signal)


@dataclass
class RunState:
    """What the stages have produced so far in this run."""

    loaded: Loaded | None = None
    calibrated: Calibrated | None = None
    reference: ReferenceModel | None = None
    lowered: Lowered | None = None
    skip: SkipSpec | None = None  # spec.skip, or the search's winner
    search: SearchResult | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


def _run_load(spec: PipelineSpec, state: RunState, out: Path, tracker: Tracker) -> dict[str, float]:
    state.loaded = load(spec.model, spec.data, spec.seed)
    data = state.loaded.data
    out.mkdir(parents=True, exist_ok=True)
    (out / "float_model.txt").write_text(str(state.loaded.model))
    _write_json(
        out / "data.json",
        {
            "name": data.name,
            "calibration_batches": len(data.calibration),
            "evaluation_batches": len(data.evaluation),
            "example_input_shapes": [list(t.shape) for t in data.example_inputs],
            "has_labels": data.has_labels,
        },
    )
    return {
        "data/calibration_samples": float(data.num_calibration_samples),
        "data/evaluation_samples": float(data.num_evaluation_samples),
        "model/parameters": float(sum(p.numel() for p in state.loaded.model.parameters())),
    }


def _calibrate_or_load(spec: PipelineSpec, loaded: Loaded) -> Calibrated:
    """Calibrate, or rebuild the calibrated model from the cache when its key has an entry."""
    if not spec.cache.enabled:
        return calibrate(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.calibrate)
    cache = CalibrationCache(Path(spec.cache.dir))
    batches = loaded.data.calibration[: spec.calibrate.max_batches]
    key = cache_key(spec, loaded.model, [inputs for inputs, _ in batches])
    with cache.lock(key):
        cached = cache.load(key, lambda: prepare(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config))
        if cached is not None:
            log.info("calibrate: cache hit %s (cache.dir=%s): no calibration batches run", key, spec.cache.dir)
            return Calibrated(cached, len(batches), sum(int(x.shape[0]) for x, _ in batches), True, key)
        calibrated = calibrate(loaded, spec.backend, spec.qconfig_mapping, spec.custom_config, spec.calibrate)
        _check_stop()  # a swallowed signal must not leave an entry that a later run trusts
        entry = cache.store(key, calibrated.model, {"batches": calibrated.num_batches, "backend": spec.backend.engine})
        log.info("calibrate: cached as %s", entry)
        calibrated.cache_key = key
        return calibrated


def _run_calibrate(spec: PipelineSpec, state: RunState, out: Path, tracker: Tracker) -> dict[str, float]:
    assert state.loaded is not None
    state.calibrated = _calibrate_or_load(spec, state.loaded)
    calibrated = state.calibrated
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepared_graph.py").write_text(calibrated.model.code)
    prepare_custom_config, _ = custom_modules.build_custom_configs(spec.custom_config)
    (out / "prepare_custom_config.yaml").write_text(custom_modules.custom_config_yaml(prepare_custom_config))
    # The observer state is what can be saved of a prepared model (the module itself cannot be pickled).
    torch.save(get_engine().observer_state(calibrated.model), out / "observer_state.pt")
    tracker.set_tags({"cache_key": calibrated.cache_key or "disabled", "cache_hit": str(calibrated.cache_hit).lower()})
    return {
        # Calibration passes this run made: 0 on a cache hit (a sweep or search sums them).
        "calibrate/calibrations": 0.0 if calibrated.cache_hit else 1.0,
        "cache/hit": float(calibrated.cache_hit),
        "calibrate/batches": float(calibrated.num_batches),
        "calibrate/samples": float(calibrated.num_samples),
    }


def _run_reference_convert(spec: PipelineSpec, state: RunState, out: Path, tracker: Tracker) -> dict[str, float]:
    assert state.calibrated is not None
    assert state.skip is not None
    state.reference = reference_convert(
        state.calibrated, spec.backend, spec.qconfig_mapping, state.skip, spec.custom_config
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference_graph.py").write_text(state.reference.model.code)
    _, convert_custom_config = custom_modules.build_custom_configs(spec.custom_config)
    (out / "convert_custom_config.yaml").write_text(custom_modules.custom_config_yaml(convert_custom_config))
    _write_json(out / "left_float.json", state.reference.left_float)
    return {"skip/left_float_nodes": float(len(state.reference.left_float))}


def _run_search(spec: PipelineSpec, state: RunState, out: Path, tracker: Tracker) -> dict[str, float]:
    assert state.loaded is not None and state.calibrated is not None

    def report_trial(trial: Trial) -> None:
        child = tracker.child(
            {"trial": str(trial.number), "skip.module_name": str(trial.skipped)},
            {**run_tags(spec), "skip": f"trial_{trial.number}", "search_trial": str(trial.number)},
            run_name=f"trial-{trial.number}",
        )
        child.log_metrics({**trial.metrics, "search/score": trial.score, "search/meets": float(trial.meets)})
        child.end("FINISHED")

    result = search(
        state.loaded,
        state.calibrated,
        spec.backend,
        spec.qconfig_mapping,
        spec.custom_config,
        spec.evaluate,
        spec.search,
        report_trial,
    )
    state.search = result
    state.skip = result.skip_spec()
    out.mkdir(parents=True, exist_ok=True)
    write_search_outputs(result, spec.search.criterion, out)
    tracker.set_tags({"skip": "searched", "search_winner_trial": str(result.winner.number)})
    return {
        "search/trials": float(len(result.trials)),
        "search/met": float(result.met),
        "search/bar": result.bar,
        "search/winner_trial": float(result.winner.number),
        "search/winner_score": result.winner.score,
        "search/winner_float_layers": float(len(result.winner.skipped)),
        "search/winner_latency_ms": result.winner.latency_ms,
    }


def write_search_outputs(result: SearchResult, criterion: str, out: Path) -> None:
    """Trial table, sensitivity table, the winning skip-list as conf/skip YAML, and a history plot."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "trials.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["trial", "float_layers", criterion, "meets_bar", "latency_ms", "skipped"])
        for trial in result.trials:
            writer.writerow(
                [
                    trial.number,
                    len(trial.skipped),
                    f"{trial.score:.6g}",
                    trial.meets,
                    f"{trial.latency_ms:.4f}",
                    " ".join(trial.skipped),
                ]
            )
    with (out / "sensitivity.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["module_name", "quantized_type", "own_output_sqnr_db"])
        for layer in result.sensitivity:
            writer.writerow([layer.module_name, layer.quantized_type, f"{layer.sqnr_db:.3f}"])
    header = (
        f"Found by search=greedy: trial {result.winner.number} of {len(result.trials)}, {criterion} "
        f"{result.winner.score:.4g} (bar {result.bar:.4g}){'' if result.met else ' - did NOT meet the bar'}.\n"
        f"Copy to conf/skip/searched.yaml and run with skip=searched.\n"
    )
    (out / "searched_skip.yaml").write_text(skip_yaml(result.skip_spec(), header))

    figure, axis = plt.subplots(figsize=(7, 4))
    numbers = [trial.number for trial in result.trials]
    axis.plot(numbers, [trial.score for trial in result.trials], color="0.6", zorder=1)
    for trial in result.trials:
        axis.scatter(trial.number, trial.score, color="tab:green" if trial.meets else "tab:red", zorder=2)
        axis.annotate(
            f"{len(trial.skipped)} fp32",
            (trial.number, trial.score),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    axis.axhline(result.bar, linestyle="--", color="tab:blue", label=f"bar {result.bar:.4g}")
    axis.scatter(
        [result.winner.number],
        [result.winner.score],
        s=200,
        facecolors="none",
        edgecolors="black",
        label=f"winner (trial {result.winner.number})",
    )
    axis.set_xlabel("trial")
    axis.set_ylabel(criterion)
    axis.set_title("skip search: green meets the bar, red misses; labels = layers left float")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "trials.png", dpi=100)
    plt.close(figure)


def _run_lower(spec: PipelineSpec, state: RunState, out: Path, tracker: Tracker) -> dict[str, float]:
    assert state.reference is not None and state.loaded is not None
    state.lowered = lower(state.reference, spec.backend, state.loaded.data.example_inputs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowered_graph.py").write_text(state.lowered.model.code)
    _write_json(out / "node_counts.json", state.lowered.node_counts)
    return {f"nodes/{kind}": float(count) for kind, count in state.lowered.node_counts.items()}


def _run_inspect(spec: PipelineSpec, state: RunState, out: Path, tracker: Tracker) -> dict[str, float]:
    assert state.loaded is not None and state.skip is not None
    report = inspect(state.loaded, spec.backend, spec.qconfig_mapping, state.skip, spec.custom_config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.txt").write_text(report)
    print(report, flush=True)  # the point of the stage: readable in the terminal, not only in the log
    return {}


def _run_diagnose(spec: PipelineSpec, state: RunState, out: Path, tracker: Tracker) -> dict[str, float]:
    assert state.loaded is not None and state.calibrated is not None and state.lowered is not None
    blocker = get_engine().numerics_blocker(spec.custom_config)
    if blocker is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "diagnosis.txt").write_text(f"Skipped: {blocker}.\n")
        log.warning("diagnose: skipped: %s (diagnose.enabled=false silences this).", blocker)
        return {"diagnose/skipped": 1.0}
    diagnosis = diagnose(state.loaded, state.calibrated, state.lowered, spec.diagnose)
    write_outputs(diagnosis, spec.diagnose, out)
    log.log(logging.WARNING if diagnosis.engine_problem else logging.INFO, "diagnose: %s", diagnosis.text)
    return {
        "diagnose/layers": float(len(diagnosis.layers)),
        "diagnose/worst_layer_sqnr_db": diagnosis.layers[0].own_sqnr_db if diagnosis.layers else float("nan"),
        "diagnose/first_layer_sqnr_db": diagnosis.first_layer_sqnr_db,
        "diagnose/engine_problem": float(diagnosis.engine_problem),
        "diagnose/suggested_skip": float(len(diagnosis.suggested.module_name)),
    }


def _run_evaluate(spec: PipelineSpec, state: RunState, out: Path, tracker: Tracker) -> dict[str, float]:
    assert state.loaded is not None
    candidates = {}
    if state.reference is not None:
        candidates["reference"] = state.reference.model
    if state.lowered is not None:
        candidates["lowered"] = state.lowered.model
    report = evaluate(state.loaded, candidates, spec.backend.engine, spec.evaluate)
    _write_json(out / "metrics.json", report.metrics)
    _write_json(out / "fastest_form.json", report.fastest_form)
    for key in ("accuracy", "sqnr_db", "agreement"):
        figures = {name: report.metrics.get(f"eval/{name}/{key}") for name in ("float", "reference", "lowered")}
        shown = ", ".join(f"{name} {value:.4g}" for name, value in figures.items() if value is not None)
        if shown:
            log.info("evaluate %s: %s", key, shown)
    for size in spec.evaluate.latency.batch_sizes:
        speedup = report.metrics.get(f"latency/speedup_b{size}")
        if speedup is not None:
            log.info(
                "latency batch %d: float %.3f ms (%s), lowered %.3f ms (%s), speedup %.2fx",
                size,
                report.metrics[f"latency/float/b{size}_ms"],
                report.fastest_form[f"float/b{size}"],
                report.metrics[f"latency/lowered/b{size}_ms"],
                report.fastest_form[f"lowered/b{size}"],
                speedup,
            )
    return report.metrics


def _run_export(spec: PipelineSpec, state: RunState, out: Path, tracker: Tracker) -> dict[str, float]:
    assert state.lowered is not None and state.loaded is not None
    bundle = export(state.lowered, state.loaded, spec.export, out)
    _write_json(out / "skipped.json", bundle.skipped)
    log.info("export: wrote %s", ", ".join(sorted(bundle.files)))
    return bundle.metrics


STAGE_RUNNERS = {
    "load": _run_load,
    "calibrate": _run_calibrate,
    "search": _run_search,
    "reference_convert": _run_reference_convert,
    "lower": _run_lower,
    "inspect": _run_inspect,
    "diagnose": _run_diagnose,
    "evaluate": _run_evaluate,
    "export": _run_export,
}


def warn_about_backend(spec: PipelineSpec) -> None:
    if spec.backend.engine == "onednn" and not torch.cpu._is_vnni_supported():
        log.warning(
            "backend=onednn on a CPU without VNNI: onednn's default qconfig uses full 8-bit activations, which "
            "these CPUs compute with possible overflow, so accuracy may drop (pytorch#103646); backend=x86 or "
            "fbgemm use 7-bit activations and are exact here."
        )


def planned_stages(spec: PipelineSpec) -> list[str]:
    """spec.stages in pipeline order, with `search` after calibrate when a search strategy is set,
    `inspect` after load when listed, and `diagnose` after lower when enabled."""
    stages = [stage for stage in STAGES if stage in spec.stages]
    if spec.search.strategy != "none":
        stages.insert(stages.index("calibrate") + 1, "search")
    if "inspect" in spec.stages:
        stages.insert(stages.index("load") + 1, "inspect")
    if spec.diagnose.enabled and "lower" in stages:
        stages.insert(stages.index("lower") + 1, "diagnose")
    return stages


def run(
    spec: PipelineSpec,
    resolved: DictConfig,
    run_dir: Path,
    log_file: Path | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> RunState:
    """Run spec.stages in pipeline order; on any failure the run ends FAILED (KILLED on Ctrl-C),
    with the error saved, and everything finished before it stays on disk and in MLflow."""
    global _stop_signal
    _stop_signal = None
    run_dir.mkdir(parents=True, exist_ok=True)
    warn_about_backend(spec)
    tracker = make_tracker(spec.tracking)
    # The store first: an unreachable one is a ConfigError before anything is written.
    tracker.start(
        OmegaConf.to_container(resolved, resolve=True),
        {**run_tags(spec), **(extra_tags or {})},
        parent_run_id=parent_run_id,
    )
    config_file = run_dir / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(resolved, resolve=True))
    tracker.log_artifacts(config_file)
    state = RunState(skip=spec.skip)
    stages = planned_stages(spec)
    current = None
    status = "FAILED"
    try:
        for position, stage in enumerate(stages, start=1):
            _check_stop()
            current = stage
            log.info("[%d/%d] %s ...", position, len(stages), stage)
            start = time.perf_counter()
            metrics = STAGE_RUNNERS[stage](spec, state, run_dir / stage, tracker)
            metrics[f"stage/{stage}/seconds"] = time.perf_counter() - start
            state.metrics.update(metrics)
            tracker.log_metrics(metrics)
            tracker.log_artifacts(run_dir / stage, stage)
            log.info("[%d/%d] %s done in %.2fs", position, len(stages), stage, metrics[f"stage/{stage}/seconds"])
        _check_stop()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as error:
        error_file = run_dir / "error.txt"
        error_file.write_text(f"stage: {current}\n{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
        tracker.set_tags({"failed_stage": str(current)})
        tracker.log_artifacts(error_file)
        if isinstance(error, ConfigError) or not isinstance(error, Exception):
            raise  # already names the config key; or SystemExit and friends
        raise StageFailed(str(current), run_dir, error) from error
    finally:
        _write_json(run_dir / "metrics.json", state.metrics)
        tracker.log_artifacts(run_dir / "metrics.json")
        if log_file is not None:
            tracker.log_artifacts(log_file)
        tracker.end(status)
    return state
