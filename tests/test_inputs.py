"""Models with several and integer inputs: ModelInputs, the tensor-file dict format, data=custom, a two-input
int64 model end to end on every backend, the cache key over integer inputs and the text_encoder example."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.batch import ModelInputs
from pipeline.cache import cache_key
from pipeline.schema import ENGINES
from stages.sources.tensor_file import tensor_file_data
from tests.conftest import compose_config, to_spec

# A two-input model (token ids + attention mask, both int64) and a data factory for it, as a user's file.
TWO_INPUT_MODULE = """
import torch
from torch import nn

from pipeline.batch import ModelInputs
from stages.types import DataBundle


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        x = torch.relu(self.proj(self.embedding(input_ids))) * mask
        return self.head(x.sum(1) / mask.sum(1))  # every row has at least 2 tokens


def build():
    torch.manual_seed(0)
    return TwoInputs().eval()


def tokens(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (count, 6), generator=generator)
    lengths = torch.randint(2, 7, (count,), generator=generator)
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def data(count=24, batch_size=8):
    ids, mask = tokens(count)
    inputs = ModelInputs((), {"input_ids": ids, "attention_mask": mask})
    batches = [(inputs[i : i + batch_size], None) for i in range(0, count, batch_size)]
    return DataBundle("two_inputs", batches[:2], batches[2:], batches[0][0][:1], has_labels=False)
"""

CHEAP = ["diagnose.enabled=false", "evaluate.latency.enabled=false", "tracking=off", "cache.enabled=false"]


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "two_inputs.py").write_text(textwrap.dedent(TWO_INPUT_MODULE))
    return folder


def _custom_model(folder: Path) -> list[str]:
    return [
        "model=custom",
        "model.factory._target_=two_inputs.build",
        f"model.python_path=[{folder}]",
        "model.trained=false",
    ]


def test_model_inputs_wrap_slice_cat_and_map_keywords_to_positions() -> None:
    ids, mask = torch.arange(12).view(3, 4), torch.ones(3, 4, dtype=torch.bool)
    assert ModelInputs.wrap(ids).args == (ids,)
    assert ModelInputs.wrap((ids, mask)).names == ["input_0", "input_1"]
    named = ModelInputs.wrap({"input_ids": ids, "attention_mask": mask})
    assert named.names == ["input_ids", "attention_mask"] and named.batch_size == 3
    assert named.integer_names() == ["input_ids", "attention_mask"]
    assert torch.equal(ModelInputs.cat([named[:1], named[1:]]).kwargs["input_ids"], ids)
    assert named.repeat_to(7).batch_size == 7 and torch.equal(named.repeat_to(7).kwargs["input_ids"][3], ids[0])

    def forward(input_ids, token_type_ids=None, attention_mask=None):
        return input_ids

    # Keyword inputs go to their parameter's position; a skipped parameter gets its default.
    assert named.positional(forward) == (ids, None, mask)
    assert named.positional_names(forward) == ["input_ids", "token_type_ids", "attention_mask"]
    with pytest.raises(TypeError, match="not positional parameters"):
        ModelInputs((), {"other": ids}).positional(forward)


def test_tensor_file_reads_named_integer_inputs(tmp_path: Path) -> None:
    ids = torch.randint(0, 20, (10, 6))
    mask = torch.ones(10, 6, dtype=torch.bool)
    torch.save({"input_ids": ids, "attention_mask": mask, "labels": torch.arange(10) % 2}, tmp_path / "named.pt")
    data = tensor_file_data(str(tmp_path / "named.pt"), calibration_size=4, batch_size=3)
    inputs, labels = data.calibration[0]
    assert inputs.names == ["input_ids", "attention_mask"] and not inputs.args
    assert inputs.kwargs["input_ids"].dtype == torch.int64 and inputs.kwargs["attention_mask"].dtype == torch.bool
    assert data.example_inputs.batch_size == 1 and labels is not None and data.has_labels
    # {"inputs": {...}} reads the same way.
    torch.save({"inputs": {"input_ids": ids}}, tmp_path / "nested.pt")
    assert tensor_file_data(str(tmp_path / "nested.pt")).example_inputs.names == ["input_ids"]


def test_cache_key_changes_when_an_integer_input_changes() -> None:
    spec = to_spec(compose_config([]))
    model = nn.Linear(2, 2)
    ids = torch.randint(0, 20, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)

    def key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
        return cache_key(spec, model, [ModelInputs((), {"input_ids": input_ids, "attention_mask": attention_mask})])

    base = key(ids, mask)
    assert key(ids.clone(), mask.clone()) == base
    changed = ids.clone()
    changed[2, 3] += 1
    assert key(changed, mask) != base
    assert key(ids, mask.to(torch.int32)) != base  # same values, another dtype
    shorter = mask.clone()
    shorter[0, -1] = 0
    assert key(ids, shorter) != base


@pytest.mark.parametrize("engine", ENGINES)
def test_two_int64_inputs_end_to_end(engine: str, tmp_path: Path, user_project: Path, run_pipeline, caplog) -> None:
    ids, mask = _tokens(user_project)
    path = tmp_path / "tokens.pt"
    torch.save({"input_ids": ids, "attention_mask": mask}, path)
    onnx = engine == "x86"
    caplog.set_level(logging.INFO)
    _, state, run_dir = run_pipeline(
        [
            f"backend={engine}",
            *_custom_model(user_project),
            "data=tensor_file",
            f"data.factory.path={path}",
            "data.factory.batch_size=8",
            *CHEAP,
            f"export.onnx={str(onnx).lower()}",
        ]
    )
    metrics = state.metrics
    assert metrics["eval/lowered/sqnr_db"] > 15
    assert "inputs input_ids, attention_mask are integer: never observed" in caplog.text
    prepared_code = (run_dir / "calibrate" / "prepared_graph.py").read_text()
    # Observers only on float values: none takes an input directly.
    assert "(input_ids)" not in prepared_code.replace("self.embedding(input_ids)", "")
    assert "(attention_mask)" not in prepared_code
    data = json.loads((run_dir / "load" / "data.json").read_text())
    assert data["inputs"]["input_ids"]["dtype"] == "int64" and data["inputs"]["attention_mask"]["shape"] == [1, 6]
    assert state.artifacts["lowered"].node_counts["quantized"] >= 2
    if onnx:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(run_dir / "export" / "lowered_x86.onnx"))
        assert [entry.name for entry in session.get_inputs()] == ["input_ids", "attention_mask"]
        assert metrics.get("export/onnx/sqnr_db", float("inf")) > 15  # identical outputs (inf dB) log no SQNR


def _tokens(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("two_inputs_for_data", folder / "two_inputs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tokens(40)


def test_data_custom_runs_a_users_data_factory(user_project: Path, run_pipeline) -> None:
    _, state, run_dir = run_pipeline(
        [
            *_custom_model(user_project),
            "data=custom",
            "data.factory._target_=two_inputs.data",
            "+data.factory.batch_size=4",  # a kwarg the preset does not have: + adds it
            f"data.python_path=[{user_project}]",
            *CHEAP,
            "evaluate.latency.enabled=true",
            "evaluate.latency.batch_sizes=[3]",
            "export.onnx=false",
        ]
    )
    assert state.metrics["data/calibration_samples"] == 8 and state.metrics["data/evaluation_samples"] == 16
    assert "latency/lowered/b3_ms" in state.metrics  # latency batches of 3 built from the two inputs
    assert json.loads((run_dir / "load" / "data.json").read_text())["name"] == "two_inputs"


@pytest.mark.slow
def test_text_encoder_experiment_end_to_end(run_pipeline) -> None:
    _, state, run_dir = run_pipeline(
        [
            "experiment=text_encoder",
            "tracking=off",
            "cache.enabled=false",
            "diagnose.enabled=false",
            "evaluate.latency.batch_sizes=[4]",
            "export.onnx=true",
        ]
    )
    metrics = state.metrics
    assert metrics["eval/float/accuracy"] > 0.9
    assert metrics["eval/lowered/accuracy"] >= metrics["eval/float/accuracy"] - 0.02
    assert metrics["eval/lowered/sqnr_db"] > 20
    assert metrics["export/onnx/sqnr_db"] > 20
    lowered_code = (run_dir / "lower" / "lowered_graph.py").read_text()
    assert lowered_code.count("quantize_per_tensor") >= 1


def test_text_encoder_checkpoint_is_small_and_fits_the_model() -> None:
    from stages.sources.text_encoder import CHECKPOINT, digit_tokens_data, text_encoder

    assert CHECKPOINT.stat().st_size < 1024 * 1024
    data = digit_tokens_data()
    inputs, labels = data.evaluation[0]
    assert inputs.names == ["input_ids", "attention_mask"] and inputs.kwargs["input_ids"].dtype == torch.int64
    with torch.no_grad():
        accuracy = (inputs.call(text_encoder()).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.8


def test_integer_inputs_padded_per_batch_concatenate() -> None:
    """Token ids and masks padded per batch to different lengths: cat right-pads them with 0 (a 0 mask
    hides the padding); float inputs of different shapes are not padded."""
    short = ModelInputs(
        (), {"input_ids": torch.ones(2, 3, dtype=torch.long), "mask": torch.ones(2, 3, dtype=torch.bool)}
    )
    long = ModelInputs(
        (), {"input_ids": torch.ones(1, 5, dtype=torch.long), "mask": torch.ones(1, 5, dtype=torch.bool)}
    )
    both = ModelInputs.cat([short, long])
    assert both.kwargs["input_ids"].shape == (3, 5) and both.kwargs["mask"].dtype == torch.bool
    assert both.kwargs["mask"].sum(1).tolist() == [3, 3, 5]
    with pytest.raises(RuntimeError):
        ModelInputs.cat([ModelInputs((torch.ones(1, 3),)), ModelInputs((torch.ones(1, 5),))])


def test_load_accepts_integer_inputs_of_different_lengths_only() -> None:
    from stages.load import _same_inputs

    def signature(length: int, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [("input_ids", (length,), dtype)]

    assert _same_inputs(signature(5, torch.long), signature(7, torch.long))
    assert not _same_inputs(signature(5, torch.float32), signature(7, torch.float32))
    assert not _same_inputs(signature(5, torch.long), signature(5, torch.int32))
    assert not _same_inputs([("input_ids", (5, 2), torch.long)], signature(5, torch.long))
