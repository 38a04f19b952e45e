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

schema.register()


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
        sys.exit(2)
    log.info(
        "backend=%s qconfig_mapping=%s skip=%s model=%s data=%s -> %s",
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
        result = runner.run(spec, cfg, run_dir, log_file, parent_run_id, job_tags)
    except KeyboardInterrupt as interrupt:
        reason = str(interrupt) or "SIGINT"
        log.error("Interrupted (%s): the MLflow run is marked KILLED; what finished is in %s.", reason, run_dir)
        if multirun:
            raise  # stops the sweep
        sys.exit(143 if "SIGTERM" in reason else 130)  # the shell's 128 + signal number
    except (ConfigError, runner.StageFailed) as error:
        log.error("%s %s", "Invalid input:" if isinstance(error, ConfigError) else "Failed:", error)
        log.debug("traceback", exc_info=True)
        if multirun:
            raise  # Hydra records this job as failed and runs the others
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    return result.metrics.get(metric_keys.LOWERED_ACCURACY)


def cli() -> None:
    """main(), with Hydra's own config errors exiting 2 like every other bad input (Hydra prints them
    and exits 1). A sweep keeps Hydra's status: 1 says some job failed, whatever the cause."""
    try:
        main()
    except SystemExit as done:
        # Hydra sets its config just before calling main(): unset, the exit is Hydra refusing the command
        # line or a config file (unknown option, key or value type).
        if done.code == 1 and not HydraConfig.initialized():
            for hint in filter(None, map(schema.unknown_key_hint, sys.argv[1:])):
                print(hint, file=sys.stderr)
            if not {"-m", "--multirun"} & set(sys.argv[1:]):
                sys.exit(2)
        raise


def exit_now(code: object) -> None:
    """End the process as `sys.exit(code)` would, without the interpreter's teardown: join the threads
    that are still working (MLflow's async logging, if any), run the atexit handlers (MLflow ends its
    runs and flushes, logging flushes its files), flush stdout and stderr, then os._exit. Tearing down
    torch, MLflow, SQLAlchemy and ONNX module by module took 4.5-6 s after the last log line on the
    default run (issue 15: measured with an atexit probe; the handlers themselves took 0.05 s)."""
    import atexit
    import contextlib
    import os
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
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


if __name__ == "__main__":
    try:
        cli()
    except SystemExit as done:
        exit_now(done.code)
    except BaseException:
        raise  # an unexpected error: Python prints the traceback and exits as usual
    else:
        exit_now(0)
