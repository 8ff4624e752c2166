"""torch.library ops over the fused cross-direction selective scan kernels (memorymamba._C).

`memorymamba::cross_selective_scan_core` does, for x (B, D, H, W):
  1. x_dbl = x_proj_weight @ x (+ x_proj_bias): one GEMM for all four directions in x's *spatial*
     layout (the projection is per position, so no cross-scan copy is needed);
  2. the kernel: for each direction it walks the direction's index map over x and x_dbl, computes
     delta = softplus(dt_projs_weight @ dts + bias) in registers (delta never reaches memory), scans,
     and writes the merged y once.
x_dbl (4 (R+2N) floats per position, small next to x) is saved for backward; the scan itself is
recomputed fully in backward (no saved states). The x_proj GEMM's backward is fused with the
kernel's du: dx = du + x_proj_weight^T @ d(x_dbl) in one baddbmm.

Determinism: CPU always (fixed-order reductions over a fixed number of channel chunks). CUDA:
`deterministic=True` writes per-channel partials of d(x_dbl) and reduces them with torch in a fixed
order; otherwise fp32 atomics. Parameter grads are per-batch partials summed here in fixed order.
"""
from __future__ import annotations

import torch

from memorymamba._backend import extension

K = 4
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _x_rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, D, H, W) as fp32 (B, D, L) for the projection GEMMs."""
    B, D, H, W = x.shape
    return x.to(torch.float32).reshape(B, D, H * W)


@torch.library.custom_op("memorymamba::cross_selective_scan_core", mutates_args=())
def _core(x: torch.Tensor, w: torch.Tensor, w_bias: torch.Tensor | None, dt_w: torch.Tensor, dt_b: torch.Tensor,
          A_logs: torch.Tensor, Ds: torch.Tensor, delta_softplus: bool, deterministic: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """y (B, D, H, W) in x's dtype and x_dbl (B, 4, R+2N, L) fp32. w: (4*(R+2N), D) fp32."""
    C = extension()
    B, D, H, W = x.shape
    # bmm on an expanded w: matmul would fold (B, D, L) into a transposed copy of x.
    if w_bias is None:
        x_dbl = torch.bmm(w.expand(B, -1, -1), _x_rows(x))
    else:
        x_dbl = torch.baddbmm(w_bias.view(1, -1, 1), w.expand(B, -1, -1), _x_rows(x))
    x_dbl = x_dbl.view(B, K, -1, H * W)
    if x.is_cuda:
        y = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        C.cross_selective_scan_fwd(x, x_dbl, dt_w, dt_b, A_logs, Ds, y, delta_softplus)
        return (y if x.dtype == torch.float32 else y.to(x.dtype)), x_dbl
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    C.cross_selective_scan_fwd(x, x_dbl, dt_w, dt_b, A_logs, Ds, y, delta_softplus)
    return y, x_dbl


@_core.register_fake
def _(x, w, w_bias, dt_w, dt_b, A_logs, Ds, delta_softplus, deterministic):
    B, D, H, W = x.shape
    return x.new_empty(x.shape), x.new_empty((B, K, w.shape[0] // K, H * W), dtype=torch.float32)


@torch.library.custom_op("memorymamba::cross_selective_scan_core_bwd", mutates_args=())
def _core_bwd(dy: torch.Tensor, x: torch.Tensor, x_dbl: torch.Tensor, w: torch.Tensor, dt_w: torch.Tensor,
              dt_b: torch.Tensor, A_logs: torch.Tensor, Ds: torch.Tensor, delta_softplus: bool, deterministic: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor]:
    """Grads of x, w, w_bias, dt_w, dt_b, A_logs, Ds (x's in x's dtype, the rest fp32)."""
    C = extension()
    B, D, H, W = x.shape
    L, N, R = H * W, A_logs.shape[1], dt_w.shape[2]
    f32 = dict(device=x.device, dtype=torch.float32)
    dy = _f32(dy)
    ddt_w_part = torch.empty(B, K, D, R, **f32)
    ddt_b_part = torch.empty(B, K, D, **f32)
    dA_part = torch.empty(B, K, D, N, **f32)
    dDs_part = torch.empty(B, K, D, **f32)
    du = torch.empty(B, D, L, **f32)
    if x.is_cuda:
        seg = C.css_cuda_segment_len
        seg_states = torch.empty(B, D, K, (L + seg - 1) // seg, N, **f32)
        if deterministic:
            part = torch.empty(B, K, D, 1 + 2 * N, L, **f32)
            dx_dbl = torch.empty(B, K, R + 2 * N, L, **f32)
        else:
            part = None
            dx_dbl = torch.zeros(B, K, R + 2 * N, L, **f32)  # atomics accumulate into it
        C.cross_selective_scan_bwd(x, x_dbl, dt_w, dt_b, A_logs, Ds, dy, du, dx_dbl, part, ddt_w_part,
                                   ddt_b_part, dA_part, dDs_part, seg_states, delta_softplus)
        if deterministic:
            # Fixed-order reductions over channels: d dts = dt_w^T @ d(dt_raw); dB, dC = channel sums.
            dx_dbl[:, :, :R] = torch.einsum("bkdl,kdr->bkrl", part[:, :, :, 0], dt_w)
            dx_dbl[:, :, R:] = part[:, :, :, 1:].sum(2)
    else:
        dx_dbl_part = torch.empty(B, C.css_cpu_channel_chunks, K, R + 2 * N, L, **f32)
        C.cross_selective_scan_bwd(x, x_dbl, dt_w, dt_b, A_logs, Ds, dy, du, dx_dbl_part, None, ddt_w_part,
                                   ddt_b_part, dA_part, dDs_part, None, delta_softplus)
        dx_dbl = dx_dbl_part.sum(1)
    dx_dbl = dx_dbl.view(B, K * (R + 2 * N), L)
    # The x_proj GEMM's backward: dx = du + w^T d(x_dbl); dw = sum_b d(x_dbl)_b x_b^T.
    dx = du.baddbmm_(w.t().expand(B, -1, -1), dx_dbl).view(B, D, H, W).to(x.dtype)
    dw = torch.bmm(dx_dbl, _x_rows(x).transpose(1, 2)).sum(0)
    return (dx, dw, dx_dbl.sum((0, 2)), ddt_w_part.sum(0), ddt_b_part.sum(0), dA_part.sum(0).view(K * D, N),
            dDs_part.sum(0).view(K * D))


@_core_bwd.register_fake
def _(dy, x, x_dbl, w, dt_w, dt_b, A_logs, Ds, delta_softplus, deterministic):
    return (x.new_empty(x.shape), torch.empty_like(w), w.new_empty(w.shape[0]), torch.empty_like(dt_w),
            torch.empty_like(dt_b), torch.empty_like(A_logs), torch.empty_like(Ds))


def _setup_context(ctx, inputs, output):
    x, w, w_bias, dt_w, dt_b, A_logs, Ds, delta_softplus, deterministic = inputs
    ctx.save_for_backward(x, output[1], w, dt_w, dt_b, A_logs, Ds)
    ctx.has_bias = w_bias is not None
    ctx.delta_softplus = delta_softplus
    ctx.deterministic = deterministic


def _backward(ctx, dy, _dx_dbl):
    # x_dbl is an internal output (saved for backward); nothing differentiates through it.
    x, x_dbl, w, dt_w, dt_b, A_logs, Ds = ctx.saved_tensors
    dx, dw, db, ddt_w, ddt_b, dA, dD = _core_bwd(dy, x, x_dbl, w, dt_w, dt_b, A_logs, Ds, ctx.delta_softplus,
                                                 ctx.deterministic)
    return dx, dw, (db if ctx.has_bias else None), ddt_w, ddt_b, dA, dD, None, None


_core.register_autograd(_backward, setup_context=_setup_context)


def cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, x_proj_bias=None,
                         delta_softplus=True, deterministic=False):
    """Fused SS2D core on the tensors' device (CPU or CUDA kernels of memorymamba._C).

    x (B, D, H, W) fp32/fp16/bf16, any strides; x_proj_weight (4, R+2N, D); x_proj_bias (4, R+2N) or None;
    dt_projs_weight (4, D, R); dt_projs_bias (4, D); A_logs (4*D, N) with N <= 16; Ds (4*D,).
    Parameters are used in fp32. Returns y (B, D, H, W) in x's dtype (contiguous).
    """
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16 for the fused kernel, got {x.dtype}; "
                         f"use backend='torch' for {x.dtype}")
    C = extension()
    N, R = A_logs.shape[1], dt_projs_weight.shape[2]
    if N > C.css_max_dstate:
        raise ValueError(f"A_logs.shape[1] (d_state) must be <= {C.css_max_dstate} for the fused kernel, got {N}")
    if R > C.css_max_dt_rank:
        raise ValueError(f"dt_projs_weight.shape[2] (dt_rank) must be <= {C.css_max_dt_rank} for the fused "
                         f"kernel, got {R}")
    D = x.shape[1]
    w = x_proj_weight.to(torch.float32).reshape(K * (R + 2 * N), D)
    w_bias = None if x_proj_bias is None else x_proj_bias.to(torch.float32).reshape(K * (R + 2 * N))
    y, _ = _core(x, w, w_bias, _f32(dt_projs_weight), _f32(dt_projs_bias), _f32(A_logs), _f32(Ds),
                 bool(delta_softplus), bool(deterministic))
    return y
