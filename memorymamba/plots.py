"""PNG figures of a run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_confusion(counts, normalized, classes, path: str, title: str = "") -> None:
    """Two panels: confusion counts and the row-normalised matrix (rows = true class)."""
    k = len(classes)
    size = max(4.0, 0.6 * k + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, mat, name, fmt in ((axes[0], counts, "counts", "{:d}"), (axes[1], normalized, "row-normalised", "{:.2f}")):
        im = ax.imshow(mat, cmap="Blues", vmin=0)
        ax.set_title(name)
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        top = max(max(r) for r in mat) or 1
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, fmt.format(mat[i][j]), ha="center", va="center", fontsize=7,
                            color="white" if mat[i][j] > 0.6 * top else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: list[dict], path: str) -> None:
    """Loss and accuracy per epoch (train and validation)."""
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train (total loss)")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val (cross-entropy)")
    a.set_xlabel("epoch"); a.set_ylabel("loss"); a.legend()
    b.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    b.plot(ep, [h["val_acc"] for h in history], "o-", label="val")
    b.set_xlabel("epoch"); b.set_ylabel("accuracy"); b.set_ylim(0, 1.01); b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
