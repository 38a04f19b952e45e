"""Helpers for looking at MLflow's UI as a user does (not a test module): the README's `mlflow ui` on a free
port, and Debian's headless Chromium dumping a page's DOM or a screenshot. Used by tests/test_mlflow_ui.py
and bench/mlflow_ui.py (which regenerates the README's screenshot)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium() -> str | None:
    """The path of Debian's chromium, or None (`apt-get install -y chromium`)."""
    return next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_ui(store_uri: str, cwd: Path, timeout: float = 120.0) -> Iterator[str]:
    """The README's command (`mlflow ui --backend-store-uri ... --host 127.0.0.1 --workers 1`) on a free port;
    yields its base URL once /health answers, and stops it (its process group) after."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "ui", "--backend-store-uri", store_uri, "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (cwd / "mlflow_ui.log").open("w")
    process = subprocess.Popen(
        [*command, "--workers", "1"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow ui did not start: {(cwd / 'mlflow_ui.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def headless(url: str, *, screenshot: Path | None = None, size: str = "2000,820", budget_ms: int = 25000) -> str:
    """Load url in headless Chromium with a virtual time budget (the page's scripts run, fetch and render);
    returns the DOM after it, or writes a screenshot when `screenshot` is given."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed")
    with tempfile.TemporaryDirectory() as profile:
        command = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={size}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={screenshot}" if screenshot else "--dump-dom",
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout
