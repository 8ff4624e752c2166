"""The Mem-SSM block: VMamba's VSSBlock (pre-norm SS2D and MLP residual branches) with a MemSS2D mixer."""
from __future__ import annotations

import torch
import torch.nn as nn

from memorymamba.nn.layers import DropPath, LayerNorm2d, Mlp
from memorymamba.nn.ss2d import SS2D


class MemSSMBlock(nn.Module):
    """x + drop_path(op(norm(x))), then x + drop_path(mlp(norm2(x))); channel-first (B, C, H, W).

    Names follow VMamba's VSSBlock (`norm`, `op`, `norm2`, `mlp.fc1`, `mlp.fc2`). `ss2d_kwargs` go to
    SS2D (d_state, ssm_ratio, memory sizes, fusion, similarity, backend, ...).
    """

    def __init__(self, dim: int, *, drop_path: float = 0.0, mlp_ratio: float = 4.0, **ss2d_kwargs):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.op = SS2D(d_model=dim, channel_first=True, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), channel_first=True)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """x (B, dim, H, W) -> (B, dim, H, W); with return_aux also the op's BlockAux."""
        if return_aux:
            y, aux = self.op(self.norm(x), return_aux=True)
        else:
            y, aux = self.op(self.norm(x)), None
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, aux) if return_aux else x
