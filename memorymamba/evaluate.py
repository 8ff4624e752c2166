"""Evaluation: metrics of a model on a split (sharded over ranks, counts summed), report files."""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from .metrics import format_report, metrics_from_confusion


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, batch_size: int, device, mean, std, amp_dtype=None) -> torch.Tensor:
    """Logits (n, num_classes) float32 of uint8 images (n, C, S, S), in batches, eval mode."""
    from .data import normalize
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size].to(device), mean, std)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast("cpu", enabled=False):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate_tensors(net, images, labels, classes, cfg, d, mean, std) -> dict:
    """Metrics (see metrics_from_confusion) plus "loss" (mean unweighted CE) of images/labels.
    Under DDP each rank takes every world-th sample (no padding, so no sample counts twice) and the
    confusion counts and loss sums are all-reduced."""
    model = net.module if hasattr(net, "module") else net
    idx = torch.arange(d.rank, len(labels), d.world)
    logits = predict_logits(model, images[idx], cfg.batch_size, d.device, mean, std)
    y = labels[idx]
    k = len(classes)
    cm = torch.bincount(y * k + logits.argmax(1), minlength=k * k).reshape(k, k).double() if len(y) else torch.zeros(k, k, dtype=torch.float64)
    loss_sum = F.cross_entropy(logits, y, reduction="sum").double().reshape(1) if len(y) else torch.zeros(1, dtype=torch.float64)
    cm = d.all_sum(cm)
    loss_sum = d.all_sum(loss_sum)
    m = metrics_from_confusion(cm, classes)
    m["loss"] = float(loss_sum / max(1, m["n"]))
    return m


def write_report(report: dict, out_dir: str, history: list[dict] | None = None) -> None:
    """report.json, confusion.png (counts + row-normalised) and, with a history, curves.png."""
    from .plots import plot_confusion, plot_curves
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "report.json"))
    m = report["test"]
    plot_confusion(m["confusion"], m["confusion_normalized"], list(m["per_class"]), os.path.join(out_dir, "confusion.png"),
                   title=f"{report.get('model', '')} {report.get('split', 'test')}: accuracy {m['accuracy']:.3f}")
    if history:
        plot_curves(history, os.path.join(out_dir, "curves.png"))


def evaluate_checkpoint(checkpoint: str, data: str | None = None, split: str = "test", format: str | None = None,
                        output: str | None = None, device: str = "auto", batch_size: int | None = None) -> dict:
    """Evaluate a run checkpoint on `split` of its own data (or of `data`); writes report.json and
    confusion.png to `output` (default: <run>/eval-<split>/) and returns the report."""
    from .config import TrainConfig
    from .data import DataError, prepare
    from .train import Dist, RunError, build_model, load_checkpoint
    ckpt = load_checkpoint(checkpoint)
    cfg = TrainConfig(**ckpt["config"])
    if data:
        cfg.data = data
    if format:
        cfg.format = format
    if batch_size:
        cfg.batch_size = batch_size
    cfg.pretrained = None
    if split not in ("train", "val", "test"):
        raise DataError(f"--split must be train, val or test, got {split!r}")
    prepared = prepare(cfg, splits=(split,))
    if prepared.classes != ckpt["classes"]:
        raise RunError(f"checkpoint {ckpt['path']} has {len(ckpt['classes'])} classes {ckpt['classes']}, "
                       f"but {prepared.root} has {len(prepared.classes)}: {prepared.classes}")
    d = Dist(device)
    model, _ = build_model(cfg, len(ckpt["classes"]), cfg.channels)
    model.load_state_dict(ckpt["model"])
    model.to(d.device)
    mean, std = ckpt["norm"]
    m = evaluate_tensors(model, prepared.images[split], prepared.labels[split], prepared.classes, cfg, d, mean, std)
    out_dir = output or os.path.join(os.path.dirname(ckpt["path"]), f"eval-{split}")
    report = {"checkpoint": ckpt["path"], "model": cfg.model, "data": prepared.root, "split": split,
              "epoch": ckpt["epoch"], "test": m}
    if d.main:
        write_report(report, out_dir)
        print(format_report(m))
        print(f"{split} accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}  -> {out_dir}")
    d.close()
    return report
