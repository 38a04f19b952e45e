"""`python -m pipeline [overrides]`: compose the config, validate it once, run the stages."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline import metric_keys, schema
from pipeline.errors import ConfigError

log = logging.getLogger("pipeline")
# Exit code of a run whose search missed its bar (search.fail_on_miss=true): it finished, but the model
# it converted, evaluated and exported is the closest trial, not one that meets the bar.
SEARCH_MISSED_EXIT = 3

schema.register()


class JobExit(SystemExit):
    """An exit status the job chose (bad input 2, a failed stage 1, a signal 130/143), as opposed to
    Hydra refusing the command line before the job started."""


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pipeline import runner  # heavy imports (torch, mlflow) after Hydra has parsed the command line
    from pipeline.validation import validate

    # torch's own warnings go through logging, to the job log only (conf/hydra/job_logging/pipeline.yaml).
    logging.captureWarnings(True)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    log_file = run_dir / f"{hydra_cfg.job.name}.log"
    try:
        spec = schema.from_config(cfg)
        validate(spec)
    except ConfigError as error:
        log.error("Invalid config: %s", error)
        log.debug("traceback", exc_info=True)
        raise JobExit(2) from None
    log.info(
        "engine=%s backend=%s qconfig_mapping=%s skip=%s model=%s data=%s -> %s",
        spec.engine.name,
        spec.backend.engine,
        spec.qconfig_mapping.name,
        spec.skip.name,
        spec.model.name,
        spec.data.name,
        run_dir,
    )
    # The skip tag names what actually runs: a preset edited on the command line gets a label of its entries.
    preset = schema.skip_preset(hydra_cfg.runtime.choices.get("skip"), hydra_cfg.runtime.config_sources)
    parent_run_id, job_tags = None, {"skip": schema.skip_label(spec.skip, preset)}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        from pipeline.tracking.sweep import sweep_parent_run_id

        parent_run_id = sweep_parent_run_id(run_dir)
        overrides = list(hydra_cfg.overrides.task)
        job_tags |= {"job_num": str(hydra_cfg.job.num), "overrides": " ".join(overrides)}
        job_tags.update({f"override.{o.split('=', 1)[0]}": o.split("=", 1)[1] for o in overrides if "=" in o})
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        # SIGTERM (a scheduler, `kill`) ends the run like Ctrl-C: the MLflow run is marked KILLED.
        result = runner.run(spec, cfg, run_dir, log_file, parent_run_id, job_tags, register=not multirun)
    except KeyboardInterrupt as interrupt:
        reason = str(interrupt) or "SIGINT"
        log.error("Interrupted (%s): the MLflow run is marked KILLED; what finished is in %s.", reason, run_dir)
        if multirun:
            raise  # stops the sweep
        raise JobExit(143 if "SIGTERM" in reason else 130) from None  # the shell's 128 + signal number
    except (ConfigError, runner.StageFailed) as error:
        log.error("%s %s", "Invalid input:" if isinstance(error, ConfigError) else "Failed:", error)
        log.debug("traceback", exc_info=True)
        if multirun:
            raise  # Hydra records this job as failed and runs the others
        raise JobExit(2 if isinstance(error, ConfigError) else 1) from None
    log.info("%s", run_summary(spec, result, run_dir, multirun))
    if result.metrics.get(metric_keys.SEARCH_MET) == 0.0 and spec.search.fail_on_miss and not multirun:
        log.error(
            "search: no trial met the bar (see %s); the run finished with the closest trial. Exit code 3 "
            "(search.fail_on_miss=false exits 0).",
            run_dir / "search" / "trials.csv",
        )
        raise JobExit(SEARCH_MISSED_EXIT)
    return result.metrics.get(metric_keys.LOWERED_ACCURACY)


def run_summary(spec: schema.PipelineSpec, result: object, run_dir: Path, multirun: bool) -> str:
    """The closing summary of a run: its headline params and metrics, its folder, and how to open it in
    MLflow's UI (a sweep's own summary follows its last job)."""
    from pipeline.tracking import headline

    params = dict(result.params)  # type: ignore[attr-defined]
    metrics = headline.headline_metrics(result.metrics)  # type: ignore[attr-defined]
    links = []
    run_id, experiment_id = result.run_id, result.experiment_id  # type: ignore[attr-defined]
    if run_id and experiment_id:
        links.append(("this run", headline.run_url(spec.tracking.tracking_uri, experiment_id, run_id)))
        if not multirun:
            view = headline.experiment_url(spec.tracking.tracking_uri, experiment_id, headline.HEADLINE_VIEW)
            links.append(("all runs, headline columns", view))
    if result.registered:  # type: ignore[attr-defined]
        links.append(("registered as", result.registered))  # type: ignore[attr-defined]
    title = f"done: {schema.run_label(spec, params[metric_keys.HEADLINE_SKIP])}"
    uri = spec.tracking.tracking_uri if links else None
    header = [*params, *metrics]
    return headline.summary(title, header, [[*params.values(), *metrics.values()]], str(run_dir), uri, links)


def cli() -> None:
    """main(), with Hydra's own config errors exiting 2 like every other bad input (Hydra prints them
    and exits 1). A sweep keeps Hydra's status: 1 says some job failed, whatever the cause. An unknown
    group option or key on the command line is refused before Hydra sees it, with the valid ones and a
    "did you mean" (Hydra would say "Could not find 'backend/fbgem'", or advise `+` for a typo'd key)."""
    problems = schema.command_line_problems(sys.argv[1:], _config_dirs(sys.argv[1:]))
    if problems:
        for problem in problems:
            print(f"Invalid config: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except JobExit:
        raise
    except SystemExit as done:
        # Not the job's own exit: Hydra refusing the command line or a config file (unknown option, key
        # or value type) prints its message and exits 1.
        if done.code == 1:
            for hint in filter(None, map(schema.unknown_key_hint, sys.argv[1:])):
                print(hint, file=sys.stderr)
            if not {"-m", "--multirun"} & set(sys.argv[1:]):
                sys.exit(2)
        raise


def exit_now(code: object) -> None:
    """End the process as `sys.exit(code)` would, without the interpreter's teardown: threading's exit
    hooks and a join of the threads still working (MLflow's async logging, if any), the atexit handlers (MLflow ends its
    runs and flushes, logging flushes its files), flush stdout and stderr, then os._exit. Tearing down
    torch, MLflow, SQLAlchemy and ONNX module by module took 4.5-6 s after the last log line on the
    default run (issue 15: measured with an atexit probe; the handlers themselves took 0.05 s)."""
    import atexit
    import contextlib
    import os
    import threading

    # What the interpreter does first at exit: threading's own exit hooks (joblib's loky stops its executor
    # there; joining its manager thread before that waits forever), then join the non-daemon threads.
    threading._shutdown()
    atexit._run_exitfuncs()
    if code is None or isinstance(code, int):
        status = code or 0
    else:  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def _config_dirs(argv: list[str]) -> list[Path]:
    """The folders config groups come from: the shipped conf/, --config-dir (-cd) and hydra.searchpath."""
    folders = [Path(__file__).resolve().parent / "conf"]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            folders.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            folders.append(Path(arg.split("=", 1)[1]))
        elif arg.startswith("hydra.searchpath="):
            for entry in arg.split("=", 1)[1].strip("[]").split(","):
                if entry.startswith("file://"):
                    folders.append(Path(entry.removeprefix("file://")))
        elif arg.startswith("--config-path") or arg.startswith("-cp") or "pkg://" in arg:
            return []  # a config tree we do not read: leave the checks to Hydra
    return folders


if __name__ == "__main__":
    try:
        cli()
    except SystemExit as done:
        exit_now(done.code)
    except BaseException:
        raise  # an unexpected error: Python prints the traceback and exits as usual
    else:
        exit_now(0)
