"""`python -m pipeline [overrides]`: compose the config, validate it once, run the stages."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pipeline import schema

log = logging.getLogger("pipeline")

schema.register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pipeline import runner  # heavy imports (torch, mlflow) after Hydra has parsed the command line

    # torch's own warnings go through logging, to the job log only (conf/hydra/job_logging/pipeline.yaml).
    logging.captureWarnings(True)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    log_file = run_dir / f"{hydra_cfg.job.name}.log"
    try:
        spec: schema.PipelineSpec = OmegaConf.to_object(cfg)  # type: ignore[assignment]
        schema.validate(spec)
    except schema.ConfigError as error:
        log.error("Invalid config: %s", error)
        log.debug("traceback", exc_info=True)
        sys.exit(2)
    except MissingMandatoryValue as error:  # a `???` key, e.g. data.factory.root of data=image_folder
        key = error.full_key
        log.error("Invalid config: %s is required (it is ??? in the config); set it, e.g. %s=<value>.", key, key)
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
    parent_run_id, job_tags = None, {}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        from pipeline.tracking import sweep_parent_run_id

        parent_run_id = sweep_parent_run_id(run_dir)
        overrides = list(hydra_cfg.overrides.task)
        job_tags = {"job_num": str(hydra_cfg.job.num), "overrides": " ".join(overrides)}
        job_tags.update({f"override.{o.split('=', 1)[0]}": o.split("=", 1)[1] for o in overrides if "=" in o})
    # SIGTERM (a scheduler, `kill`) ends the run like Ctrl-C: the MLflow run is marked KILLED.
    signal.signal(signal.SIGTERM, _interrupt)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        state = runner.run(spec, cfg, run_dir, log_file, parent_run_id, job_tags)
    except KeyboardInterrupt:
        log.error("Interrupted: the MLflow run is marked KILLED; what finished is in %s.", run_dir)
        raise
    except (schema.ConfigError, runner.StageFailed) as error:
        log.error("%s %s", "Invalid input:" if isinstance(error, schema.ConfigError) else "Failed:", error)
        log.debug("traceback", exc_info=True)
        if multirun:
            raise  # Hydra records this job as failed and runs the others
        sys.exit(2 if isinstance(error, schema.ConfigError) else 1)
    return state.metrics.get("eval/lowered/accuracy")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


if __name__ == "__main__":
    main()
