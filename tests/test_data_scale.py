"""Data at scale (issue 19): lazy batch sources, streamed metrics, the float-output cache, max_samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline import metric_keys
from pipeline.batches import BatchList, DatasetBatches
from pipeline.quality import MetricPlan, QualityAccumulator, quality_metrics, wilson_interval
from tests.conftest import REPO_ROOT
from tests.helpers import SWEEP_UNTIMED, run_once_per_argument


def _images(folder: Path, count: int, size: int = 32) -> Path:
    """`count` PNGs of `size` px in two class folders."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in range(2):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"c{index % 2}" / f"{index:05d}.png")
    return folder


class _Squares:
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((2,), float(index)), index % 3


def test_dataset_batches_are_lazy_re_iterable_and_cut_by_batches_or_samples() -> None:
    source = DatasetBatches(_Squares(), [3, 1, 4, 0, 5, 9, 2], batch_size=3, identity="squares")
    assert len(source) == 3 and source.num_samples == 7
    first = [inputs.args[0][:, 0].tolist() for inputs, _ in source]
    assert first == [[3, 1, 4], [0, 5, 9], [2]] == [inputs.args[0][:, 0].tolist() for inputs, _ in source]
    assert source[1][1].tolist() == [0, 2, 0]
    assert source.head(max_samples=4).num_samples == 4 and len(source[:2]) == 2
    assert (
        source.fingerprint() == DatasetBatches(_Squares(), [3, 1, 4, 0, 5, 9, 2], 3, identity="squares").fingerprint()
    )
    assert source.fingerprint() != source.head(max_samples=4).fingerprint()
    listed = BatchList([(torch.ones(4, 2), None), (torch.zeros(4, 2), None)])
    assert listed.head(max_samples=6).num_samples == 6 and listed[:1].num_samples == 4


def test_streamed_metrics_equal_the_metrics_of_the_concatenated_outputs() -> None:
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(40, 10, generator=generator)
    approximation = reference + 0.3 * torch.randn(40, 10, generator=generator)
    labels = torch.randint(0, 10, (40,), generator=generator)
    plan = MetricPlan(("accuracy", "topk", "sqnr", "agreement", "cosine"), top_k=3)
    whole = quality_metrics("lowered", approximation, reference, labels, plan)
    streamed = QualityAccumulator("lowered", plan, labelled=True)
    for part in range(0, 40, 16):  # batches of 16, 16 and 8
        streamed.update(approximation[part : part + 16], reference[part : part + 16], labels[part : part + 16])
    result = streamed.result()
    for key, value in whole.items():
        assert result[key] == pytest.approx(value, rel=1e-6), key
    low, high = wilson_interval(result[metric_keys.LOWERED_ACCURACY] * 40, 40)
    assert (
        result[metric_keys.eval_metric("lowered", metric_keys.ACCURACY_CI_LOW)],
        result[metric_keys.eval_metric("lowered", metric_keys.ACCURACY_CI_HIGH)],
    ) == pytest.approx((low, high))
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # the textbook figure


_MEMORY_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from torch import nn
    from pipeline.schema import EvaluateSpec, LatencySpec
    from stages.evaluate import evaluate
    from stages.sources.image_folder import image_folder_data
    from stages.types import Loaded

    torch.set_num_threads(1)
    data = image_folder_data(sys.argv[1], resize=None, crop=None, calibration_size=8, batch_size=50)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    spec = EvaluateSpec(models=["float"], latency=LatencySpec(enabled=False))
    report = evaluate(Loaded(model, data, "tiny", True), {}, "x86", spec)
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "samples": report.metrics["eval/samples"]}))
    """
)


def test_memory_stays_flat_as_the_evaluation_set_grows_tenfold(tmp_path: Path) -> None:
    """500 vs 5,000 images of 32 px: holding them all (as before) would add 5000 x 3 x 32 x 32 x 4 bytes =
    61 MB (twice that while stacking); streamed, the max RSS of the process grows by less than 25 MB. Both
    sets are evaluated in one child process, the small one first (one process's imports, not two)."""
    folders = [_images(tmp_path / "small", 500), _images(tmp_path / "large", 5000)]
    small, large = run_once_per_argument(_MEMORY_CHILD, [str(folder) for folder in folders])
    (small_rss, small_samples), (large_rss, large_samples) = [(run["rss_mb"], run["samples"]) for run in (small, large)]
    assert (small_samples, large_samples) == (492, 4992)
    print(f"max RSS: 500 images {small_rss:.0f} MB, 5,000 images {large_rss:.0f} MB")
    assert large_rss - small_rss < 25, (small_rss, large_rss)


def test_a_sweep_of_three_skip_lists_evaluates_float_once(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "-m",
            "skip=none,add,linear",
            "tracking=off",
            "stages=[load,calibrate,reference_convert,lower,evaluate]",
            *SWEEP_UNTIMED,  # diagnose and timing off
            f"output_dir={tmp_path}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = [json.loads(path.read_text()) for path in tmp_path.glob("multirun/**/evaluate/metrics.json")]
    assert len(jobs) == 3
    assert sum(job[metric_keys.FLOAT_EVALUATIONS] for job in jobs) == 1
    assert len({job[metric_keys.FLOAT_ACCURACY] for job in jobs}) == 1  # the cached outputs give the same figure
    assert len({job[metric_keys.eval_metric("lowered", metric_keys.SQNR_DB)] for job in jobs}) >= 2  # own int8 models
    log = result.stdout + result.stderr
    assert log.count("evaluate: float outputs from the cache") == 2
    assert list(tmp_path.glob("cache/float_outputs/*/batch_000000.pt"))


def test_max_samples_scores_a_subset_with_a_wilson_interval(run_pipeline) -> None:
    _, state, _ = run_pipeline(
        [
            "tracking=off",
            "cache.enabled=false",
            "evaluate.latency.enabled=false",
            "evaluate.max_samples=100",
            "stages=[load,calibrate,reference_convert,lower,evaluate]",
        ]
    )
    metrics = state.artifacts["evaluation"].metrics
    assert metrics[metric_keys.EVAL_SAMPLES] == 100
    low = metrics[metric_keys.eval_metric("float", metric_keys.ACCURACY_CI_LOW)]
    high = metrics[metric_keys.eval_metric("float", metric_keys.ACCURACY_CI_HIGH)]
    assert low <= metrics[metric_keys.FLOAT_ACCURACY] <= high and high - low > 0.02
