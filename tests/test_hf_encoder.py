"""model=hf_encoder and data=text_file (the [hf] extra): a tiny randomly initialised BERT and a tokenizer
written to a temp folder (no download), traced with Hugging Face's FX tracer, scoped per layer, run end
to end. Skipped, with the reason, when transformers 4.57.x (transformers.utils.fx) is not installed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "transformers.utils.fx",
    reason="the [hf] extra is not installed (transformers 4.57.x with transformers.utils.fx): README 'Bring your own'",
    exc_type=ImportError,  # not installed, or a transformers without utils.fx (5.x) or that fails to import
)

from transformers import AutoModel, BertConfig, BertModel, BertTokenizer  # noqa: E402

from pipeline import metric_keys  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from stages.sources.hf_encoder import hf_encoder, mean_pool  # noqa: E402
from stages.sources.text_file import text_file_data  # noqa: E402

WORDS = str.split("the a cat dog bird sat ran flew on under over mat tree house red blue green small big fast slow")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LINEARS = [
    f"encoder.layer.{layer}.{name}"
    for layer in range(2)
    for name in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
]
CHEAP = ["tracking=off", "cache.enabled=false", "evaluate.latency.enabled=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, sentence file): a 2-layer BERT, hidden 32, random weights, with a BertTokenizer
    over a 27-token vocabulary, saved with save_pretrained; 48 sentences of 2 to 14 words."""
    root = tmp_path_factory.mktemp("hf")
    folder = root / "tiny_bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join([*SPECIAL, *WORDS]) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(folder))
    words = random.Random(0)
    sentences = [" ".join(words.choice(WORDS) for _ in range(words.randint(2, 14))) for _ in range(48)]
    text = root / "sentences.txt"
    text.write_text("\n".join(sentences[:20]) + "\n\n" + "\n".join(sentences[20:]) + "\n")  # an empty line
    return folder, text


def _run_args(folder: Path, text: Path) -> list[str]:
    return [
        "model=hf_encoder",
        f"model.factory.path={folder}",
        "model.trained=false",
        "data=text_file",
        f"data.factory.path={text}",
        "data.factory.batch_size=8",
    ]


def _quantized_linears(model: torch.nn.Module) -> set[str]:
    """Names of the int8 Linear modules (static and dynamic ones: the dynamic class derives from the static)."""
    return {name for name, module in model.named_modules() if isinstance(module, torch.ao.nn.quantized.Linear)}


def test_trace_matches_eager_and_keeps_module_names(tiny: tuple[Path, Path]) -> None:
    folder, _ = tiny
    encoder = hf_encoder(str(folder))
    # transformers' own loaders as the reference for the project's file readers; offline: a local folder.
    eager = AutoModel.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager").eval()  # offline
    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)  # offline
    for sentences in (["the cat sat on the mat", "a dog ran"], ["red bird flew over the small green tree fast"]):
        batch = tokenizer(sentences, padding="longest", return_tensors="pt")  # lengths 8 and 11: shapes vary
        with torch.no_grad():
            expected = mean_pool(eager(**batch).last_hidden_state, batch["attention_mask"])
            assert torch.equal(encoder(**batch), expected)
    names = dict(encoder.named_modules())
    assert all(isinstance(names[name], torch.nn.Linear) for name in LINEARS)
    assert "pooler.dense" not in names  # the unused pooler head is dropped from the graph
    normalized = hf_encoder(str(folder), normalize=True)
    with torch.no_grad():
        norms = normalized(**tokenizer(["a cat", "the big house"], padding=True, return_tensors="pt")).norm(dim=1)
    assert torch.allclose(norms, torch.ones(2))


def test_the_folder_is_read_from_its_files_as_transformers_would_load_it(tiny, tmp_path: Path) -> None:
    """stages/sources/hf_local reads the folder without the hub loaders: the same weights and token ids as
    from_pretrained, a checkpoint with a task head gives its base model, and missing weights are refused."""
    import transformers
    from safetensors.torch import load_file, save_file

    from stages.sources.hf_local import read_model, read_tokenizer

    folder, _ = tiny
    reference = AutoModel.from_pretrained(str(folder), local_files_only=True)  # offline: a local folder
    model = read_model(transformers, folder)
    assert model.config._attn_implementation == "eager" and not model.training
    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())
    sentences = ["the cat sat on the mat", "a dog ran over the small green tree fast"]
    ours = read_tokenizer(transformers, folder)(sentences, padding="longest", return_tensors="pt")
    theirs = BertTokenizer.from_pretrained(str(folder), local_files_only=True)(  # offline: a local folder
        sentences, padding="longest", return_tensors="pt"
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in theirs)

    headed = tmp_path / "with_head"
    transformers.BertForMaskedLM(reference.config).save_pretrained(str(headed))  # keys under `bert.`
    base = read_model(transformers, headed)
    stored = load_file(str(headed / "model.safetensors"))
    compared = [key for key in base.state_dict() if not key.startswith("pooler.")]  # a MaskedLM has no pooler
    assert compared and all(torch.equal(base.state_dict()[key], stored[f"bert.{key}"]) for key in compared)

    stored.pop("bert.encoder.layer.0.output.dense.weight")
    save_file(stored, str(headed / "model.safetensors"))
    with pytest.raises(KeyError, match="encoder.layer.0.output.dense.weight"):
        read_model(transformers, headed)


def test_functional_ops_have_their_layers_scope(tiny: tuple[Path, Path]) -> None:
    """prepare_fx's tracer records every attention matmul, softmax and residual add under its own layer,
    so module_name_object_type_order entries can target one layer's functional ops."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    folder, _ = tiny
    encoder = hf_encoder(str(folder))
    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)  # offline: a local folder
    batch = tokenizer(["the cat sat"], return_tensors="pt")
    example = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    prepared = prepare_fx(encoder, get_default_qconfig_mapping("x86"), example)
    scopes = prepared.meta["_observed_graph_module_attrs"].node_name_to_scope
    matmuls = sorted(scope for name, (scope, _) in scopes.items() if name.startswith("matmul"))
    assert matmuls == [f"encoder.layer.{layer}.attention.self" for layer in (0, 0, 1, 1)]
    residual = {scope for name, (scope, _) in scopes.items() if name.startswith("add")}
    assert {"encoder.layer.1.output", "encoder.layer.1.attention.output", "embeddings"} <= residual


def test_text_file_batches(tiny: tuple[Path, Path]) -> None:
    folder, text = tiny
    data = text_file_data(str(text), str(folder), batch_size=8, seed=0)
    assert (data.num_calibration_samples, data.num_evaluation_samples) == (24, 24)  # the empty line is skipped
    assert not data.has_labels and all(labels is None for _, labels in data.calibration)
    inputs = data.calibration[0][0]
    assert inputs.names == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(t.dtype == torch.long for t in inputs.tensors)
    lengths = {int(x.kwargs["input_ids"].shape[1]) for x, _ in [*data.calibration, *data.evaluation]}
    assert len(lengths) > 1  # padded per batch to its longest sentence
    for x, _ in data.calibration:
        assert x.kwargs["attention_mask"][:, -1].any()  # no batch has a column of padding only
    again = text_file_data(str(text), str(folder), batch_size=8, seed=0)
    assert torch.equal(again.evaluation[0][0].kwargs["input_ids"], data.evaluation[0][0].kwargs["input_ids"])
    other = text_file_data(str(text), str(folder), batch_size=8, seed=1)
    assert not torch.equal(
        other.calibration[0][0].kwargs["attention_mask"].sum(1), data.calibration[0][0].kwargs["attention_mask"].sum(1)
    )
    fixed = text_file_data(str(text), str(folder), max_length=12, calibration_size=10, evaluation_size=5)
    assert {tuple(x.kwargs["input_ids"].shape) for x, _ in fixed.calibration} == {(10, 12)}
    assert fixed.num_evaluation_samples == 5


def test_text_file_errors(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    folder, text = tiny
    with pytest.raises(ConfigError, match=r"data.factory.path=.*does not exist"):
        text_file_data(str(tmp_path / "missing.txt"), str(folder))
    with pytest.raises(ConfigError, match=r"data.factory.tokenizer=.*not a folder"):
        text_file_data(str(text), str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"model.factory.path=.*does not exist"):
        hf_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="pooling"):
        hf_encoder(str(folder), pooling="max")


def _cosine(state) -> tuple[float, float]:
    """(mean, min) cosine similarity of the int8 embeddings to the float ones over the evaluation sentences."""
    loaded, lowered = state.artifacts["loaded"], state.artifacts["lowered"].model
    with torch.no_grad():
        pairs = [(inputs.call(loaded.model), inputs.call(lowered)) for inputs, _ in loaded.data.evaluation]
    cosine = torch.cat([torch.nn.functional.cosine_similarity(a, b, dim=1) for a, b in pairs])
    return float(cosine.mean()), float(cosine.min())


@pytest.mark.slow
def test_static_int8_every_linear_end_to_end(tiny: tuple[Path, Path], run_pipeline) -> None:
    """Static int8 on every Linear, diagnose on (it must not stop the run), evaluate and export."""
    folder, text = tiny
    overrides = [
        *_run_args(folder, text),
        "qconfig_mapping=static_linear",
        "diagnose.enabled=true",
        "diagnose.max_batches=1",
        *CHEAP,
    ]
    _, state, run_dir = run_pipeline(overrides)
    metrics = state.metrics
    assert _quantized_linears(state.artifacts["lowered"].model) == set(LINEARS)
    assert metrics[metric_keys.stage_failed("diagnose")] == 0.0
    assert (run_dir / "diagnose").is_dir()
    assert metrics["eval/lowered/sqnr_db"] > 20
    mean, worst = _cosine(state)
    assert worst > 0.99 and mean > worst - 1e-6
    # Identical outputs (inf dB) log no SQNR: export/<format>/max_abs_diff says so.
    assert metrics.get("export/onnx/sqnr_db", float("inf")) > 30 and metrics["export/torchscript/max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_module_name_skip_leaves_exactly_that_linear_float(tiny: tuple[Path, Path], run_pipeline) -> None:
    folder, text = tiny
    skipped = "encoder.layer.1.output.dense"
    overrides = [
        *_run_args(folder, text),
        "qconfig_mapping=static_linear",
        f"skip.module_name=[{skipped}]",
        "diagnose.enabled=false",
        *CHEAP,
    ]
    _, state, _ = run_pipeline(overrides)
    lowered = state.artifacts["lowered"].model
    assert _quantized_linears(lowered) == set(LINEARS) - {skipped}
    assert type(lowered.get_submodule(skipped)) is torch.nn.Linear


@pytest.mark.slow
def test_dynamic_int8_end_to_end(tiny: tuple[Path, Path], run_pipeline) -> None:
    from pipeline.engine import qconfigs

    if "dynamic" not in qconfigs.QCONFIG_LIBRARY:
        pytest.skip("no `dynamic` qconfig in this checkout yet (issue 12's qconfig bullet)")
    folder, text = tiny
    overrides = [
        *_run_args(folder, text),
        "qconfig_mapping=static_linear",
        "qconfig_mapping.object_type=[{object_type: torch.nn.Linear, qconfig: dynamic}]",
        *CHEAP,
    ]
    _, state, _ = run_pipeline(overrides)
    assert _quantized_linears(state.artifacts["lowered"].model) == set(LINEARS)
    assert state.metrics["eval/lowered/sqnr_db"] > 20 and _cosine(state)[1] > 0.99


def test_backend_default_mapping_calibrates(tiny: tuple[Path, Path], run_pipeline) -> None:
    """The default mapping observes the traced encoder's shape-tuple adds (`size()[:-2] + (n,)`) like
    tensor adds; those observers are dropped after prepare instead of failing calibration
    (`'torch.Size' object has no attribute 'detach'`)."""
    folder, text = tiny
    overrides = [*_run_args(folder, text), "qconfig_mapping=backend_default", "stages=[load,calibrate]", *CHEAP]
    _, state, _ = run_pipeline(overrides)
    assert state.artifacts["calibrated"].num_samples == 24
