"""`memorymamba predict`: class probabilities of images (a file, a folder or a glob) into a CSV."""
from __future__ import annotations

import csv
import glob
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image

from .data import DataError, ImageReadError, open_image
from .data.formats import IMAGE_EXTS
from .data.images import to_mode


def collect_images(source: str) -> list[str]:
    """Image paths of a file, a folder (recursive) or a glob pattern, sorted; DataError if none."""
    if any(c in source for c in "*?["):
        paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(source):
        paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(source) for f in fs)
    elif os.path.isfile(source):
        return [source]
    else:
        raise DataError(f"{source} is neither an image file, a folder nor a glob that matches anything")
    images = [p for p in paths if p.lower().endswith(IMAGE_EXTS)]
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found in {source}")
    return images


def predict(checkpoint: str, source: str, output: str | None = None, top_k: int = 3, batch_size: int = 64,
            device: str = "auto") -> list[dict]:
    """Rows {path, class, probability, top_k} for every readable image of `source`, written as CSV
    to `output` (default: stdout). top_k is "class:prob;class:prob;..." in decreasing probability."""
    from .config import TrainConfig
    from .data import normalize
    from .train import build_model, load_checkpoint
    ckpt = load_checkpoint(checkpoint)
    cfg = TrainConfig(**ckpt["config"])
    cfg.pretrained = None
    classes = ckpt["classes"]
    if top_k < 1:
        raise DataError(f"--top-k must be >= 1, got {top_k}")
    top_k = min(top_k, len(classes))
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model, _ = build_model(cfg, len(classes), cfg.channels)
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    mean, std = ckpt["norm"]
    paths, arrays = [], []
    for p in collect_images(source):
        try:
            im = to_mode(open_image(p), cfg.channels)
        except ImageReadError as e:
            warnings.warn(f"skipping {e}", RuntimeWarning, stacklevel=2)
            continue
        im = im.resize((cfg.image_size, cfg.image_size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        paths.append(p)
    if not paths:
        raise DataError(f"none of the images in {source} could be read")
    rows = []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            x = normalize(torch.from_numpy(np.stack(arrays[i:i + batch_size])).to(dev), mean, std)
            prob = model(x).float().softmax(1).cpu()
            p, c = prob.topk(top_k, dim=1)
            for j in range(len(x)):
                rows.append({"path": paths[i + j], "class": classes[c[j, 0]], "probability": round(float(p[j, 0]), 6),
                             "top_k": ";".join(f"{classes[c[j, t]]}:{float(p[j, t]):.4f}" for t in range(top_k))})
    f = open(output, "w", newline="") if output else sys.stdout
    try:
        w = csv.DictWriter(f, fieldnames=["path", "class", "probability", "top_k"])
        w.writeheader()
        w.writerows(rows)
    finally:
        if output:
            f.close()
    return rows
