"""Classification metrics from a confusion matrix, in torch (DESIGN section 8).

Averaging, stated once: `accuracy` is micro (correct / all, equal to micro P/R/F1 for single-label
data); `macro_*` is the unweighted mean over classes; `weighted_*` weights each class by its
support (true count). A class with no predictions (no support) gets precision (recall) 0, like
scikit-learn's zero_division=0; macro means run over the classes that occur in the truth or the
predictions, as scikit-learn's do when it infers the labels from the data.
"""
from __future__ import annotations

import torch


def confusion_matrix(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (num_classes, num_classes) int64; rows = true class, columns = predicted class.

    target, pred: (n,) integer labels in [0, num_classes)."""
    target, pred = torch.as_tensor(target).reshape(-1).long(), torch.as_tensor(pred).reshape(-1).long()
    if target.shape != pred.shape:
        raise ValueError(f"target and pred must have the same length, got {target.numel()} and {pred.numel()}")
    for name, t in (("target", target), ("pred", pred)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got range [{int(t.min())}, {int(t.max())}]")
    idx = target * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(a, b):
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def metrics_from_confusion(cm: torch.Tensor, classes: list[str] | None = None) -> dict:
    """All metrics of one confusion matrix (counts, rows = truth) as plain Python numbers.

    Returns accuracy, macro_/weighted_ precision/recall/f1, per_class {name: {precision, recall,
    f1, support}}, confusion (counts) and confusion_normalized (rows sum to 1; rows of absent
    classes are 0), n."""
    cm = torch.as_tensor(cm).double()
    k = cm.shape[0]
    classes = list(classes) if classes is not None else [str(i) for i in range(k)]
    tp = cm.diagonal()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    n = cm.sum()
    present = (support + predicted) > 0  # sklearn averages over labels present in y_true or y_pred
    out = {"n": int(n), "accuracy": float(tp.sum() / n) if n > 0 else 0.0}
    for name, v in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[f"macro_{name}"] = float(v[present].mean()) if present.any() else 0.0
        out[f"weighted_{name}"] = float((v * support).sum() / n) if n > 0 else 0.0
    out["per_class"] = {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                            "support": int(support[i])} for i, c in enumerate(classes)}
    out["confusion"] = cm.long().tolist()
    out["confusion_normalized"] = _safe_div(cm, support[:, None].expand_as(cm)).tolist()
    return out


def classification_metrics(target, pred, num_classes: int, classes: list[str] | None = None) -> dict:
    """`metrics_from_confusion` of labels target, pred (n,)."""
    return metrics_from_confusion(confusion_matrix(target, pred, num_classes), classes)


def format_report(m: dict) -> str:
    """Per-class table plus the averaged rows, as text."""
    width = max([len(c) for c in m["per_class"]] + [12]) + 2
    lines = ["class".ljust(width) + f"{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for c, r in m["per_class"].items():
        lines.append(c.ljust(width) + f"{r['precision']:10.4f}{r['recall']:10.4f}{r['f1']:10.4f}{r['support']:9d}")
    lines.append("")
    for avg in ("macro", "weighted"):
        lines.append(f"{avg} avg".ljust(width) + f"{m[avg + '_precision']:10.4f}{m[avg + '_recall']:10.4f}"
                     f"{m[avg + '_f1']:10.4f}{m['n']:9d}")
    lines.append("accuracy (micro)".ljust(width) + f"{m['accuracy']:30.4f}{m['n']:9d}")
    return "\n".join(lines)
