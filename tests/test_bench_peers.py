"""bench/peers.py's table builder on a fake result (the bench itself is not part of the suite: it runs
NNCF, a bench-only extra, and takes about a minute)."""

from __future__ import annotations

import torch

from bench import peers


def _row(model: str, tool: str, setting: str, **values: object) -> dict[str, object]:
    row: dict[str, object] = {
        "model": model,
        "tool": tool,
        "setting": setting,
        "float_accuracy": 0.95,
        "accuracy": 0.94,
        "sqnr_db": 22.43,
        "cosine": 0.99681,
        "agreement": 0.982,
        "quantize_seconds": 2.34,
        "speedup_b1": 3.21 if tool == "pipeline" else peers.FAKE_QUANT,
        "error": None,
    }
    row.update(values)
    return row


def test_table_has_one_line_per_row_a_failure_and_the_fake_quant_note() -> None:
    rows = [
        _row("mobile_digits", "pipeline", "new defaults (recovery on)"),
        _row("mobile_digits", "nncf", "default preset", sqnr_db=float("nan")),
        _row("text_encoder", "nncf", "model_type=TRANSFORMER", float_accuracy=None, accuracy=None),
        _row("text_encoder", "nncf", "default preset", error="TypeError: forward() got an unexpected keyword"),
    ]
    lines = peers.build_table(rows).splitlines()
    assert lines[0].startswith("| model | tool + setting |") and len(lines) == 2 + len(rows)
    assert all(line.count("|") == len(peers.COLUMNS) + 1 for line in lines)
    first, nan_row, no_labels, failed = lines[2:]
    assert "| mobile_digits | pipeline: new defaults (recovery on) | 0.940 (0.950) | 22.4 | 0.9968 |" in first
    assert first.endswith("| 0.982 | 2.3 | 3.21x |")
    assert nan_row.startswith("|  | nncf: default preset |") and "| nan |" in nan_row
    assert nan_row.endswith(f"| {peers.FAKE_QUANT} |")
    assert "| text_encoder | nncf: model_type=TRANSFORMER | - |" in no_labels
    assert "FAILED: TypeError: forward() got an unexpected keyword" in failed


def test_scores_against_float() -> None:
    float_out = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    result = peers.scores(float_out.clone(), float_out, torch.tensor([0, 0]))
    assert result["accuracy"] == 0.5 and result["agreement"] == 1.0 and result["sqnr_db"] == float("inf")
    assert abs(result["cosine"] - 1.0) < 1e-6
    assert peers.scores(float_out, float_out, None)["accuracy"] is None
