"""Decode images to tensors, an in-memory dataset of a split, and the training augmentation."""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile

from .formats import Sample

# ImageNet statistics for 3-channel (pretrained) models; a neutral centring for grayscale.
NORM = {1: ((0.5,), (0.25,)), 3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


class ImageReadError(OSError):
    """An image file could not be decoded; the message names the file."""


def open_image(path: str) -> Image.Image:
    """The decoded PIL image (fully loaded, so truncation is detected here), or ImageReadError."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for bad files
        raise ImageReadError(f"cannot read image {path}: {e}") from None


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """8-bit L (channels=1) or RGB (channels=3); 16-bit and float images are rescaled to 0..255."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / scale * 255.0, 0, 255).astype(np.uint8), mode="L")
    return im.convert("L" if channels == 1 else "RGB")


def pixel_hash(im: Image.Image) -> str:
    """Hash of the decoded pixels: equal for the same picture saved in different files or formats."""
    return hashlib.sha1(im.mode.encode() + repr(im.size).encode() + im.tobytes()).hexdigest()


def load_split(samples: list[Sample], image_size: int, channels: int, name: str = "data"):
    """Decode and resize every sample once: (uint8 tensor (n, C, S, S), labels (n,), kept samples).

    Unreadable files are skipped with one warning naming each; mixed modes (grayscale, RGB,
    16-bit) are converted to `channels` with one warning for the split."""
    images, labels, kept, modes = [], [], [], {}
    for s in samples:
        try:
            im = open_image(s.path)
        except ImageReadError as e:
            warnings.warn(f"{name}: skipping {e}", RuntimeWarning, stacklevel=2)
            continue
        modes[im.mode] = modes.get(im.mode, 0) + 1
        im = to_mode(im, channels)
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        images.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        labels.append(s.label)
        kept.append(s)
    if len(modes) > 1 or any(m not in ("L", "RGB", "P") for m in modes):
        warnings.warn(f"{name}: images come in modes {modes}; all converted to "
                      f"{'8-bit grayscale' if channels == 1 else '8-bit RGB'}", RuntimeWarning, stacklevel=2)
    if not images:
        return torch.empty(0, channels, image_size, image_size, dtype=torch.uint8), torch.empty(0, dtype=torch.long), kept
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), kept


class TensorImageDataset(torch.utils.data.Dataset):
    """Decoded uint8 images held in memory; items are (uint8 (C, S, S), label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, samples=None):
        self.images, self.labels, self.samples = images, labels, samples

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def normalize(batch: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, H, W) standardised per channel."""
    x = batch.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal / vertical flips and 90-degree turns per sample (B, C, S, S); defects have
    no preferred orientation. Draws from `generator` only, so runs are reproducible."""
    b = batch.shape[0]
    r = torch.randint(0, 8, (b,), generator=generator).tolist()
    out = []
    for x, k in zip(batch, r):
        if k & 1:
            x = x.flip(-1)
        if k & 2:
            x = x.flip(-2)
        if k & 4:
            x = x.transpose(-1, -2)
        out.append(x)
    return torch.stack(out)
