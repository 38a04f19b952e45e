"""The embedded default: scikit-learn's 8x8 handwritten digits and a small residual CNN.

The data set ships inside scikit-learn's wheel (no download). It is split once, deterministically,
into training, calibration and evaluation parts that never overlap. The float checkpoint next to
this file was produced by `python -m stages.sources.digits` (seeded; re-run it to reproduce).
"""

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.types import Batch, DataBundle

log = logging.getLogger(__name__)

CHECKPOINT = Path(__file__).with_name("digits_cnn.pt")
NUM_SAMPLES = 1797  # what sklearn.datasets.load_digits returns


class ResidualBlock(nn.Module):
    """conv-bn-relu, conv-bn, then a residual add and relu: the pattern FX fuses and lowers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + x)


class DigitsCNN(nn.Module):
    """A 1x8x8 -> 10 classifier: stem, two residual stages, pooling, linear head (~25k parameters)."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = ResidualBlock(width)
        self.pool = nn.MaxPool2d(2)
        self.widen = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.block2 = ResidualBlock(2 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        x = self.block2(self.widen(self.pool(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def digits_cnn(checkpoint: str | None = str(CHECKPOINT), width: int = 16) -> DigitsCNN:
    """The default model; loads the shipped float weights unless `checkpoint` is None."""
    model = DigitsCNN(width=width)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


def _split_indices(seed: int, calibration_size: int, evaluation_size: int) -> dict[str, np.ndarray]:
    if calibration_size < 1 or evaluation_size < 1 or calibration_size + evaluation_size >= NUM_SAMPLES:
        raise ValueError(
            f"data.calibration_size={calibration_size} and data.evaluation_size={evaluation_size} must each be "
            f">= 1 and together leave samples for training (the digits set has {NUM_SAMPLES})."
        )
    order = np.random.default_rng(seed).permutation(NUM_SAMPLES)
    return {
        "evaluation": order[:evaluation_size],
        "calibration": order[evaluation_size : evaluation_size + calibration_size],
        "training": order[evaluation_size + calibration_size :],
    }


def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 images and labels: read straight from the CSV file scikit-learn ships (what
    load_digits reads), since importing sklearn.datasets costs about 1 s of a 2 s start; load_digits when
    the file is not where it is expected."""
    import gzip
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as file:
            table = np.loadtxt(file, delimiter=",", dtype=np.float32)
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels, target = digits.images, digits.target
    images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(target, dtype=torch.long)


def _batches(images: torch.Tensor, labels: torch.Tensor | None, batch_size: int) -> list[Batch]:
    return [
        (images[i : i + batch_size], None if labels is None else labels[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]


def upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """8x8 digits bilinearly resized to size x size (8: unchanged), for models that want larger inputs."""
    if size == images.shape[-1]:
        return images
    return nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def training_part() -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels that calibration and evaluation never see (the split digits_data uses)."""
    images, labels = _digits_tensors()
    split = _split_indices(seed=0, calibration_size=256, evaluation_size=450)
    return images[split["training"]], labels[split["training"]]


def fit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int
) -> nn.Module:
    """Seeded Adam on cross-entropy: how the small example models train themselves when loaded."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def digits_data(
    seed: int = 0, calibration_size: int = 256, evaluation_size: int = 450, batch_size: int = 32, image_size: int = 8
) -> DataBundle:
    """Calibration and evaluation batches from the digits set (the training part is left out), resized to
    image_size x image_size (bilinear; 8 is the original size)."""
    images, labels = _digits_tensors()
    images = upsample(images, image_size)
    split = _split_indices(seed, calibration_size, evaluation_size)
    calibration = split["calibration"]
    evaluation = split["evaluation"]
    return DataBundle(
        name="digits",
        calibration=_batches(images[calibration], labels[calibration], batch_size),
        evaluation=_batches(images[evaluation], labels[evaluation], batch_size),
        example_inputs=(images[calibration[:1]],),
        has_labels=True,
    )


def train(epochs: int = 40, seed: int = 0, out: Path = CHECKPOINT) -> float:
    """Train the float model on the training part only; returns its accuracy on the evaluation part."""
    torch.manual_seed(seed)
    images, labels = _digits_tensors()
    split = _split_indices(seed=0, calibration_size=256, evaluation_size=450)
    train_x, train_y = images[split["training"]], labels[split["training"]]
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * 35)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            # One-pixel random shifts: cheap augmentation that helps on 8x8 digits.
            shift = tuple(int(s) for s in torch.randint(-1, 2, (2,), generator=generator))
            batch = torch.roll(train_x[idx], shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(batch), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler.last_epoch < scheduler.total_steps - 1:
                scheduler.step()
        if (epoch + 1) % 10 == 0:
            log.info("epoch %d loss %.4f", epoch + 1, loss.item())
    model.eval()
    eval_x, eval_y = images[split["evaluation"]], labels[split["evaluation"]]
    with torch.no_grad():
        accuracy = (model(eval_x).argmax(1) == eval_y).float().mean().item()
    torch.save(model.state_dict(), out)
    return accuracy


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description="Re-train the shipped digits checkpoint (seeded).")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=CHECKPOINT)
    args = parser.parse_args()
    acc = train(epochs=args.epochs, out=args.out)
    print(f"evaluation accuracy {acc:.4f}; wrote {args.out} ({args.out.stat().st_size} bytes)")
