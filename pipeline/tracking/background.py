"""A Tracker that opens its MLflow run on a worker thread while the stages start, and makes the store
calls that return nothing there too, in order.

Why: importing mlflow and SQLAlchemy and opening the store (a new one runs MLflow's migrations) took
4-7 s before the first stage on the default run (issue 15), all of it time the stages could use.
The calls a run makes before its first stage (start, share_view, a placeholder metric, config.yaml)
return nothing the runner needs, so they go to one worker thread, in the order made; so do log_metrics,
log_artifacts, set_tags, log_params and log_dataset. Metrics, params and tags wait in one batch that the
worker sends as one store call (MlflowTracker.log_batch) at most every FLUSH_SECONDS, or at once when a
call needs what was logged (anything that waits, synchronous(), end()): each store call costs the worker
tens of milliseconds of SQLAlchemy and a SQLite commit (measured on the digits run: five log_batch calls
0.22 s), CPU that a short run's stages share with it. The calls that return something (run_id,
experiment_id, child, children, log_model, register_model) and end() wait for what is queued before
them. Every store call runs on the one worker thread, so the MLflow client is never used from two
threads at once; child() returns a tracker on the same thread, so a search's trial runs are ordered
with their parent's calls.

Errors: a server that does not answer is still refused before anything is written (start checks it
on the calling thread: pipeline.tracking.base.require_server). Any other error of a queued call is
raised by the next call made on the tracker (opening the store as a ConfigError naming the store);
once raised, the tracker records nothing more, and end() does not raise it again.

Import this module only with tracking on; it imports mlflow on its worker thread, not here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import ConfigError
from pipeline.schema import TrackingSpec
from pipeline.tracking.ast_guard import serialize_ast_parse
from pipeline.tracking.base import RunRecord, Tracker, require_server

log = logging.getLogger(__name__)
T = TypeVar("T")
FLUSH_SECONDS = 2.0  # the longest a logged metric, param or tag waits before the worker sends it


class _Queue:
    """The one worker thread of a run and its children, and the first error of a queued call."""

    def __init__(self) -> None:
        serialize_ast_parse()  # the worker's imports parse text while the stages script models
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracking")
        self.error: BaseException | None = None
        self.delivered = False  # the error was raised to the caller: record nothing more
        self.closed = False  # the worker is stopped (the run ended): calls run on the caller's thread
        self.synchronous = False  # every call waits until it is made (Tracker.synchronous)
        # Set by the first call that waits (then the run is ending, or measuring time and synchronous): every
        # _flush from then on sends at once, so nothing queued behind one waits out its FLUSH_SECONDS.
        self.wake = threading.Event()

    def submit(self, call: Callable[[], T]) -> Future[T]:
        def guarded() -> T:
            if self.error is not None:  # a call after a failed one would fail too (no run) or record half
                raise _Skipped
            try:
                return call()
            except BaseException as error:
                self.error = error
                raise

        return self.executor.submit(guarded)

    def raise_error(self) -> None:
        """The first queued call's error, once; later calls record nothing and do not raise again."""
        if self.error is not None and not self.delivered:
            self.delivered = True
            raise self.error


def _mlflow_tracker(spec: TrackingSpec) -> Tracker:
    from pipeline.tracking.mlflow import MlflowTracker

    return MlflowTracker(spec)


class _Skipped(Exception):
    """A queued call not made because an earlier one failed."""


class BackgroundTracker:
    """Implements pipeline.tracking.base.Tracker over the MLflow tracker, its store calls on one worker
    thread (see the module's docstring)."""

    def __init__(
        self, spec: TrackingSpec, queue: _Queue | None = None, opener: Callable[[TrackingSpec], Tracker] | None = None
    ) -> None:
        self.spec = spec
        self.opener = opener or _mlflow_tracker  # called on the worker: imports mlflow there
        self.queue = queue or _Queue()
        self.owner = queue is None  # the top run stops the worker at its end; its children share it
        self.real: Tracker | None = None  # set on the worker once the run is open
        self.ended = False
        # log_metrics, log_params and set_tags not yet sent: (key, value, timestamp ms) in the order logged,
        # params and tags by key; `flushing`: a _flush is queued and will send what is added before it runs.
        self.lock = threading.Lock()
        self.metrics: list[tuple[str, float, int]] = []
        self.params: dict[str, Any] = {}
        self.tags: dict[str, str] = {}
        self.flushing = False
        self.flushed = time.monotonic()  # when the last batch was sent (or the tracker made)

    def _wait(self, call: Callable[[], T], default: T) -> T:
        """call() on the worker after everything queued before it; its result."""
        self.queue.wake.set()
        self.queue.raise_error()
        if self.queue.delivered:
            return default
        if self.queue.closed:
            return call()
        try:
            return self.queue.submit(call).result()
        except BaseException:
            self.queue.raise_error()  # the queued call's own error, or the earlier one it was skipped for
            raise  # interrupted while waiting (Ctrl-C)

    def _later(self, call: Callable[[], object]) -> None:
        """call() on the worker, after everything queued before it; returns at once (once it is made,
        after synchronous())."""
        if self.queue.synchronous:
            self._wait(call, None)
            return
        self.queue.raise_error()
        if not self.queue.delivered and not self.ended:
            self.queue.submit(call)

    def _batched(
        self,
        metrics: Mapping[str, float] | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Add to the batch; one _flush is queued for everything added until the worker runs it."""
        self.queue.raise_error()
        if self.queue.delivered or self.ended:
            return
        now = int(time.time() * 1000)
        with self.lock:
            for key, value in (metrics or {}).items():
                # A NaN placeholder not sent yet (runner: the headline metric logged first) is replaced in
                # place: the key keeps its first position, and MLflow never sees a NaN beside its value.
                waiting = [i for i, (name, old, _) in enumerate(self.metrics) if name == key and math.isnan(old)]
                if waiting:
                    self.metrics[waiting[0]] = (key, float(value), now)
                else:
                    self.metrics.append((key, float(value), now))
            self.params.update(params or {})
            self.tags.update({key: str(value) for key, value in (tags or {}).items()})
            queued, self.flushing = self.flushing, True
        if not queued or self.queue.synchronous:
            self._later(self._flush)

    def _flush(self) -> None:
        """On the worker: the batch as one store call, FLUSH_SECONDS after the last one unless a call that
        waits (or the run's end) wakes it first; what is logged meanwhile joins the batch."""
        self.queue.wake.wait(max(0.0, self.flushed + FLUSH_SECONDS - time.monotonic()))
        self.flushed = time.monotonic()
        with self.lock:
            metrics, params, tags = self.metrics, self.params, self.tags
            self.metrics, self.params, self.tags, self.flushing = [], {}, {}, False
        real = self.real
        if real is None or not (metrics or params or tags):
            return
        log_batch = getattr(real, "log_batch", None)
        if log_batch is not None:
            log_batch(metrics, params, tags)
            return
        if params:  # a Tracker without log_batch (tests' recorders): one call per kind
            real.log_params(params)
        if metrics:
            real.log_metrics({key: value for key, value, _ in metrics})
        if tags:
            real.set_tags(tags)

    def synchronous(self, on: bool = True) -> None:
        if on:
            self._wait(lambda: None, None)
        self.queue.synchronous = on

    @property
    def run_id(self) -> str | None:
        return self._wait(lambda: self.real.run_id if self.real else None, None)

    @property
    def last_run_id(self) -> str | None:
        return self._wait(lambda: self.real.last_run_id if self.real else None, None)

    @property
    def experiment_id(self) -> str | None:
        return self._wait(lambda: self.real.experiment_id if self.real else None, None)

    def start(
        self,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        run_name: str | None = None,
    ) -> None:
        require_server(self.spec)  # an unreachable server: a ConfigError now, before anything is written
        params, tags = dict(params), dict(tags)

        def open_run() -> None:
            began = time.perf_counter()
            try:
                real = self.opener(self.spec)
                # The params (the resolved config, ~100) join the first batch: one store call fewer.
                batched = hasattr(real, "log_batch")
                real.start({} if batched else params, tags, parent_run_id, run_name)
            except ConfigError:
                raise
            except Exception as error:
                raise ConfigError(
                    f"tracking.tracking_uri='{self.spec.tracking_uri}': the MLflow store could not be opened "
                    f"({type(error).__name__}: {error}). Check the store, or run with tracking=offline and log "
                    f"the run later with `python -m pipeline.tracking sync <run dir>`."
                ) from error
            self.real = real
            if batched and params:
                with self.lock:
                    self.params = {**params, **self.params}
                    queued, self.flushing = self.flushing, True
                if not queued:
                    self.queue.submit(self._flush)  # from the worker itself: never waits for it
            log.debug("MLflow store and run opened in %.2fs on the tracking thread", time.perf_counter() - began)

        self._later(open_run)

    def child(self, params: Mapping[str, Any], tags: Mapping[str, str], run_name: str | None = None) -> Tracker:
        child = BackgroundTracker(self.spec, self.queue, self.opener)
        params, tags = dict(params), dict(tags)

        def open_child() -> None:
            if self.real is not None:
                child.real = self.real.child(params, tags, run_name)

        self._later(open_child)
        return child

    def children(self) -> list[RunRecord]:
        return self._wait(lambda: self.real.children() if self.real else [], [])

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self._batched(metrics=metrics)

    def log_artifacts(self, local_path: Path, artifact_path: str | None = None) -> None:
        self._later(lambda: self.real and self.real.log_artifacts(local_path, artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._batched(tags=tags)

    def log_params(self, params: Mapping[str, str]) -> None:
        self._batched(params=params)

    def log_dataset(self, name: str, digest: str, source: str, profile: Mapping[str, Any], context: str) -> None:
        profile = dict(profile)
        self._later(lambda: self.real and self.real.log_dataset(name, digest, source, profile, context))

    def log_model(
        self, torchscript: Path, engine: str, example: Sequence[Any], output: Any
    ) -> Callable[[], str | None]:
        """Queued like log_artifacts, so the run's next stage works while the model is copied and recorded
        (0.5 s for the ResNet-18 shape); its own error is kept for the returned function, not raised by the
        next tracker call (which would blame whatever stage makes it)."""
        outcome: list[Any] = []

        def log() -> None:
            try:
                outcome.append(self.real.logged_model(torchscript, engine, example, output) if self.real else None)
            except Exception as error:  # noqa: BLE001 - given to whoever asks for the URI
                outcome.append(error)

        self._later(log)  # waits for it after synchronous()

        def uri() -> str | None:
            if not outcome:
                self._wait(lambda: None, None)  # everything queued before, this logging included
            if not outcome:
                return None  # not made: an earlier queued call failed (raised by the wait above)
            if isinstance(outcome[0], Exception):
                raise outcome[0]
            return outcome[0]

        return uri

    def register_model(self, model_uri: str, tags: Mapping[str, str], run_id: str | None = None) -> str | None:
        tags = dict(tags)
        return self._wait(lambda: self.real.register_model(model_uri, tags, run_id) if self.real else None, None)

    def share_view(self, key: str, search_filter: str = "") -> str | None:
        """Saved on the worker thread; returns the key it is saved under."""
        self._later(lambda: self.real and self.real.share_view(key, search_filter))
        return key

    def end(self, status: str) -> None:
        """Ends the run once every call queued before is made (after a failed one, with what was
        recorded). The top run's tracker then stops the worker; its error, if not raised yet, is raised."""
        if self.ended:
            return
        self.ended = True
        try:
            if not self.queue.closed:
                self.queue.wake.set()
                future = self.queue.executor.submit(lambda: self.real and self.real.end(status))
                future.result()
        finally:
            if self.owner:
                self.queue.executor.shutdown(wait=True)
                self.queue.closed = True
        self.queue.raise_error()
