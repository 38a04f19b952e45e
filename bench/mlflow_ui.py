"""Regenerate the README's screenshot of MLflow's UI (bench/mlflow_ui.png): a small sweep (x86 and qnnpack,
skip none and add) into outputs/bench/mlflow_ui/, the README's `mlflow ui` on a free port, and headless
Chromium (Debian's `chromium`) on the sweep's view, the URL the sweep's closing summary prints.

    python bench/mlflow_ui.py            # about a minute; needs chromium (apt-get install -y chromium)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.tracking import headline  # noqa: E402
from tests import browser  # noqa: E402

OUT = ROOT / "outputs" / "bench" / "mlflow_ui"
IMAGE = ROOT / "bench" / "mlflow_ui.png"


def main() -> None:
    if browser.chromium() is None:
        raise SystemExit("needs chromium: apt-get install -y chromium")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    sweep = [sys.executable, "-m", "pipeline", "-m", "backend=x86,qnnpack", "skip=none,add", f"output_dir={OUT}"]
    subprocess.run([*sweep, "export.onnx=false"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{OUT}/mlflow.db")
    experiment = client.get_experiment_by_name("fx-ptq")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'true'")
    with browser.mlflow_ui(f"sqlite:///{OUT}/mlflow.db", OUT) as base:
        url = headline.experiment_url(base, experiment.experiment_id, headline.sweep_view(parent.info.run_id))
        browser.headless(url, screenshot=IMAGE, size="2000,760")
    print(f"wrote {IMAGE} from {url}")


if __name__ == "__main__":
    main()
