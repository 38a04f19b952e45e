"""The generic walker of the stage registry: for each planned stage, build its context, compute its
artifacts, let it write its files and metrics, time it, log it to tracking, and check for a stop
request between stages. It knows no stage by name: pipeline/registry.py declares them.

On any failure the run ends FAILED (KILLED on SIGTERM or Ctrl-C) with the error saved, and everything
finished before it stays in the run directory and in MLflow. The exception: a stage that declares
FAILURE_IS_FATAL = False (an analysis, stages/types.py) records its error and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import metric_keys, registry, schema
from pipeline.errors import ConfigError, error_summary
from pipeline.machine import machine_tags
from pipeline.schema import PipelineSpec
from pipeline.tracking import Tracker, make_tracker, run_tags
from pipeline.tracking import headline as headline_
from stages.types import StageContext, write_json

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


class StopRequest:
    """SIGTERM and SIGINT during a run stop it like Ctrl-C (the MLflow run ends KILLED, nothing is
    cached). The handler raises at once and also remembers the signal, because library code can swallow
    the exception (seen: a SIGTERM during prepare_fx's first trace, which lazily imports torch._inductor):
    the run then stops at the next check (before caching, and between stages) instead of finishing."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def handle(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        raise KeyboardInterrupt(self.signal_name)

    def check(self) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt(self.signal_name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle both signals for the run's duration (only the main thread can install handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self.handle) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@dataclass
class RunResult:
    """What a run produced: every stage's artifacts by name (stages/*.PRODUCES) and all metrics."""

    artifacts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # the headline params (metric_keys.HEADLINE_PARAMS)
    run_id: str | None = None  # the MLflow run (None: tracking off)
    experiment_id: str | None = None
    model_uri: str | None = None  # the int8 model logged to MLflow
    registered: str | None = None  # models:/<name>@<alias> when tracking.register registered it
    warnings: list[str] = field(default_factory=list)  # "<stage>: text", in order; also <run dir>/warnings.txt


def _warner(stage: ModuleType, result: RunResult) -> Callable[[str], None]:
    """A stage's ctx.warn: log at WARNING now, keep for the run's summary."""

    def warn(text: str) -> None:
        log.warning("%s: %s", stage.NAME, text)
        result.warnings.append(f"{stage.NAME}: {text}")

    return warn


def _summarize_warnings(warnings: list[str], run_dir: Path, tracker: Tracker) -> None:
    """The run's warnings once more at its end, in <run dir>/warnings.txt and as the `warnings` tag."""
    if not warnings:
        return
    path = run_dir / "warnings.txt"
    path.write_text("".join(f"- {text}\n" for text in warnings))
    tracker.log_artifacts(path)
    tracker.set_tags({"warnings": "; ".join(warnings)[:5000]})  # MLflow caps tag values at 8000 characters
    log.warning("the run has %d warning(s) (%s):\n%s", len(warnings), path, path.read_text().rstrip())


def _compute_and_write(stage: ModuleType, ctx: StageContext, result: RunResult) -> dict[str, float]:
    """The stage's artifacts (added to `result`) and the metrics its write() returns."""
    produced = stage.compute(ctx)
    result.artifacts.update(produced)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    return stage.write(produced, ctx)


def _compute_and_write_or_record(
    stage: ModuleType, ctx: StageContext, result: RunResult, stop: StopRequest
) -> dict[str, float]:
    """A stage whose failure is not fatal: its metrics plus `<stage>/failed` = 0, or, when it raises, a
    warning, `<stage>/error.txt` (message and traceback) and `<stage>/failed` = 1; the run goes on.
    A stop request (Ctrl-C, SIGTERM, also when library code swallowed it) still stops the run."""
    try:
        metrics = _compute_and_write(stage, ctx, result)
    except Exception as error:
        if stop.signal_name is not None:
            raise
        for artifact in stage.PRODUCES:  # nothing half-made reaches a later stage's USES
            result.artifacts.pop(artifact, None)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        error_file = ctx.out_dir / "error.txt"
        error_file.write_text(f"stage: {stage.NAME}\n{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
        log.warning(
            "%s failed (%s); it is an analysis the run does not need, so the run goes on. Traceback: %s",
            stage.NAME,
            error_summary(error),
            error_file,
        )
        return {metric_keys.stage_failed(stage.NAME): 1.0}
    return {**metrics, metric_keys.stage_failed(stage.NAME): 0.0}


def run(
    spec: PipelineSpec,
    resolved: DictConfig,
    run_dir: Path,
    log_file: Path | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    register: bool = True,
) -> RunResult:
    """Run the planned stages of a validated spec in registry order. The MLflow run is named by what
    distinguishes it (schema.run_label, with the `skip` tag of extra_tags as the skip-list's label); with
    tracking.register set and `register` (a sweep's job: False, the sweep registers its best), the
    exported model goes into the Model Registry."""
    stages = registry.plan(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The MLflow store opens on a worker thread while the first stages run (tracking/background.py).
    tracker = make_tracker(spec.tracking, background=True)
    tags = {**run_tags(spec), **(extra_tags or {})}
    result = RunResult(params=headline_.headline_params(spec, tags["skip"]))
    # The store first: an unreachable server is a ConfigError before anything is written.
    config = OmegaConf.to_container(resolved, resolve=True)
    tracker.start({**result.params, **config}, tags, parent_run_id, run_name=schema.run_label(spec, tags["skip"]))
    if parent_run_id is None:
        tracker.share_view(headline_.HEADLINE_VIEW)
    first = headline_.first_headline_metric(spec)
    if first is not None:
        tracker.log_metrics({first: float("nan")})  # a placeholder, replaced when evaluate measures it
    config_file = run_dir / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(resolved, resolve=True))
    tracker.log_artifacts(config_file)
    write_json(run_dir / "machine.json", machine_tags())  # which CPU ran it (also the run's cpu.* tags)
    tracker.log_artifacts(run_dir / "machine.json")

    def log_child_run(name: str, params: dict[str, str], tags: dict[str, str], metrics: dict[str, float]) -> None:
        child = tracker.child(
            {**result.params, metric_keys.HEADLINE_SKIP: name, **params}, {**run_tags(spec), **tags}, run_name=name
        )
        child.log_metrics({**headline_.headline_metrics(metrics), **metrics})
        child.end("FINISHED")

    logged_models: list[tuple[Callable[[], str | None], dict[str, str]]] = []

    def log_model(path: Path, engine: str, example: list[Any], output: Any, model_tags: dict[str, str]) -> None:
        """Queued: the tracker records the model while the stages after export run (register_logged_models)."""
        logged_models.append((tracker.log_model(path, engine, example, output), model_tags))

    def register_logged_models() -> None:
        """The logged model's URI (waiting for its logging) and, with tracking.register, its registration."""
        while logged_models:
            pending, model_tags = logged_models.pop(0)
            result.model_uri = pending()
            result.run_id = tracker.last_run_id
            if not register or result.model_uri is None or not spec.tracking.register:
                continue
            version_tags = {
                "engine": spec.engine.name,
                "backend": spec.backend.engine,
                "skip": result.params[metric_keys.HEADLINE_SKIP],
            }
            version_tags |= {
                "run": str(result.run_id),
                "metric": _metric_tag(headline_.headline_metrics(result.metrics)),
            }
            result.registered = tracker.register_model(result.model_uri, version_tags | model_tags)

    stop = StopRequest()
    failed_optional: list[str] = []  # stages whose failure is not fatal (FAILURE_IS_FATAL = False) that raised
    current, status = None, "FAILED"
    with stop.installed():
        try:
            for position, stage in enumerate(stages, start=1):
                stop.check()
                current = stage.NAME
                out = run_dir / stage.NAME  # made before write: a stage killed mid-compute leaves no folder
                ctx = StageContext(
                    spec,
                    out,
                    result.artifacts,
                    stop.check,
                    tracker.set_tags,
                    log_child_run,
                    _warner(stage, result),
                    tracker.log_dataset,
                    log_model,
                )
                measuring = registry.measures_time(stage, spec)
                if measuring:
                    tracker.synchronous()  # no tracking work beside latency measurements
                log.info("[%d/%d] %s ...", position, len(stages), stage.NAME)
                start = time.perf_counter()
                if registry.failure_is_fatal(stage):
                    metrics = _compute_and_write(stage, ctx, result)
                else:
                    metrics = _compute_and_write_or_record(stage, ctx, result, stop)
                    if metrics[metric_keys.stage_failed(stage.NAME)]:
                        failed_optional.append(stage.NAME)
                        tracker.set_tags({"failed_optional_stages": ",".join(failed_optional)})
                        result.warnings.append(f"{stage.NAME}: failed; see {out / 'error.txt'}")
                seconds = time.perf_counter() - start
                if measuring:
                    tracker.synchronous(False)  # queued again: the next stages work while it records
                metrics[metric_keys.stage_seconds(stage.NAME)] = seconds
                result.metrics.update(metrics)
                tracker.log_metrics({**headline_.headline_metrics(metrics), **metrics})
                tracker.log_artifacts(out, stage.NAME)
                log.info("[%d/%d] %s done in %.2fs", position, len(stages), stage.NAME, seconds)
            register_logged_models()
            stop.check()
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException as error:
            if stop.signal_name is not None:  # a swallowed signal broke library code (seen: a half-done import)
                status = "KILLED"
                raise KeyboardInterrupt(stop.signal_name) from error
            error_file = run_dir / "error.txt"
            error_file.write_text(f"stage: {current}\n{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
            tracker.set_tags({"failed_stage": str(current)})
            tracker.log_artifacts(error_file)
            if isinstance(error, ConfigError) or not isinstance(error, Exception):
                raise  # already names the config key; or SystemExit and friends
            raise StageFailed(str(current), run_dir, error) from error
        finally:
            _summarize_warnings(result.warnings, run_dir, tracker)
            write_json(run_dir / "metrics.json", result.metrics)
            tracker.log_artifacts(run_dir / "metrics.json")
            if log_file is not None:
                tracker.log_artifacts(log_file)
            tracker.end(status)
    result.run_id, result.experiment_id = tracker.last_run_id, tracker.experiment_id
    return result


def _metric_tag(headline: dict[str, float]) -> str:
    """The registered version's `metric` tag: its task metric (or SQNR) and the delta, in one line."""
    parts = [
        f"{key}={headline_.format_value(headline[key])}"
        for key in (metric_keys.HEADLINE_INT8_ACCURACY, metric_keys.HEADLINE_DELTA_POINTS, metric_keys.HEADLINE_SQNR_DB)
        if key in headline
    ]
    return ", ".join(parts) or "none"
