"""Images on disk, ImageNet style: root/<class>/*.png|jpg, labelled by sorted class-folder index.

Standard evaluation transforms without torchvision (it does not import beside torch 2.13.0+cpu): PIL
resizes the shorter side and center-crops, then torch ops scale to [0, 1] and normalize per channel.
Images are decoded lazily, a batch at a time, in DataLoader worker processes (data.num_workers, set on
the sources by the load stage): memory holds a few batches whatever the folder's size. The calibration
and evaluation parts are disjoint seeded subsets (data.factory.seed); their fingerprints (the cache keys)
name the files (path, size, mtime), the transform settings and the indices, without decoding anything.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.errors import ConfigError, closest
from pipeline.paths import path_status
from stages.sources.split import split_indices
from stages.types import DataBundle, DatasetBatches

log = logging.getLogger(__name__)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "lanczos")


def find_images(root: str, extensions: list[str]) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class names and (image file, class index) pairs; ConfigError if the layout is not root/<class>/*."""
    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError(
            f"data.factory.root='{root}' is not a folder (it {path_status(folder)}; resolved: {folder.resolve()}); "
            f"give the folder that holds one sub-folder of images per class (root/<class>/*.png)."
        )
    suffixes = {extension.lower() for extension in extensions}
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        loose = [f.name for f in folder.iterdir() if f.suffix.lower() in suffixes][:3]
        raise ConfigError(
            f"data.factory.root='{root}' has no class sub-folders; expected root/<class>/<image> "
            f"(one folder per class, labelled by sorted name)"
            + (f", but found images directly in it ({loose}...): move them into class folders." if loose else ".")
        )
    samples: list[tuple[Path, int]] = []
    empty = []
    for index, name in enumerate(classes):
        files = sorted(f for f in (folder / name).iterdir() if f.is_file() and f.suffix.lower() in suffixes)
        if not files:
            empty.append(name)
        samples.extend((file, index) for file in files)
    if empty:
        raise ConfigError(
            f"data.factory.root='{root}': class folder(s) {empty} hold no images with "
            f"data.factory.extensions={sorted(suffixes)}; every class needs at least one image "
            f"(remove the empty folders, or add the extension)."
        )
    return classes, samples


def _load_image(file: Path, grayscale: bool, resize: int | None, crop: int | None, resample: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as opened:
            image = opened.convert("L" if grayscale else "RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ConfigError(f"data.factory.root: '{file}' cannot be read as an image: {error}") from error
    if resize is not None:  # the shorter side becomes `resize`, like torchvision's Resize(int)
        width, height = image.size
        scale = resize / min(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), resample)
    if crop is not None:
        width, height = image.size
        if crop > min(width, height):
            raise ConfigError(
                f"data.factory.crop={crop} is larger than '{file}' after resizing ({width}x{height}); "
                f"use a crop no larger than data.factory.resize."
            )
        left, top = round((width - crop) / 2), round((height - crop) / 2)
        image = image.crop((left, top, left + crop, top + crop))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.size[1], image.size[0], -1).permute(2, 0, 1).float() / 255.0


def image_folder_data(
    root: str,
    resize: int | None = 256,
    crop: int | None = 224,
    grayscale: bool = False,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    interpolation: str = "bilinear",
    extensions: list[str] | None = None,
    calibration_size: int | None = None,
    calibration_fraction: float = 0.5,
    evaluation_size: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> DataBundle:
    """Calibration and evaluation batches from root/<class>/*; labels are sorted class-folder indices."""
    from PIL import Image

    extensions = list(extensions or [".png", ".jpg", ".jpeg"])
    channels = 1 if grayscale else 3
    mean = list(mean) if mean is not None else ([0.5] if grayscale else [0.485, 0.456, 0.406])
    std = list(std) if std is not None else ([0.5] if grayscale else [0.229, 0.224, 0.225])
    for key, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise ConfigError(
                f"data.factory.{key}={values} has {len(values)} values; give 1 or {channels} "
                f"({'grayscale' if grayscale else 'RGB'} images, data.factory.grayscale={grayscale})."
            )
    if any(value <= 0 for value in std):
        raise ConfigError(f"data.factory.std={std} must be positive.")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"data.factory.interpolation='{interpolation}' is not valid; choose one of {list(INTERPOLATIONS)}."
            f"{closest(interpolation, INTERPOLATIONS)}"
        )
    if batch_size < 1:
        raise ConfigError(f"data.factory.batch_size={batch_size} must be >= 1.")
    resample = getattr(Image.Resampling, interpolation.upper())
    classes, samples = find_images(root, extensions)
    calibration, evaluation = split_indices(
        len(samples),
        seed,
        calibration_size,
        calibration_fraction,
        evaluation_size,
        f"data.factory.root='{root}' ({len(samples)} images in {len(classes)} classes)",
    )
    dataset = ImageFolderDataset(samples, grayscale, resize, crop, resample, mean, std)
    example, _ = dataset[calibration[0]]
    dataset.shape = tuple(example.shape)
    settings = repr((resize, crop, grayscale, mean, std, interpolation))

    def identity() -> str:  # the files as they are now, and how they are decoded: computed once per source
        files = "\n".join(f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}:{label}" for path, label in samples)
        return f"{Path(root).resolve()}|{settings}|{files}"

    log.info(
        "image folder %s: %d classes %s, %d calibration and %d evaluation images of shape %s (decoded per batch)",
        root,
        len(classes),
        classes[:10],
        len(calibration),
        len(evaluation),
        list(example.shape),
    )
    return DataBundle(
        name=f"image_folder_{Path(root).resolve().name}",
        calibration=DatasetBatches(dataset, calibration, batch_size, identity=identity),
        evaluation=DatasetBatches(dataset, evaluation, batch_size, identity=identity),
        example_inputs=(example.unsqueeze(0),),
        has_labels=True,
    )


class ImageFolderDataset:
    """`dataset[i]` = (normalized image tensor, class index) of the i-th (file, label); picklable, so
    DataLoader workers decode. Every image must come out in `shape` (set from the first one)."""

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        grayscale: bool,
        resize: int | None,
        crop: int | None,
        resample: int,
        mean: list[float],
        std: list[float],
    ) -> None:
        self.samples = samples
        self.grayscale, self.resize, self.crop, self.resample = grayscale, resize, crop, resample
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        file, label = self.samples[index]
        image = (_load_image(file, self.grayscale, self.resize, self.crop, self.resample) - self.mean) / self.std
        if self.shape is not None and tuple(image.shape) != self.shape:
            raise ConfigError(
                f"data.factory.root: '{file}' comes out in shape {list(image.shape)}, other images in "
                f"{list(self.shape)}; set data.factory.crop to a size so every image is cropped to the same square."
            )
        return image, label
