"""The shipped checkpoint is what the seeded training script produces, and it is small."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.sources.digits import CHECKPOINT, train


def test_shipped_checkpoint_is_well_under_one_megabyte() -> None:
    assert CHECKPOINT.stat().st_size < 256 * 1024


@pytest.mark.slow
def test_training_script_reproduces_the_shipped_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "digits_cnn.pt"
    accuracy = train(out=out)
    assert accuracy >= 0.97
    retrained = torch.load(out, weights_only=True)
    shipped = torch.load(CHECKPOINT, weights_only=True)
    assert retrained.keys() == shipped.keys()
    # Seeded and single-process: bit-identical on the same torch build. Allow float noise from
    # a different thread count or CPU, but not a different model.
    for key, value in shipped.items():
        assert torch.allclose(retrained[key].float(), value.float(), atol=1e-4), key
