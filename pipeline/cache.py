"""The calibration cache: calibrate once per (model, data, backend, base mapping, prepare config).

A prepared model cannot be pickled in torch 2.13, but its observers' buffers can: an entry is those
buffers plus a manifest, and a hit re-runs prepare_fx on the float model (whose weights are in the
key) and loads them, which gives a model identical to the calibrated one, per-channel observers
included (tests/test_cache.py proves it).

The key hashes only what changes calibration: the model's weights and code, the calibration data
itself, the calibrate settings, the backend, the base qconfig mapping, the custom prepare config, the
recovery options that act before calibration (activation bits and bounded-activation clamp as resolved
for this CPU, SmoothQuant's alpha), the engine and the torch version. The skip-list, bias correction,
evaluation and export settings are not in it, so a sweep over skip-lists calibrates once.

engine=pt2e skips at prepare time, so a skip-list's model has its own observers: the entry under the key
is the model calibrated without the skip-list, its observers keyed by the tensors they observe, and a
skip-list's model is filled from it when every one of its observers finds a source (stages/calibrate.py).
A skip-list whose model has an observer with no source is calibrated on its own, under `skip_list_key`.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.fx import GraphModule

from pipeline.batch import ModelInputs
from pipeline.digest import model_code as _model_code
from pipeline.digest import tensor_digest as _tensor_digest
from pipeline.engine import bias_correction, get_engine, recovery
from pipeline.engine.base import MissingObserverSource
from pipeline.progress import progress
from pipeline.schema import EngineSpec, PipelineSpec, SkipSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # bump when the entry layout or the meaning of the key changes
STATE_FILE = "observer_state.pt"
# bias correction's float statistics of the calibration (bias_correction.statistics_state), when it kept them
STATISTICS_FILE = "float_statistics.pt"
MANIFEST_FILE = "manifest.json"


def cache_key(spec: PipelineSpec, model: nn.Module, calibration_inputs: Iterable[ModelInputs | torch.Tensor]) -> str:
    """Every tensor of every calibration batch (name, dtype and shape included) is in the key: exactly what
    calibration sees, streamed (a lazy source is decoded batch by batch here, its evaluation part untouched)."""
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
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def skip_list_key(key: str, skip: SkipSpec) -> str:
    """The key of a pt2e skip-list calibrated on its own (its model has an observer the calibration without
    the skip-list cannot fill): `key` (everything else) plus the skip-list's entries, not its name."""
    entries = {k: v for k, v in _plain(skip).items() if k not in ("name", "strict")}  # type: ignore[union-attr]
    return hashlib.sha256(json.dumps([key, entries], sort_keys=True, default=str).encode()).hexdigest()[:24]


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
        """The calibrated model for `key`, or None on a miss or a bad entry (which is then removed).
        MissingObserverSource (pt2e) when the entry is sound but cannot fill every observer `prepare` makes."""
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
            statistics_path = entry / STATISTICS_FILE
            if statistics_path.exists() and manifest.get("statistics_sha256") == _file_sha256(statistics_path):
                statistics = torch.load(statistics_path, map_location="cpu", weights_only=True)
                bias_correction.restore_statistics(prepared, statistics)
        except MissingObserverSource:
            raise  # a sound entry that cannot serve this pt2e skip-list: the caller calibrates it on its own
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
            statistics = bias_correction.statistics_state(prepared)
            if statistics is not None:
                torch.save(statistics, temporary / STATISTICS_FILE)
            manifest = {
                "key": key,
                "format": FORMAT_VERSION,
                "torch": torch.__version__,
                "sha256": _file_sha256(state_path),
                **({"statistics_sha256": _file_sha256(temporary / STATISTICS_FILE)} if statistics is not None else {}),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **details,
            }
            (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
            for path in temporary.iterdir():
                with path.open("rb") as file:
                    os.fsync(file.fileno())
            _publish(temporary, self.entry(key))
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return self.entry(key)


def _publish(temporary: Path, entry: Path) -> None:
    """Rename a finished temporary folder into place; if another process stored the same key first, its
    entry is as good as ours and ours is dropped."""
    try:
        os.rename(temporary, entry)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Float outputs: computed once per (model, evaluation data), reused by every job of a sweep and every
# search trial. Stored next to the calibration entries, under <cache.dir>/float_outputs/<key>/: one
# file per evaluation batch (batch_<i>.pt, the float model's output tensor) plus a manifest, so a pass
# reads one batch at a time (memory stays bounded) and the metrics (accuracy, top-k, SQNR, agreement,
# cosine, custom) get exactly the tensors they would have computed. Size: samples x outputs x 4 bytes,
# e.g. 50,000 images x 1000 classes = 200 MB.

OUTPUTS_FORMAT = 1
OUTPUTS_FOLDER = "float_outputs"


def outputs_key(model: nn.Module, data_fingerprint: str) -> str:
    """The model's weights and code, the evaluation batches (their fingerprint: exactly which samples,
    how decoded, in which batches; see pipeline/batches.py) and the torch version. Metric settings are
    not in it: the entry holds outputs, from which every metric is computed."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        _tensor_digest(digest, value)
    digest.update(_model_code(model).encode())
    digest.update(json.dumps({"format": OUTPUTS_FORMAT, "torch": torch.__version__, "data": data_fingerprint}).encode())
    return digest.hexdigest()[:24]


class OutputCache:
    """Float outputs per evaluation batch on disk (see above); atomic like CalibrationCache."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory / OUTPUTS_FOLDER
        self.locks = CalibrationCache(self.directory)

    def entry(self, key: str) -> Path:
        return self.directory / key

    def lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        return self.locks.lock(key)

    def has(self, key: str, batches: int) -> bool:
        """An intact entry for `batches` batches (a bad one is removed)."""
        entry = self.entry(key)
        if not entry.exists():
            return False
        try:
            manifest = json.loads((entry / MANIFEST_FILE).read_text())
            if manifest.get("key") != key or manifest.get("batches") != batches:
                raise ValueError(f"manifest {manifest.get('key')} with {manifest.get('batches')} batches")
            missing = [i for i in range(batches) if not (entry / f"batch_{i:06d}.pt").is_file()]
            if missing:
                raise ValueError(f"batch files {missing[:3]} missing")
        except Exception as error:
            log.warning("cache: float outputs %s are corrupt (%s); removing them, evaluating float again", entry, error)
            shutil.rmtree(entry, ignore_errors=True)
            return False
        return True

    def ensure(self, key: str, model: nn.Module, batches: Any, stage: str = "evaluate") -> int:
        """Make sure the float outputs of `batches` (a BatchSource) are stored under `key`: 1 when this call
        computed them (a float evaluation), 0 when they were there. Parallel jobs wait on the key's lock,
        then hit. `stage`: who asks, in the log lines."""
        with self.lock(key):
            if self.has(key, len(batches)):
                log.info("%s: float outputs from the cache (%s): no float evaluation", stage, self.entry(key))
                return 0

            def outputs() -> Iterator[torch.Tensor]:
                with torch.no_grad():
                    for inputs, _ in progress(batches, len(batches), f"{stage} float (cached)", log):
                        yield inputs.call(model)

            size = self.store(key, outputs(), {"samples": batches.num_samples})
            log.info(
                "%s: float evaluation of %d samples cached as %s (%.1f MB)",
                stage,
                batches.num_samples,
                self.entry(key),
                size / 1e6,
            )
            return 1

    def read(self, key: str, position: int) -> torch.Tensor:
        return torch.load(self.entry(key) / f"batch_{position:06d}.pt", map_location="cpu", weights_only=True)

    def store(self, key: str, outputs: Iterator[torch.Tensor], details: dict[str, object]) -> int:
        """Write each output tensor of `outputs` as it comes (one batch in memory), then rename into place.
        Returns the bytes written."""
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.directory))
        try:
            count = 0
            size = 0
            for position, tensor in enumerate(outputs):
                path = temporary / f"batch_{position:06d}.pt"
                torch.save(tensor.detach().contiguous().clone(), path)
                size += path.stat().st_size
                count = position + 1
            manifest = {"key": key, "format": OUTPUTS_FORMAT, "torch": torch.__version__, "batches": count}
            manifest.update(bytes=size, created=time.strftime("%Y-%m-%dT%H:%M:%S"), **details)
            (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
            _publish(temporary, self.entry(key))
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return size
