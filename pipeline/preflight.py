"""Checks Hydra needs before it creates the run folder: Hydra makes `hydra.run.dir` (under output_dir)
before the app runs, so an unwritable output_dir would otherwise end in Hydra's FileNotFoundError
tracebacks. Registered in conf/config.yaml's hydra.callbacks; a bad folder exits 2 with one paragraph."""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.checks import check_writable_folder
from pipeline.errors import ConfigError


def check_folders(config: DictConfig, folder_key: str) -> None:
    """output_dir, then the folder Hydra is about to create (`hydra.run.dir` or `hydra.sweep.dir`)."""
    check_writable_folder("output_dir", str(config.output_dir))
    check_writable_folder(folder_key, str(OmegaConf.select(config, folder_key)))


class FolderCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_error(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_error(config, "hydra.sweep.dir")


def _exit_on_error(config: DictConfig, folder_key: str) -> None:
    try:
        check_folders(config, folder_key)
    except ConfigError as error:
        print(f"Invalid config: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
