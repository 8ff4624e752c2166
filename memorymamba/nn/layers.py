"""Small layers shared by the SS2D / Mem-SSM blocks, laid out so VMamba's state dicts load as they are."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linear2d(nn.Linear):
    """A Linear applied over the channel axis of (B, C, H, W) maps (a 1x1 conv).

    The weight stays 2-D (out, in) as in VMamba's Linear2d, so checkpoints saved from either a
    Linear2d or an nn.Linear load unchanged; a (out, in, 1, 1) conv weight is reshaped on load.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in, H, W) -> (B, out, H, W)."""
        # A GEMM on the channel-last view: inputs here mostly come from LayerNorm2d, which leaves them
        # channel-last in memory, and on the 2-core dev box this ran 1.3-2x faster than a 1x1 conv.
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dim() == 4 and w.shape[2:] == (1, 1):
            state_dict[prefix + "weight"] = w.reshape(w.shape[:2])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of (B, C, H, W) (VMamba's "ln2d")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's residual branch with probability `p` (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) -> x with some samples zeroed and the rest scaled by 1/(1-p)."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on (B, C, H, W) maps (channel_first) or (..., C) vectors; VMamba's names."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 drop: float = 0.0, channel_first: bool = True):
        super().__init__()
        Linear = Linear2d if channel_first else nn.Linear
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in, H, W) or (..., in) -> same layout with `out` channels."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y, for y > 0 (stable form y + log(-expm1(-y)))."""
    return y + torch.log(-torch.expm1(-y))


def init_dt_bias(d_inner: int, k: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """(k, d_inner) biases whose softplus is log-uniform in [dt_min, dt_max] (mamba's dt init)."""
    log_dt = torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    return inverse_softplus(torch.exp(log_dt).clamp(min=dt_init_floor))


def vmamba_init_weights(m: nn.Module) -> None:
    """VMamba's VSSM._init_weights: truncated-normal(0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
