"""The second embedded example: a small transformer encoder fed token ids and an attention mask.

The task is built from data that ships in scikit-learn's wheel (no download): each 8x8 digit becomes a
"sentence" of pixel tokens. Empty rows at the top and bottom are dropped, every remaining pixel becomes a
token (its intensity bucketed into 5 levels, ids 1..5; 0 is padding), so sentences have 40 to 64 tokens,
padded to 64 with an attention mask (int64, 1 = real token). The digits split (seed 0) is the one
stages/sources/digits.py uses: calibration and evaluation never overlap the training part.

The model: token + position embedding, two blocks of multi-head self-attention + feed-forward network
(GELU), each with a residual and LayerNorm (post-norm), mean pooling over the attention mask, and a
linear classification head; written with plain nn.Linear and tensor ops, so FX traces it and every Linear
can be quantized. Its float checkpoint, text_encoder.pt next to this file, is reproduced (seeded, in
seconds) by `python -m stages.sources.text_encoder`.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch
from torch import nn

from pipeline.batch import ModelInputs
from stages.sources.digits import _digits_tensors, _split_indices
from stages.types import Batch, DataBundle

log = logging.getLogger(__name__)

CHECKPOINT = Path(__file__).with_name("text_encoder.pt")
MAX_LENGTH = 64  # 8 rows x 8 pixels
VOCAB_SIZE = 6  # 0 = padding, 1..5 = pixel intensity levels
PAD = 0


class SelfAttention(nn.Module):
    """Multi-head self-attention from four nn.Linear layers; padded keys are masked out."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[0], x.shape[1]
        return x.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        query, key, value = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        context = torch.matmul(scores.softmax(-1), value).transpose(1, 2)
        return self.out(context.reshape(x.shape[0], x.shape[1], -1))


class EncoderBlock(nn.Module):
    """Attention and a feed-forward network, each followed by a residual add and LayerNorm."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x, mask_bias))
        return self.norm2(x + self.ffn(x))


class TextEncoder(nn.Module):
    """forward(input_ids, attention_mask) -> class logits; both inputs int64 [batch, length]."""

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        max_length: int = MAX_LENGTH,
        dim: int = 32,
        heads: int = 4,
        hidden: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.position_embedding = nn.Embedding(max_length, dim)
        self.block1 = EncoderBlock(dim, heads, hidden)
        self.block2 = EncoderBlock(dim, heads, hidden)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        mask = attention_mask.to(x.dtype)
        mask_bias = (1.0 - mask)[:, None, None, :] * -10000.0  # [batch, 1, 1, length]: padded keys get -1e4
        x = self.block2(self.block1(x, mask_bias), mask_bias)
        weights = mask.unsqueeze(-1)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # mean over real tokens
        return self.head(pooled)


def text_encoder(checkpoint: str | None = str(CHECKPOINT)) -> TextEncoder:
    """The example model; loads the shipped float weights unless `checkpoint` is None."""
    model = TextEncoder()
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


def tokenize(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit images [N, 1, 8, 8] in [0, 1] -> (input_ids, attention_mask), both int64 [N, 64]: the rows
    between the first and last non-empty one, one token per pixel (5 intensity levels), then padding."""
    levels = (images.squeeze(1) * 16).round().long()  # 0..16
    tokens = 1 + torch.div(levels * 5, 17, rounding_mode="floor")  # 1..5
    input_ids = torch.full((len(images), MAX_LENGTH), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(images), MAX_LENGTH), dtype=torch.long)
    for i, image in enumerate(levels):
        rows = (image.sum(1) > 0).nonzero().flatten()
        first, last = (int(rows[0]), int(rows[-1])) if len(rows) else (0, 7)
        sentence = tokens[i, first : last + 1].flatten()
        input_ids[i, : len(sentence)] = sentence
        attention_mask[i, : len(sentence)] = 1
    return input_ids, attention_mask


def _batches(input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, batch_size: int) -> list[Batch]:
    inputs = ModelInputs((), {"input_ids": input_ids, "attention_mask": mask})
    return [(inputs[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)]


def digit_tokens_data(
    seed: int = 0, calibration_size: int = 256, evaluation_size: int = 450, batch_size: int = 32
) -> DataBundle:
    """Calibration and evaluation batches of (input_ids, attention_mask) keyword inputs, with labels."""
    images, labels = _digits_tensors()
    input_ids, mask = tokenize(images)
    split = _split_indices(seed, calibration_size, evaluation_size)
    calibration, evaluation = split["calibration"], split["evaluation"]
    calibration_batches = _batches(input_ids[calibration], mask[calibration], labels[calibration], batch_size)
    return DataBundle(
        name="digit_tokens",
        calibration=calibration_batches,
        evaluation=_batches(input_ids[evaluation], mask[evaluation], labels[evaluation], batch_size),
        example_inputs=calibration_batches[0][0][:1],
        has_labels=True,
    )


def train(epochs: int = 30, seed: int = 0, out: Path = CHECKPOINT) -> float:
    """Train on the digits' training part only (seeded); returns the accuracy on the evaluation part."""
    torch.manual_seed(seed)
    images, labels = _digits_tensors()
    input_ids, mask = tokenize(images)
    split = _split_indices(seed=0, calibration_size=256, evaluation_size=450)
    train_ids, train_mask, train_y = (t[split["training"]] for t in (input_ids, mask, labels))
    model = TextEncoder()
    steps_per_epoch = -(-len(train_y) // 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            loss = nn.functional.cross_entropy(model(train_ids[idx], train_mask[idx]), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        if (epoch + 1) % 10 == 0:
            log.info("epoch %d loss %.4f", epoch + 1, loss.item())
    model.eval()
    evaluation = split["evaluation"]
    with torch.no_grad():
        predicted = model(input_ids[evaluation], mask[evaluation]).argmax(1)
    accuracy = (predicted == labels[evaluation]).float().mean().item()
    torch.save(model.state_dict(), out)
    return accuracy


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description="Re-train the shipped text-encoder checkpoint (seeded).")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=CHECKPOINT)
    args = parser.parse_args()
    acc = train(epochs=args.epochs, out=args.out)
    print(f"evaluation accuracy {acc:.4f}; wrote {args.out} ({args.out.stat().st_size} bytes)")
