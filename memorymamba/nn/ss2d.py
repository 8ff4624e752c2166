"""SS2D (VMamba's 2-D selective-scan mixer, "v05_noz" path) and its memory-augmented form MemSS2D.

Parameter names and shapes are VMamba's (`in_proj`, `conv2d`, `x_proj_weight`, `dt_projs_weight`,
`dt_projs_bias`, `A_logs`, `Ds`, `out_norm`, `out_proj`), so `SS2D.load_state_dict` takes the state
dict of a VMamba SS2D built with the same arguments. The memory networks add `coarse_memory.*` and
`fine_memory.*`; with both off the module computes VMamba's function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from memorymamba import ops
from memorymamba.nn.layers import LayerNorm2d, Linear2d, init_dt_bias
from memorymamba.nn.memory import SIMILARITIES, MemoryNetwork
from memorymamba.ops._dispatch import kernel, pick_backend
from memorymamba.ops._kernels.cross_selective_scan import KERNEL_DTYPES as SCAN_KERNEL_DTYPES
from memorymamba.ops._kernels.memory_attention import KERNEL_DTYPES

K_DIRECTIONS = 4


@dataclass
class BlockAux:
    """What the memory losses need from one block's forward (None where that memory is off).

    coarse_logits: (B, c) query logits h_c of the coarse memory.
    pooled: (B, D) z = GAP(F~), the pooled depthwise-conv features the memories are queried with.
    fine_proj: (B, D) the fine network's projection of its readout M_f_bar.
    """

    coarse_logits: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    fine_proj: torch.Tensor | None = None


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class SS2D(nn.Module):
    """VMamba SS2D, v05_noz: in_proj -> depthwise conv -> [memory] -> SiLU -> cross selective scan
    -> out_norm -> out_proj. On the compiled backends the memory add and the SiLU run inside the scan.

    Accepts VMamba's SS2D constructor arguments for this path (d_model, d_state, ssm_ratio, dt_rank,
    act_layer, d_conv, conv_bias, dropout, bias, dt_min, dt_max, dt_init, dt_scale, dt_init_floor,
    initialize="v0", forward_type="v05_noz", channel_first); other forward types are refused.
    Input/output: (B, d_model, H, W) when channel_first, else (B, H, W, d_model).

    Memory (off by default here, see MemSS2D): coarse_memory_size / fine_memory_size > 0 add a
    coarse / fine MemoryNetwork on d_inner channels; `fusion` and `similarity` configure both.
    `backend` is passed to the ops (None: fastest available).
    """

    def __init__(self, d_model: int = 96, d_state: int = 16, ssm_ratio: float = 2.0, dt_rank="auto",
                 act_layer=nn.SiLU, d_conv: int = 3, conv_bias: bool = True, dropout: float = 0.0,
                 bias: bool = False, dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, initialize: str = "v0",
                 forward_type: str = "v05_noz", channel_first: bool = True, *,
                 coarse_memory_size: int = 0, fine_memory_size: int = 0, fusion: bool = True,
                 similarity: str = "cosine", backend: str | None = None):
        super().__init__()
        if forward_type != "v05_noz":
            raise ValueError(f"forward_type must be 'v05_noz' (the only SS2D path implemented), got {forward_type!r}")
        if initialize != "v0":
            raise ValueError(f"initialize must be 'v0' (mamba's dt/A/D init), got {initialize!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        _check_positive_int("d_model", d_model)
        _check_positive_int("d_state", d_state)
        if not ssm_ratio > 0:
            raise ValueError(f"ssm_ratio must be > 0, got {ssm_ratio!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        _check_positive_int("coarse_memory_size", coarse_memory_size, 0)
        _check_positive_int("fine_memory_size", fine_memory_size, 0)
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")

        self.d_model, self.d_state = int(d_model), int(d_state)
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = int(math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank)
        _check_positive_int("dt_rank", self.dt_rank)
        self.channel_first = channel_first
        self.backend = backend
        D, N, R, K = self.d_inner, self.d_state, self.dt_rank, K_DIRECTIONS
        Linear = Linear2d if channel_first else nn.Linear

        self.in_proj = Linear(self.d_model, D, bias=bias)
        self.act = act_layer()
        self.conv2d = (nn.Conv2d(D, D, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=D, bias=conv_bias)
                       if d_conv > 1 else None)
        # x_proj as K stacked nn.Linear(D, R+2N) weights: VMamba keeps torch's default Linear init here.
        bound = 1.0 / math.sqrt(D)
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, D).uniform_(-bound, bound))
        dt_std = dt_scale / math.sqrt(R)
        dt_w = torch.full((K, D, R), dt_std)
        if dt_init == "random":
            dt_w.uniform_(-dt_std, dt_std)
        self.dt_projs_weight = nn.Parameter(dt_w)
        self.dt_projs_bias = nn.Parameter(init_dt_bias(D, K, dt_min, dt_max, dt_init_floor))
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(K * D, 1))
        self.Ds = nn.Parameter(torch.ones(K * D))
        for p in (self.A_logs, self.Ds):
            p._no_weight_decay = True
        self.out_norm = LayerNorm2d(D) if channel_first else nn.LayerNorm(D)
        self.out_proj = Linear(D, self.d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self.coarse_memory = (MemoryNetwork(D, coarse_memory_size, similarity=similarity, fusion=fusion)
                              if coarse_memory_size else None)
        self.fine_memory = (MemoryNetwork(D, fine_memory_size, similarity=similarity, fusion=fusion, projection=True)
                            if fine_memory_size else None)

    @property
    def has_memory(self) -> bool:
        return self.coarse_memory is not None or self.fine_memory is not None

    def _fused_memory(self, f: torch.Tensor) -> bool:
        """Whether the memory networks run as the one fused kernel (a compiled backend and dtype)."""
        params = [t for m in (self.coarse_memory, self.fine_memory) if m is not None for t in m.attention_params()]
        return (f.dtype in KERNEL_DTYPES and all(t is None or t.dtype == torch.float32 for t in params)
                and pick_backend("memory_attention", self.backend, f, *params) != "torch")

    def _fused_activation(self, f: torch.Tensor) -> bool:
        """Whether the memory add and the SiLU run inside the compiled scan (x_shift, silu=True), so that
        neither F_bar nor u is materialised; other activations and the torch backend stay in PyTorch."""
        params = (self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds)
        return (isinstance(self.act, nn.SiLU) and f.dtype in SCAN_KERNEL_DTYPES
                and pick_backend("cross_selective_scan", self.backend, f, *params) != "torch")

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """x (B, d_model, H, W) [or (B, H, W, d_model)] -> same shape; with return_aux also a BlockAux."""
        expect = "(B, d_model, H, W)" if self.channel_first else "(B, H, W, d_model)"
        c_axis = 1 if self.channel_first else -1
        if x.dim() != 4 or x.shape[c_axis] != self.d_model:
            raise ValueError(f"x must have shape {expect} with d_model={self.d_model}, got {tuple(x.shape)}")
        f = self.in_proj(x)
        if not self.channel_first:
            f = f.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            f = self.conv2d(f)
        aux = BlockAux()
        fused_act = self._fused_activation(f)
        add = None
        if self.has_memory:
            add = 0
            if self._fused_memory(f):
                # One kernel: pooling and both memory networks (memorymamba.ops._kernels.memory_attention).
                nets = [None if m is None else m.attention_params() for m in (self.coarse_memory, self.fine_memory)]
                similarity = (self.coarse_memory or self.fine_memory).similarity
                with torch.autocast(f.device.type, enabled=False):
                    p, w_c, aux.coarse_logits, v_c, w_f, _, v_f = kernel(
                        "memory_attention", "memory_attention_fused")(f, *nets, similarity)
                if self.coarse_memory is not None:
                    add = add + self.coarse_memory.fuse(w_c, v_c)
                if self.fine_memory is not None:
                    add = add + self.fine_memory.fuse(w_f, v_f)
            else:
                p = f.mean(dim=(2, 3))
                if self.coarse_memory is not None:
                    w_c, aux.coarse_logits, _ = self.coarse_memory(p, backend=self.backend)
                    add = add + w_c
                if self.fine_memory is not None:
                    w_f, _, v_f = self.fine_memory(p, backend=self.backend)
                    add = add + w_f
            if return_aux and self.fine_memory is not None:
                aux.fine_proj = self.fine_memory.proj(v_f)
            aux.pooled = p
            add = add.to(f.dtype)  # fp32 memory params must not promote f under autocast
        if not fused_act:
            f = self.act(f if add is None else f + add[:, :, None, None])
            add = None  # applied: f is u now
        # The op keeps its own precision under autocast (fp32 maths, output in f's dtype).
        y = ops.cross_selective_scan(f, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                                     self.A_logs, self.Ds, delta_softplus=True, x_shift=add, silu=fused_act,
                                     backend=self.backend)
        if not self.channel_first:
            y = y.permute(0, 2, 3, 1)
        out = self.dropout(self.out_proj(self.out_norm(y)))
        return (out, aux) if return_aux else out


class MemSS2D(SS2D):
    """SS2D with both memory networks on by default (coarse 4 cells, fine 8 cells, cosine fusion)."""

    def __init__(self, *args, coarse_memory_size: int = 4, fine_memory_size: int = 8, **kwargs):
        super().__init__(*args, coarse_memory_size=coarse_memory_size, fine_memory_size=fine_memory_size, **kwargs)
