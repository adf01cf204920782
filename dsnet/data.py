"""Image classification data for supernet and gate training: nothing is downloaded at run time.

Contract
--------
``load_data(source, input_size)`` returns a :class:`Splits` (``train``, ``val`` datasets of
``(image[3, S, S] float32, label int)``, ``classes``):

- ``source="digits"``: scikit-learn's handwritten digits (1797 real 8x8 scans of 10 digits, shipped
  inside the scikit-learn package), upsampled bilinearly to ``S`` and repeated over 3 channels; a
  fixed stratified 80/20 split. The demo and test data.
- ``source="digits-hard"``: the same images and split, each corrupted at its own severity so that
  easy and hard images both exist (clean ones are classified far better than the most corrupted:
  per-image difficulty, what a gate can route on): :func:`corrupt` (deterministic: the image's
  index seeds it).
- ``source=<folder>``: an ImageFolder in ImageNet layout, ``<folder>/train/<class>/*.jpg`` and
  ``<folder>/val/<class>/*.jpg``: training images random-resized-cropped to ``S`` and flipped half
  the time, validation images' shorter side resized to ``S / 0.875`` and centre-cropped to ``S``;
  ImageNet mean/std normalisation. Images are read lazily, one at a time (in DataLoader workers).

Bad input raises :class:`DataError` with one line naming the path and what is wrong.
"""

from __future__ import annotations

import math
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
    """A data source that cannot be read: missing folder, wrong layout, no images. One line: a
    DataLoader worker re-raises the error with the worker's traceback as its message, of which the
    original message, its last line, is kept."""

    def __init__(self, message: str = ""):
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split(": ", 1)[1] if last.startswith(("DataError: ", "dsnet.data.DataError: ")) else last
        super().__init__(message)


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    classes: list[str]
    source: str


def load_data(source: str | Path, input_size: int) -> Splits:
    if str(source) == "digits":
        return digits(input_size)
    if str(source) == "digits-hard":
        return digits(input_size, hard=True)
    return image_folder(Path(source), input_size)


HARD_SEED = 2024  # seeds every image's severity and corruption (with the image's index)


def severity(index: int) -> float:
    """The corruption severity of digit ``index`` in [0, 1]: a third of the images clean (0), the
    rest spread uniformly over (0, 1] (seeded by the index alone)."""
    u = torch.rand(2, generator=torch.Generator().manual_seed(HARD_SEED * 100003 + index))
    return 0.0 if u[0] < 1 / 3 else float(u[1])


def corrupt(image: torch.Tensor, s: float, index: int) -> torch.Tensor:
    """``image`` (1, 8, 8) in [0, 1] at severity ``s``, at the scan's own 8x8 resolution, before the
    upsampling: each of the five corruptions applies with probability ``s`` and strength ``s``.
    Down-scaling (to 8 * (1 - s/2) px and back), blur (3x3 box, weight ``s``), a shift (up to 2 px
    each way), an occluding square (up to 4x4 px, set to the background) and Gaussian noise
    (sigma ``0.5 s``); clipped to [0, 1]. Seeded by ``index``: the same image, the same corruption."""
    if s <= 0:
        return image
    g = torch.Generator().manual_seed(HARD_SEED + 7919 * index)
    on = torch.rand(5, generator=g) < s
    x = image[None]  # (1, 1, 8, 8)
    if on[0]:
        small = max(2, round(8 * (1 - s / 2)))
        x = F.interpolate(F.interpolate(x, size=(small, small), mode="area"), size=(8, 8), mode="bilinear",
                          align_corners=False)
    if on[1]:
        x = (1 - s) * x + s * F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    if on[2]:
        dy, dx = (torch.randint(-2, 3, (2,), generator=g) * s).round().long().tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if on[3]:
        k = max(1, round(4 * s))
        y0, x0 = torch.randint(0, 9 - k, (2,), generator=g).tolist()
        x = x.clone()
        x[..., y0:y0 + k, x0:x0 + k] = 0.0
    if on[4]:
        x = x + 0.5 * s * torch.randn(x.shape, generator=g)
    return x[0].clamp(0, 1)


def digits(input_size: int, val_fraction: float = 0.2, seed: int = 0, hard: bool = False) -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if hard:
        x = torch.stack([corrupt(img, severity(i), i) for i, img in enumerate(x)])
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, va = train_test_split(np.arange(len(y)), test_size=val_fraction, stratify=d.target, random_state=seed)
    tr, va = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(va))
    return Splits(TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]),
                  [str(c) for c in d.target_names], "digits-hard" if hard else "digits")


class ImageFolder(Dataset):
    """``root/<class>/<image>``: classes sorted by name, labels their index. ``train=True``: the
    standard ImageNet training transform (random-resized crop, scale 0.08-1 and aspect ratio 3/4-4/3,
    then a horizontal flip half the time; drawn from torch's RNG, which a DataLoader seeds per
    worker); else resize and centre crop."""

    def __init__(self, root: Path, input_size: int, classes: list[str] | None = None, train: bool = False):
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
        self.input_size, self.train = input_size, train
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                im = _random_resized_crop(im.convert("RGB"), self.input_size) if self.train \
                    else _centre_crop(im.convert("RGB"), self.input_size)
                a = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        return (a - self.mean) / self.std, label


def _centre_crop(im, s: int):
    """Evaluation: the shorter side resized to ``s / 0.875``, the centre ``s`` x ``s`` cut out."""
    from PIL import Image

    short = round(s / 0.875)
    w, h = im.size
    scale = short / min(w, h)
    im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def _random_resized_crop(im, s: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Training: a random box of ``scale`` of the area and ``ratio`` aspect resized to ``s`` x ``s``
    (ten tries, else the centred largest box of a ratio in range), flipped half the time."""
    from PIL import Image

    w, h = im.size
    box = None
    for _ in range(10):
        area = w * h * float(torch.empty(1).uniform_(*scale))
        aspect = math.exp(float(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]))))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, (1,)))
            top = int(torch.randint(0, h - ch + 1, (1,)))
            box = (left, top, left + cw, top + ch)
            break
    if box is None:
        aspect = min(max(w / h, ratio[0]), ratio[1])
        cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
        cw, ch = min(cw, w), min(ch, h)
        box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    im = im.crop(box).resize((s, s), Image.BILINEAR)
    if float(torch.rand(1)) < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return im


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
    train = ImageFolder(root / "train", input_size, train=True)
    val = ImageFolder(root / "val", input_size, train.classes)
    return Splits(train, val, train.classes, str(root))
