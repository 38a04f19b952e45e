"""`python -m pipeline [overrides]`: compose the config, validate it once, run the stages."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline import schema

log = logging.getLogger("pipeline")

schema.register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pipeline import runner  # heavy imports (torch, mlflow) after Hydra has parsed the command line

    # torch's own warnings go through logging: one readable line on the console, all in the job log.
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
    log.info(
        "backend=%s qconfig_mapping=%s skip=%s model=%s data=%s -> %s",
        spec.backend.engine,
        spec.qconfig_mapping.name,
        spec.skip.name,
        spec.model.name,
        spec.data.name,
        run_dir,
    )
    state = runner.run(spec, cfg, run_dir, log_file)
    return state.metrics.get("eval/lowered/accuracy")


if __name__ == "__main__":
    main()
