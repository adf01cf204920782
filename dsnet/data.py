"""Image classification data for supernet and gate training: nothing is downloaded at run time.

Contract
--------
``load_data(source, input_size)`` returns a :class:`Splits` (``train``, ``val`` datasets of
``(image[3, S, S] float32, label int)``, ``classes``):

- ``source="digits"``: scikit-learn's handwritten digits (1797 real 8x8 scans of 10 digits, shipped
  inside the scikit-learn package), upsampled bilinearly to ``S`` and repeated over 3 channels; a
  fixed stratified 80/20 split. The demo and test data.
- ``source=<folder>``: an ImageFolder in ImageNet layout, ``<folder>/train/<class>/*.jpg`` and
  ``<folder>/val/<class>/*.jpg``: shorter side resized to ``S / 0.875``, centre crop ``S``,
  ImageNet mean/std normalisation. Images are read lazily, one at a time.

Bad input raises :class:`DataError` with one line naming the path and what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A data source that cannot be read: missing folder, wrong layout, no images."""


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    classes: list[str]
    source: str


def load_data(source: str | Path, input_size: int) -> Splits:
    if str(source) == "digits":
        return digits(input_size)
    return image_folder(Path(source), input_size)


def digits(input_size: int, val_fraction: float = 0.2, seed: int = 0) -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, va = train_test_split(np.arange(len(y)), test_size=val_fraction, stratify=d.target, random_state=seed)
    tr, va = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(va))
    return Splits(TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]),
                  [str(c) for c in d.target_names], "digits")


class ImageFolder(Dataset):
    """``root/<class>/<image>``: classes sorted by name, labels their index."""

    def __init__(self, root: Path, input_size: int, classes: list[str] | None = None):
        _check_folder(root)
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.classes = classes if classes is not None else found
        if not self.classes:
            raise DataError(f"{root} has no class subfolders: expected {root}/<class>/<image>")
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise DataError(f"{root} has classes not in the training split: {', '.join(unknown[:5])}")
        self.items = [(p, i) for i, c in enumerate(self.classes) if (root / c).is_dir()
                      for p in sorted((root / c).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.items:
            raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.input_size = input_size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                s = self.input_size
                short = round(s / 0.875)
                w, h = im.size
                scale = short / min(w, h)
                im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
                a = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        return (a - self.mean) / self.std, label


def _check_folder(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise DataError(f"data folder {root} is a file, not a folder: expected {root}/train/<class>/<image>")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")


def image_folder(root: Path, input_size: int) -> Splits:
    _check_folder(root)
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DataError(f"data folder {root} lacks {' and '.join(missing)}/: expected the ImageNet layout "
                        f"{root}/train/<class>/<image> and {root}/val/<class>/<image>")
    train = ImageFolder(root / "train", input_size)
    val = ImageFolder(root / "val", input_size, train.classes)
    return Splits(train, val, train.classes, str(root))
