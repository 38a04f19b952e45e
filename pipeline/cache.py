"""The calibration cache: calibrate once per (model, data, backend, base mapping, prepare config).

A prepared model cannot be pickled in torch 2.13, but its observers' buffers can: an entry is those
buffers plus a manifest, and a hit re-runs prepare_fx on the float model (whose weights are in the
key) and loads them, which gives a model identical to the calibrated one, per-channel observers
included (tests/test_cache.py proves it).

The key hashes only what changes calibration: the model's weights and code, the calibration data
itself, the calibrate settings, the backend, the base qconfig mapping, the custom prepare config, the
recovery options that act before calibration (activation bits and bounded-activation clamp as resolved
for this CPU, SmoothQuant's alpha) and the torch version. The skip-list, bias correction, evaluation
and export settings are not in it, so a sweep over skip-lists calibrates once.

Writes are atomic: the entry is built in a temporary folder and renamed into place, so a killed run
never leaves a half-written entry under a key. An entry that fails any check (manifest, checksum,
load) is reported, deleted and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.fx import GraphModule

from pipeline.batch import ModelInputs
from pipeline.digest import model_code as _model_code
from pipeline.digest import tensor_digest as _tensor_digest
from pipeline.engine import get_engine, recovery
from pipeline.schema import EngineSpec, PipelineSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the entry layout or the meaning of the key changes
STATE_FILE = "observer_state.pt"
MANIFEST_FILE = "manifest.json"


def cache_key(spec: PipelineSpec, model: nn.Module, calibration_inputs: list[ModelInputs | torch.Tensor]) -> str:
    """Every tensor of every calibration batch (name, dtype and shape included) is in the key."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        _tensor_digest(digest, value)
    digest.update(_model_code(model).encode())
    for inputs in calibration_inputs:
        for name, tensor in ModelInputs.wrap(inputs).named():
            digest.update(name.encode())
            _tensor_digest(digest, tensor)
    settings = {
        "format": FORMAT_VERSION,
        "torch": torch.__version__,
        "model_factory": _plain(spec.model.factory),
        "calibrate": asdict(spec.calibrate),
        "backend": asdict(spec.backend),
        "qconfig_mapping": _plain(spec.qconfig_mapping),
        "custom_prepare": _plain(spec.custom_config.prepare),
        # recovery options that act before or during calibration, auto choices resolved for this CPU
        # (bias correction acts after it, at reference convert, and is not here)
        "recovery": {
            "activation_bits": recovery.activation_bits(spec.recovery, spec.backend.engine),
            "clamp_bounded": recovery.clamps_bounded(spec.recovery, spec.backend.engine),
            "smoothquant_alpha": spec.recovery.smoothquant_alpha,
        },
        # Which flow calibrated (fx and pt2e observers differ), and its settings.
        "engine": asdict(spec.engine),
    }
    if spec.engine.name == "pt2e":  # pt2e's skip-lists apply at prepare time: each is its own calibration
        settings["skip"] = {k: v for k, v in _plain(spec.skip).items() if k not in ("name", "strict")}  # type: ignore[union-attr]
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def _plain(value: object) -> object:
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)  # type: ignore[arg-type]
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)  # type: ignore[arg-type]
    return value


class CalibrationCache:
    def __init__(self, directory: Path, flow: EngineSpec | None = None) -> None:
        self.directory = directory
        self.flow = flow or EngineSpec()  # the engine whose observer state the entries hold

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the key's lock while looking up and calibrating, so parallel sweep jobs that share a
        key calibrate once: the others wait, then hit. flock is released if the holder dies."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / f".{key}.lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                # The runner writes only under this lock, so a temporary folder of this key seen now
                # is what a hard-killed writer (SIGKILL, power cut) left: never read, only in the way.
                for leftover in self.directory.glob(f".tmp-{key}-*"):
                    log.warning("calibrate: removing %s, left by a run killed while writing the cache", leftover)
                    shutil.rmtree(leftover, ignore_errors=True)
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def entry(self, key: str) -> Path:
        return self.directory / key

    def load(self, key: str, prepare: Callable[[], GraphModule]) -> GraphModule | None:
        """The calibrated model for `key`, or None on a miss or a bad entry (which is then removed)."""
        entry = self.entry(key)
        if not entry.exists():
            return None
        try:
            manifest = json.loads((entry / MANIFEST_FILE).read_text())
            problems = []
            if manifest.get("key") != key:
                problems.append(f"manifest key {manifest.get('key')!r}")
            if manifest.get("format") != FORMAT_VERSION or manifest.get("torch") != torch.__version__:
                problems.append(f"format {manifest.get('format')} / torch {manifest.get('torch')}")
            state_path = entry / STATE_FILE
            if manifest.get("sha256") != _file_sha256(state_path):
                problems.append("checksum of observer_state.pt")
            if problems:
                raise ValueError("mismatched " + ", ".join(problems))
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            prepared = prepare()
            get_engine(self.flow).load_observer_state(prepared, state)
        except Exception as error:  # any failure means: do not trust it, rebuild it
            log.warning(
                "cache: entry %s is corrupt or incompatible (%s: %s); removing it and calibrating again",
                entry,
                type(error).__name__,
                error,
            )
            shutil.rmtree(entry, ignore_errors=True)
            return None
        return prepared

    def store(self, key: str, prepared: GraphModule, details: dict[str, object]) -> Path:
        """Write the entry atomically: build it in a temporary folder, then rename it into place."""
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.directory))
        try:
            state_path = temporary / STATE_FILE
            torch.save(get_engine(self.flow).observer_state(prepared), state_path)
            manifest = {
                "key": key,
                "format": FORMAT_VERSION,
                "torch": torch.__version__,
                "sha256": _file_sha256(state_path),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **details,
            }
            (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
            for path in temporary.iterdir():
                with path.open("rb") as file:
                    os.fsync(file.fileno())
            try:
                os.rename(temporary, self.entry(key))
            except OSError:
                # Another process stored the same key first; its entry is as good as ours.
                shutil.rmtree(temporary, ignore_errors=True)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return self.entry(key)


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
