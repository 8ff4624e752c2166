"""VMamba's 4-direction cross scan of a feature map and its adjoint, the cross merge.

Directions over L = H*W positions: 0 row-major flatten, 1 column-major flatten (transpose, then
flatten), 2 = 0 reversed, 3 = 1 reversed. cross_merge is the adjoint (transpose) of cross_scan:
<cross_scan(x), ys> == <x, cross_merge(ys)>, i.e. y = y0 + flip(y2) + T(y1 + flip(y3)).
"""
from __future__ import annotations

import torch

from memorymamba.ops._dispatch import pick_backend

K_DIRECTIONS = 4


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _cross_scan_torch(x):
    row = x.flatten(2)
    col = x.transpose(2, 3).flatten(2)
    return torch.stack([row, col, row.flip(-1), col.flip(-1)], dim=1)


def _cross_merge_torch(ys, H, W):
    B, _, C, L = ys.shape
    fwd = ys[:, 0:2] + ys[:, 2:4].flip(-1)
    return fwd[:, 0].reshape(B, C, H, W) + fwd[:, 1].reshape(B, C, W, H).transpose(2, 3)


def cross_scan(x, *, backend=None):
    """x (B, C, H, W) -> xs (B, 4, C, H*W), the four scan orders of x (module docstring)."""
    _check_tensor("x", x)
    if x.dim() != 4 or min(x.shape) < 1:
        raise ValueError(f"x must have shape (B, C, H, W) with every size >= 1, got {tuple(x.shape)}")
    pick_backend("cross_scan", backend, x)  # pure PyTorch only: raises for an explicit kernel backend
    return _cross_scan_torch(x)


def cross_merge(ys, H=None, W=None, *, backend=None):
    """ys (B, 4, C, H, W), or (B, 4, C, H*W) with H and W given -> y (B, C, H, W).

    A 5-D ys is read as its flat (B, 4, C, H*W) layout (as VMamba's CrossMerge does): direction 1
    and 3 entries are in column-major order whatever the trailing (H, W) shape suggests.
    """
    _check_tensor("ys", ys)
    if ys.dim() in (4, 5) and (ys.shape[1] != K_DIRECTIONS or min(ys.shape) < 1):
        raise ValueError(f"ys must have 4 directions in dim 1 and sizes >= 1, got shape {tuple(ys.shape)}")
    if ys.dim() == 5:
        if H is not None and (H, W) != tuple(ys.shape[3:]):
            raise ValueError(f"H, W = ({H}, {W}) must match ys's last two sizes {tuple(ys.shape[3:])}")
        H, W = ys.shape[3:]
        ys = ys.flatten(3)
    elif ys.dim() == 4:
        if H is None or W is None:
            raise ValueError(f"H and W must be given when ys has shape (B, 4, C, L), got H={H}, W={W}")
        if H < 1 or W < 1 or H * W != ys.shape[3]:
            raise ValueError(f"ys must have shape (B, 4, C, H*W) = (B, 4, C, {H * W}) for H={H}, W={W}, "
                             f"got {tuple(ys.shape)}")
    else:
        raise ValueError(f"ys must have rank 5 (B, 4, C, H, W) or 4 (B, 4, C, H*W), got shape {tuple(ys.shape)}")
    pick_backend("cross_scan", backend, ys)  # pure PyTorch only: raises for an explicit kernel backend
    return _cross_merge_torch(ys, H, W)
