"""From a TrainConfig to decoded train/val/test tensors: the one path every command uses."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .formats import DataError, Sample, discover, make_splits
from .images import load_split
from .synthetic import CLASSES as SYNTHETIC_CLASSES, SyntheticSpec, ensure_synthetic


@dataclass
class PreparedData:
    """classes, root, format, and per split: uint8 images (n, C, S, S), labels (n,), samples."""
    classes: list[str]
    root: str
    format: str
    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    samples: dict[str, list[Sample]]
    skipped: list[tuple[str, str]]


def subsample_train(labels: np.ndarray, imbalance: float = 1.0, few_shot: int = 0, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded per-class subset: class i keeps n_i * imbalance**(-i/(k-1)) of its
    images (so the first class is `imbalance` times the last), then at most `few_shot` per class."""
    if imbalance < 1:
        raise DataError(f"imbalance must be >= 1 (largest/smallest class), got {imbalance}")
    if few_shot < 0:
        raise DataError(f"few_shot must be >= 0, got {few_shot}")
    rng = np.random.default_rng([seed, 7])
    classes = np.unique(labels)
    keep = []
    for i, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = len(idx)
        if imbalance > 1 and len(classes) > 1:
            n = max(1, int(round(n * imbalance ** (-i / (len(classes) - 1)))))
        if few_shot:
            n = min(n, few_shot)
        keep.append(idx[:n])
    return np.sort(np.concatenate(keep))


def synthetic_spec(cfg) -> SyntheticSpec:
    return SyntheticSpec(cfg.synthetic_train_per_class, cfg.synthetic_val_per_class, cfg.synthetic_test_per_class,
                         cfg.image_size, cfg.seed)


def prepare(cfg, splits=("train", "val", "test")) -> PreparedData:
    """Generate or discover the data of `cfg`, split it, subsample train, decode the `splits` asked for."""
    if cfg.data == "synthetic":
        root = ensure_synthetic(synthetic_spec(cfg))
        index = discover(root, "folders")
        index.classes = list(SYNTHETIC_CLASSES)  # folder order is alphabetical = canonical already
    else:
        index = discover(os.path.expanduser(cfg.data), cfg.format)
    parts = make_splits(index, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    if cfg.imbalance > 1 or cfg.few_shot:
        keep = subsample_train(np.array([s.label for s in parts["train"]]), cfg.imbalance, cfg.few_shot, cfg.split_seed)
        parts["train"] = [parts["train"][i] for i in keep]
    images, labels, samples = {}, {}, {}
    for split in splits:
        images[split], labels[split], samples[split] = load_split(parts[split], cfg.image_size, cfg.channels, split)
        if len(samples[split]) == 0:
            raise DataError(f"split {split!r} of {index.root} has no readable images")
    if "train" in splits:
        present = torch.unique(labels["train"]).numel()
        if present < 2:
            raise DataError(f"the train split of {index.root} holds a single class; classification needs at least 2")
    return PreparedData(index.classes, index.root, index.format, images, labels, samples, index.skipped)
