"""MemoryMamba's training objective (paper eq. 23-25):

    L = CE(logits, target) + lambda_c * L_contrastive + lambda_f * L_NCE

L_contrastive (coarse memory, eq. 23). For each block with a coarse memory, the prototype of class k
is the mean query-logit vector h_c over the batch's samples of class k. For every ordered pair (k, j)
of distinct classes present in the batch the loss is max(0, cos(proto_k, proto_j) - margin); the
block's loss is the mean over those K(K-1) pairs and L_contrastive the mean over blocks. The paper
prints max(0, margin - cos), which is smallest when different classes' prototypes point the same
way, i.e. it would pull classes together; the hinge used here pushes different classes' memory
queries apart until their cosine is at most `margin`, which is what the text says the loss is for.
A batch with fewer than two classes contributes 0.

L_NCE (fine memory, eq. 24). For each block with a fine memory, with z_i the pooled features and
g_i the fine network's projection of its readout M_f_bar for sample i, logits s_ij = cos(z_i, g_j) / T
and the loss is the mean over i of cross-entropy(s_i, i): the positive is the sample's own memory
readout, the negatives the other samples' readouts in the batch. L_NCE is the mean over blocks; a
batch of one sample contributes 0.

Defaults: lambda_c = lambda_f = 0.1 keep the auxiliary terms an order below the classification loss
(at initialisation each is O(1), like CE), margin 0 (different classes' prototypes at most
orthogonal), temperature 0.5 (DESIGN section 2).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

COS_EPS = 1e-8


def _check_number(name: str, value, *, low: float = 0.0, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    return float(value)


def coarse_contrastive_loss(h_c: torch.Tensor, target: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Corrected eq. 23 for one block: mean over ordered pairs of distinct present classes of
    max(0, cos(proto_k, proto_j) - margin), proto_k = mean h_c of class k in the batch.

    h_c (B, c) coarse query logits; target (B,) class indices. Returns a scalar (0 if < 2 classes).
    """
    if h_c.dim() != 2:
        raise ValueError(f"h_c must have shape (batch, c), got {tuple(h_c.shape)}")
    if target.shape != (h_c.shape[0],):
        raise ValueError(f"target must have shape (batch,) = ({h_c.shape[0]},), got {tuple(target.shape)}")
    with torch.autocast(h_c.device.type, enabled=False):  # losses in fp32 whatever the forward ran in
        return _coarse_contrastive(h_c.float(), target, margin)


def _coarse_contrastive(h: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    classes, index = torch.unique(target, return_inverse=True)
    K = classes.numel()
    if K < 2:
        return h.sum() * 0.0
    sums = h.new_zeros(K, h.shape[1]).index_add_(0, index, h)
    counts = torch.bincount(index, minlength=K).to(h.dtype)
    protos = F.normalize(sums / counts[:, None], dim=1, eps=COS_EPS)
    cos = protos @ protos.t()
    off_diagonal = ~torch.eye(K, dtype=torch.bool, device=h.device)
    return F.relu(cos[off_diagonal] - margin).mean()


def fine_infonce_loss(z: torch.Tensor, g: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Eq. 24 for one block: InfoNCE with logits cos(z_i, g_j) / temperature, positives on the diagonal.

    z (B, D) pooled features; g (B, D) projection of the fine readout. Returns a scalar (0 if B == 1).
    """
    if z.dim() != 2 or g.shape != z.shape:
        raise ValueError(f"z and g must have the same shape (batch, D), got {tuple(z.shape)} and {tuple(g.shape)}")
    B = z.shape[0]
    if B < 2:
        return (z.sum() + g.sum()) * 0.0
    with torch.autocast(z.device.type, enabled=False):  # losses in fp32 whatever the forward ran in
        logits = F.normalize(z.float(), dim=1, eps=COS_EPS) @ F.normalize(g.float(), dim=1, eps=COS_EPS).t()
        return F.cross_entropy(logits / temperature, torch.arange(B, device=z.device))


class MemoryMambaLoss(nn.Module):
    """L = CE + lambda_c * L_contrastive + lambda_f * L_NCE (see the module docstring).

    Call: `loss, parts = criterion(logits, target, aux)` with logits (B, num_classes), target (B,)
    class indices and aux the MemoryAux of `model(x, return_aux=True)` (or None when both memories
    are off: then the memory terms are 0). parts = {"cls", "contrastive", "nce"}: detached scalar
    tensors of the unweighted terms (call .item() when logging).
    class_weight: optional (num_classes,) CE weights; label_smoothing for CE (default 0).
    """

    def __init__(self, lambda_c: float = 0.1, lambda_f: float = 0.1, margin: float = 0.0,
                 temperature: float = 0.5, class_weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.lambda_c = _check_number("lambda_c", lambda_c)
        self.lambda_f = _check_number("lambda_f", lambda_f)
        self.margin = _check_number("margin", margin, low=-1.0)
        if self.margin > 1:
            raise ValueError(f"margin must be in [-1, 1] (it is compared with a cosine), got {margin!r}")
        self.temperature = _check_number("temperature", temperature, low_open=True)
        self.label_smoothing = _check_number("label_smoothing", label_smoothing)
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight, dtype=torch.float32)
            if class_weight.dim() != 1 or not torch.isfinite(class_weight).all() or (class_weight < 0).any():
                raise ValueError(f"class_weight must be a 1-D tensor of finite weights >= 0, got {class_weight}")
        self.register_buffer("class_weight", class_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, aux=None):
        """logits (B, num_classes), target (B,), aux MemoryAux | None -> (loss scalar, parts dict)."""
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape (batch, num_classes), got {tuple(logits.shape)}")
        if target.shape != (logits.shape[0],) or target.dtype != torch.long:
            raise ValueError(f"target must be a long tensor of shape (batch,) = ({logits.shape[0]},), "
                             f"got {target.dtype} {tuple(target.shape)}")
        if self.class_weight is not None and self.class_weight.numel() != logits.shape[1]:
            raise ValueError(f"class_weight must have num_classes = {logits.shape[1]} entries, "
                             f"got {self.class_weight.numel()}")
        weight = None if self.class_weight is None else self.class_weight.to(logits.device)
        cls = F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=self.label_smoothing)
        zero = logits.new_zeros((), dtype=torch.float32)
        coarse = aux.coarse if aux is not None else []
        fine = aux.fine if aux is not None else []
        contrastive = (torch.stack([coarse_contrastive_loss(h, target, self.margin) for h in coarse]).mean()
                       if coarse else zero)
        nce = torch.stack([fine_infonce_loss(z, g, self.temperature) for z, g in fine]).mean() if fine else zero
        loss = cls + self.lambda_c * contrastive + self.lambda_f * nce
        parts = {"cls": cls.detach(), "contrastive": contrastive.detach(), "nce": nce.detach()}
        return loss, parts

    def extra_repr(self) -> str:
        return (f"lambda_c={self.lambda_c}, lambda_f={self.lambda_f}, margin={self.margin}, "
                f"temperature={self.temperature}, label_smoothing={self.label_smoothing}")
