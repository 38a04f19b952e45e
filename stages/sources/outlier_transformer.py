"""A small transformer encoder on digits with function-preserving activation outliers: the SmoothQuant
test model.

Each 8x8 digit is a sequence of 8 row tokens (8 pixels each), embedded to 64 dimensions with a learned
position embedding, then two pre-LayerNorm encoder blocks (4-head self-attention from separate q/k/v
Linears, a GELU feed-forward of width 128, residual adds), a final LayerNorm, mean pooling over tokens
and a linear head: 14 Linear layers, about 70k parameters. Attention is written with plain tensor ops
so FX traces it.

The outliers: after training, `outlier_channels` channels of every LayerNorm that feeds Linears (ln1 ->
q, k, v; ln2 -> fc1) are scaled up by `outlier_scale` (the LayerNorm's weight and bias) and the
consuming Linears' weight columns for those channels down by the same factor. The float function is
unchanged (to float rounding), but each LayerNorm output now has a few channels tens of times larger
than the rest, as the LayerNorm outputs of pretrained transformers do (the activation outliers
SmoothQuant and LLM.int8() were written for): a per-tensor int8 scale that covers them leaves the other
channels a handful of levels.

`python -m stages.sources.outlier_transformer` re-trains the shipped checkpoint (seeded, a few seconds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from stages.sources.digits import _digits_tensors, _split_indices, fit

CHECKPOINT = Path(__file__).with_name("outlier_transformer.pt")


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (self.head_dim**-0.5), dim=-1)
        mixed = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.out(mixed)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class DigitsTransformer(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, hidden: int = 128, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.position = nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(torch.flatten(x, 1, 2)) + self.position  # (N, 1, 8, 8) -> 8 row tokens
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


@torch.no_grad()
def add_outliers(model: DigitsTransformer, scale: float, channels: int) -> None:
    """Function-preserving: `channels` channels of each block's ln1 and ln2 output times `scale`, the
    consuming Linears' weight columns divided by it. The channels are the ones the consumers weigh most,
    so they carry signal (a scaled dead channel would be harmless)."""
    for block in model.blocks:
        for norm, consumers in ((block.ln1, (block.attn.q, block.attn.k, block.attn.v)), (block.ln2, (block.fc1,))):
            importance = sum(consumer.weight.abs().sum(0) for consumer in consumers)
            picked = importance.topk(channels).indices
            norm.weight[picked] *= scale
            norm.bias[picked] *= scale
            for consumer in consumers:
                consumer.weight[:, picked] /= scale


def outlier_transformer(checkpoint: str | None = str(CHECKPOINT)) -> DigitsTransformer:
    """The test model (outliers included); loads the shipped weights unless `checkpoint` is None."""
    model = DigitsTransformer()
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


def train(
    epochs: int = 30,
    seed: int = 0,
    outlier_scale: float = 40.0,
    outlier_channels: int = 4,
    out: Path | None = CHECKPOINT,
) -> tuple[DigitsTransformer, float, float]:
    """Seeded training on the digits training part, then the outliers; returns the model, its evaluation
    accuracy and the largest relative change of its outputs that the outliers caused."""
    torch.manual_seed(seed)
    images, labels = _digits_tensors()
    split = _split_indices(seed=0, calibration_size=256, evaluation_size=450)
    model = fit(
        DigitsTransformer(), images[split["training"]], labels[split["training"]], epochs, 64, 2e-3, seed
    ).eval()
    eval_x, eval_y = images[split["evaluation"]], labels[split["evaluation"]]
    with torch.no_grad():
        before = model(eval_x)
        add_outliers(model, outlier_scale, outlier_channels)
        after = model(eval_x)
    change = ((after - before).abs().max() / before.abs().max()).item()
    accuracy = (after.argmax(1) == eval_y).float().mean().item()
    if out is not None:
        torch.save(model.state_dict(), out)
    return model, accuracy, change


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Re-train the shipped outlier_transformer checkpoint (seeded).")
    parser.add_argument("--out", type=Path, default=CHECKPOINT)
    args = parser.parse_args()
    _, acc, change = train(out=args.out)
    print(
        f"evaluation accuracy {acc:.4f}; outliers changed the outputs by {change:.1e} (relative); wrote {args.out} "
        f"({args.out.stat().st_size} bytes)"
    )
