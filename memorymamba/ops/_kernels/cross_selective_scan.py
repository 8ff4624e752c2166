"""torch.library ops over the fused cross-direction selective scan kernels (memorymamba._C).

`memorymamba::cross_selective_scan_core` does, for x (B, D, H, W):
  0. u = act(x + x_shift) (the Mem-SSM block's memory add and SiLU) is never materialised: every
     kernel below makes it from x where it loads it;
  1. x_dbl = x_proj_weight @ u (+ x_proj_bias): one GEMM for all four directions in x's *spatial*
     layout (the projection is per position, so no cross-scan copy is needed); our kernel
     (cross_selective_scan_proj) builds u on the fly;
  2. the kernel: for each direction it walks the direction's index map over x and x_dbl, computes
     delta = softplus(dt_projs_weight @ dts + bias) in registers (delta never reaches memory), scans,
     and writes the merged y once.
x_dbl (4 (R+2N) floats per position, small next to x) is saved for backward; the scan itself is
recomputed fully in backward (no saved states). The x_proj GEMM's backward is fused with the
kernel's du: dL/du = du + x_proj_weight^T @ d(x_dbl) in one baddbmm; then the activation's backward
(cross_selective_scan_act_bwd) gives dx = act'(x + x_shift) dL/du and d(x_shift) (its per-(b, d)
sum, no atomics) and, on CPU, d(x_proj_weight) from u rows recomputed in a buffer; on CUDA it writes u
to a backward-only temporary for cuBLAS (one GEMM per block of positions).

Determinism: CPU always (fixed-order reductions over a fixed number of channel chunks). CUDA: a block
sums the d(x_dbl) terms of its css_cuda_block_channels channels in a fixed order; `deterministic=True`
writes one partial per channel group, summed here, otherwise the blocks add theirs with fp32 atomics.
Parameter grads are per-batch partials summed here in fixed order.
"""
from __future__ import annotations

import torch

from memorymamba._backend import extension

K = 4
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


# cuBLAS sums a GEMM's inner dimension in one running fp32 sum per output, so d(x_proj_weight), a sum
# over L positions, came out 2.5-5x less accurate than the fp32 PyTorch reference's at L = 1480-4087
# (H200); blocks of positions keep it at the reference's level (emulated on the CPU: one running sum
# 9x the blocked error at L = 4087).
_DW_BLOCK = 256


def _blocked_weight_grad(dx_dbl: torch.Tensor, u: torch.Tensor, block: int) -> torch.Tensor:
    """sum_b dx_dbl_b u_b^T for dx_dbl (B, rows, L) and u (B, D, L), one bmm per `block` positions
    (strided views, no copies)."""
    dw = None
    for l0 in range(0, u.shape[2], block):
        part = torch.bmm(dx_dbl[:, :, l0:l0 + block], u[:, :, l0:l0 + block].transpose(1, 2))
        dw = part if dw is None else dw.add_(part)
    return dw.sum(0)


def _weight_grad(dx_dbl: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The d(x_proj_weight) GEMM: blocked on CUDA, one bmm on the CPU (MKL blocks its sums itself)."""
    if u.is_cpu:
        return torch.bmm(dx_dbl, u.transpose(1, 2)).sum(0)
    return _blocked_weight_grad(dx_dbl, u, _DW_BLOCK)


def _x_rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, D, H, W) as fp32 (B, D, L) for the projection GEMMs."""
    B, D, H, W = x.shape
    return x.to(torch.float32).reshape(B, D, H * W)


def _has_act(shift: torch.Tensor | None, silu: bool) -> bool:
    """Whether u = act(x + shift) differs from x (else the plain-x paths apply)."""
    return shift is not None or silu


def _project(x: torch.Tensor, w: torch.Tensor, w_bias: torch.Tensor | None, shift: torch.Tensor | None,
             silu: bool) -> torch.Tensor:
    """x_dbl (B, rows, L) fp32 = w @ act(x + shift) (+ w_bias)."""
    B, D, H, W = x.shape
    if x.is_cpu and not _has_act(shift, silu):
        # Plain x on CPU: the BLAS bmm beats our projection kernel, which pays for staging u (1 thread,
        # busy 2-core dev box, B=8: D=96 56x56 bmm 1.1 ms vs kernel 2.0 ms; D=768 7x7 1.0 vs 1.3 ms).
        # With the activation the kernel wins at 56x56 (2.7 ms vs add + SiLU + bmm 3.0 ms) and u is never
        # materialised. bmm on an expanded w: matmul would fold (B, D, L) into a transposed copy of x.
        if w_bias is None:
            return torch.bmm(w.expand(B, -1, -1), _x_rows(x))
        return torch.baddbmm(w_bias.view(1, -1, 1), w.expand(B, -1, -1), _x_rows(x))
    x_dbl = torch.empty(B, w.shape[0], H * W, device=x.device, dtype=torch.float32)
    extension().cross_selective_scan_proj(x, shift, silu, w, w_bias, x_dbl)
    return x_dbl


@torch.library.custom_op("memorymamba::cross_selective_scan_core", mutates_args=())
def _core(x: torch.Tensor, w: torch.Tensor, w_bias: torch.Tensor | None, dt_w: torch.Tensor, dt_b: torch.Tensor,
          A_logs: torch.Tensor, Ds: torch.Tensor, shift: torch.Tensor | None, delta_softplus: bool, silu: bool,
          deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """y (B, D, H, W) in x's dtype and x_dbl (B, 4, R+2N, L) fp32. w: (4*(R+2N), D) fp32; shift (B, D) fp32."""
    C = extension()
    B, D, H, W = x.shape
    x_dbl = _project(x, w, w_bias, shift, silu).view(B, K, -1, H * W)
    if x.is_cuda:
        y = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        C.cross_selective_scan_fwd(x, x_dbl, dt_w, dt_b, A_logs, Ds, y, delta_softplus, shift, silu)
        return (y if x.dtype == torch.float32 else y.to(x.dtype)), x_dbl
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    C.cross_selective_scan_fwd(x, x_dbl, dt_w, dt_b, A_logs, Ds, y, delta_softplus, shift, silu)
    return y, x_dbl


@_core.register_fake
def _(x, w, w_bias, dt_w, dt_b, A_logs, Ds, shift, delta_softplus, silu, deterministic):
    B, D, H, W = x.shape
    return x.new_empty(x.shape), x.new_empty((B, K, w.shape[0] // K, H * W), dtype=torch.float32)


@torch.library.custom_op("memorymamba::cross_selective_scan_core_bwd", mutates_args=())
def _core_bwd(dy: torch.Tensor, x: torch.Tensor, x_dbl: torch.Tensor, w: torch.Tensor, dt_w: torch.Tensor,
              dt_b: torch.Tensor, A_logs: torch.Tensor, Ds: torch.Tensor, shift: torch.Tensor | None,
              delta_softplus: bool, silu: bool, deterministic: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor, torch.Tensor]:
    """Grads of x, w, w_bias, dt_w, dt_b, A_logs, Ds, shift (x's in x's dtype, the rest fp32; shift's is
    empty when shift is None)."""
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
            groups = -(-D // C.css_cuda_block_channels)
            part = torch.empty(B, K, groups, R + 2 * N, L, **f32)
            dx_dbl = torch.empty(B, K, R + 2 * N, L, **f32)
        else:
            part = None
            dx_dbl = torch.zeros(B, K, R + 2 * N, L, **f32)  # atomics accumulate into it
        C.cross_selective_scan_bwd(x, x_dbl, dt_w, dt_b, A_logs, Ds, dy, du, dx_dbl, part, ddt_w_part,
                                   ddt_b_part, dA_part, dDs_part, seg_states, delta_softplus, shift, silu)
        if deterministic:
            torch.sum(part, 2, out=dx_dbl)  # the channel groups' partials, in a fixed order
    else:
        dx_dbl_part = torch.empty(B, C.css_cpu_channel_chunks, K, R + 2 * N, L, **f32)
        C.cross_selective_scan_bwd(x, x_dbl, dt_w, dt_b, A_logs, Ds, dy, du, dx_dbl_part, None, ddt_w_part,
                                   ddt_b_part, dA_part, dDs_part, None, delta_softplus, shift, silu)
        dx_dbl = dx_dbl_part.sum(1)
    dx_dbl = dx_dbl.view(B, K * (R + 2 * N), L)
    # The x_proj GEMM's backward: du += w^T d(x_dbl) completes dL/du; dw = sum_b d(x_dbl)_b u_b^T.
    du.baddbmm_(w.t().expand(B, -1, -1), dx_dbl)
    dshift = torch.empty(B, D, **f32) if shift is not None else x.new_empty(0, dtype=torch.float32)
    if not _has_act(shift, silu):
        dx = du.view(B, D, H, W).to(x.dtype)
        dw = _weight_grad(dx_dbl, _x_rows(x))
    elif x.is_cuda:
        # u is recomputed into a backward-only temporary so that d(x_proj_weight) stays cuBLAS GEMMs
        # (deterministic) instead of a reduction over B*L in our kernel.
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        u = torch.empty(B, D, L, **f32)
        C.cross_selective_scan_act_bwd(x, shift, silu, du, dx, dshift if shift is not None else None, None, None,
                                       u)
        dw = _weight_grad(dx_dbl, u)
    else:
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        dw_part = torch.empty(B, w.shape[0], D, **f32)
        C.cross_selective_scan_act_bwd(x, shift, silu, du, dx, dshift if shift is not None else None, dx_dbl,
                                       dw_part, None)
        dw = dw_part.sum(0)
    return (dx, dw, dx_dbl.sum((0, 2)), ddt_w_part.sum(0), ddt_b_part.sum(0), dA_part.sum(0).view(K * D, N),
            dDs_part.sum(0).view(K * D), dshift)


@_core_bwd.register_fake
def _(dy, x, x_dbl, w, dt_w, dt_b, A_logs, Ds, shift, delta_softplus, silu, deterministic):
    dshift = x.new_empty(x.shape[:2], dtype=torch.float32) if shift is not None else x.new_empty(0, dtype=torch.float32)
    return (x.new_empty(x.shape), torch.empty_like(w), w.new_empty(w.shape[0]), torch.empty_like(dt_w),
            torch.empty_like(dt_b), torch.empty_like(A_logs), torch.empty_like(Ds), dshift)


def _setup_context(ctx, inputs, output):
    x, w, w_bias, dt_w, dt_b, A_logs, Ds, shift, delta_softplus, silu, deterministic = inputs
    ctx.save_for_backward(x, output[1], w, dt_w, dt_b, A_logs, Ds, shift)
    ctx.has_bias = w_bias is not None
    ctx.delta_softplus = delta_softplus
    ctx.silu = silu
    ctx.deterministic = deterministic


def _backward(ctx, dy, _dx_dbl):
    # x_dbl is an internal output (saved for backward); nothing differentiates through it.
    x, x_dbl, w, dt_w, dt_b, A_logs, Ds, shift = ctx.saved_tensors
    with torch.autocast(x.device.type, enabled=False):  # a backward called inside autocast keeps fp32 GEMMs
        dx, dw, db, ddt_w, ddt_b, dA, dD, dshift = _core_bwd(dy, x, x_dbl, w, dt_w, dt_b, A_logs, Ds, shift,
                                                             ctx.delta_softplus, ctx.silu, ctx.deterministic)
    return (dx, dw, (db if ctx.has_bias else None), ddt_w, ddt_b, dA, dD, (dshift if shift is not None else None),
            None, None, None)


_core.register_autograd(_backward, setup_context=_setup_context)


def cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, x_proj_bias=None,
                         delta_softplus=True, deterministic=False, x_shift=None, silu=False):
    """Fused SS2D core on the tensors' device (CPU or CUDA kernels of memorymamba._C).

    x (B, D, H, W) fp32/fp16/bf16, any strides: u when x_shift is None and silu is False, else the
    pre-activation features (u = act(x + x_shift) is made inside the kernels); x_shift (B, D) or None;
    x_proj_weight (4, R+2N, D); x_proj_bias (4, R+2N) or None;
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
    w = _f32(x_proj_weight).view(K * (R + 2 * N), D)  # contiguous first: the kernels read a dense w
    w_bias = None if x_proj_bias is None else _f32(x_proj_bias).view(K * (R + 2 * N))
    shift = None if x_shift is None else _f32(x_shift)
    y, _ = _core(x, w, w_bias, _f32(dt_projs_weight), _f32(dt_projs_bias), _f32(A_logs), _f32(Ds), shift,
                 bool(delta_softplus), bool(silu), bool(deterministic))
    return y
