"""A test-only model: the digits CNN with a pause at the top of forward, so calibration lasts long
enough for a test to signal the CLI while it runs. FXQ_TEST_PAUSE (seconds, read at call time) sets
the pause; unset it is 0, and the cache key is the same either way (same code, same kwargs)."""

from __future__ import annotations

import os
import time

import torch
import torch.fx

from stages.sources.digits import DigitsCNN, digits_cnn


def pause(x: torch.Tensor) -> torch.Tensor:
    time.sleep(float(os.environ.get("FXQ_TEST_PAUSE", "0")))
    return x


# A wrapped function stays a call in the traced graph; an inline time.sleep would run once at trace time.
torch.fx.wrap("pause")


class SlowDigitsCNN(DigitsCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pause(x))


def slow_digits_cnn() -> SlowDigitsCNN:
    model = SlowDigitsCNN()
    model.load_state_dict(digits_cnn().state_dict())
    return model.eval()
