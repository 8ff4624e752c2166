"""The SS2D core of VMamba's forward_corev2 ("v05_noz"): cross scan, per-direction projections,
selective scan, cross merge, optionally preceded by the Mem-SSM block's memory add and SiLU.

u = act(x + x_shift[:, :, None, None]) (act = SiLU when silu, else identity; no shift when x_shift is
None): the block's F_bar = F~ + w and u = SiLU(F_bar), done inside the op so the kernels produce u
where they load x and neither F_bar nor u reaches memory. Then, for each direction k of
xs = cross_scan(u) (B, 4, D, L):
    x_dbl = x_proj_weight[k] @ xs_k (+ x_proj_bias[k])        (R + 2N, L), split into dts, B_k, C_k
    delta = dt_projs_weight[k] @ dts                          (D, L)
    ys_k  = selective_scan(xs_k, delta, A = -exp(A_logs), B_k, C_k, Ds, delta_bias = dt_projs_bias[k],
                           delta_softplus)
and y = cross_merge(ys). Maths is fp32 (fp64 for fp64 inputs) and y has x's dtype. VMamba's v05_noz
(force_fp32 on) merges in fp32 and casts to x's dtype only after out_norm; returning x's dtype here
rounds y once before out_norm for fp16/bf16 x (no change for fp32) and halves the bytes the fused
kernels write.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memorymamba.ops._dispatch import kernel, pick_backend
from memorymamba.ops.cross_scan import K_DIRECTIONS, _cross_merge_torch, _cross_scan_torch
from memorymamba.ops.selective_scan import (ACT_DTYPES, TORCH_MAX_DSTATE, _check_tensor, _maths_dtype,
                                            selective_scan_ref, selective_scan_torch)


def check_cross_selective_scan_args(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                    x_proj_bias=None):
    """Validate the SS2D core inputs; returns (B, D, H, W, R, N). Errors name the argument and rule."""
    for name, t in (("x", x), ("x_proj_weight", x_proj_weight), ("dt_projs_weight", dt_projs_weight),
                    ("dt_projs_bias", dt_projs_bias), ("A_logs", A_logs), ("Ds", Ds)):
        _check_tensor(name, t, ACT_DTYPES)
    if x.dim() != 4 or min(x.shape) < 1:
        raise ValueError(f"x must have shape (B, D, H, W) with every size >= 1, got {tuple(x.shape)}")
    B, D, H, W = x.shape
    K = K_DIRECTIONS
    if A_logs.dim() != 2 or A_logs.shape[0] != K * D or A_logs.shape[1] < 1:
        raise ValueError(f"A_logs must have shape (K*D, N) with K*D = {K * D} and N >= 1, got {tuple(A_logs.shape)}")
    N = A_logs.shape[1]
    if x_proj_weight.dim() != 3 or x_proj_weight.shape[0] != K or x_proj_weight.shape[2] != D:
        raise ValueError(f"x_proj_weight must have shape (K, R+2N, D) with K = {K}, D = {D}, "
                         f"got {tuple(x_proj_weight.shape)}")
    R = x_proj_weight.shape[1] - 2 * N
    if R < 1:
        raise ValueError(f"x_proj_weight must have R+2N rows with dt rank R >= 1 and N = {N} (from A_logs), "
                         f"got {x_proj_weight.shape[1]} rows")
    if x_proj_bias is not None:
        _check_tensor("x_proj_bias", x_proj_bias, ACT_DTYPES)
        if x_proj_bias.shape != (K, R + 2 * N):
            raise ValueError(f"x_proj_bias must have shape (K, R+2N) = {(K, R + 2 * N)}, got {tuple(x_proj_bias.shape)}")
    if dt_projs_weight.shape != (K, D, R):
        raise ValueError(f"dt_projs_weight must have shape (K, D, R) = {(K, D, R)}, got {tuple(dt_projs_weight.shape)}")
    if dt_projs_bias.shape != (K, D):
        raise ValueError(f"dt_projs_bias must have shape (K, D) = {(K, D)}, got {tuple(dt_projs_bias.shape)}")
    if Ds.shape != (K * D,):
        raise ValueError(f"Ds must have shape (K*D,) = {(K * D,)}, got {tuple(Ds.shape)}")
    return B, D, H, W, R, N


def check_x_shift(x_shift, x):
    """Validate the per-(batch, channel) shift added to x before the activation."""
    if x_shift is None:
        return
    _check_tensor("x_shift", x_shift, ACT_DTYPES)
    if x_shift.shape != x.shape[:2]:
        raise ValueError(f"x_shift must have shape (B, D) = {tuple(x.shape[:2])} (x's batch and channels), "
                         f"got {tuple(x_shift.shape)}")
    if x_shift.device != x.device:
        raise ValueError(f"x_shift must be on x's device {x.device}, got {x_shift.device}")


def _core(scan, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, x_proj_bias, delta_softplus,
          x_shift, silu):
    B, D, H, W, R, N = check_cross_selective_scan_args(x, x_proj_weight, dt_projs_weight, dt_projs_bias,
                                                       A_logs, Ds, x_proj_bias)
    check_x_shift(x_shift, x)
    dtype = _maths_dtype(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, x_proj_bias, x_shift)
    K, L = K_DIRECTIONS, H * W
    u = x.to(dtype)
    if x_shift is not None:
        u = u + x_shift.to(dtype)[:, :, None, None]
    if silu:
        u = F.silu(u)
    xs = _cross_scan_torch(u)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight.to(dtype))
    if x_proj_bias is not None:
        x_dbl = x_dbl + x_proj_bias.to(dtype)[None, :, :, None]
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight.to(dtype))
    ys = scan(xs.reshape(B, K * D, L), dts.reshape(B, K * D, L), -torch.exp(A_logs.to(dtype)), Bs, Cs,
              Ds.to(dtype), None, dt_projs_bias.to(dtype).reshape(K * D), delta_softplus)
    return _cross_merge_torch(ys.reshape(B, K, D, L), H, W).to(x.dtype)


def cross_selective_scan_ref(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, x_proj_bias=None,
                             delta_softplus=True, *, x_shift=None, silu=False):
    """Reference SS2D core built on the loop scan (slow, for tests).

    x (B, D, H, W): the scan's input u when x_shift is None and silu is False, else the pre-activation
    features (u = act(x + x_shift), see the module docstring); x_shift (B, D) or None; x_proj_weight
    (4, R+2N, D); x_proj_bias (4, R+2N) or None; dt_projs_weight (4, D, R); dt_projs_bias (4, D);
    A_logs (4*D, N); Ds (4*D,). Returns y (B, D, H, W) in x's dtype (before VMamba's out_norm).
    """
    return _core(selective_scan_ref, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, x_proj_bias,
                 delta_softplus, x_shift, bool(silu))


def cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, x_proj_bias=None,
                         delta_softplus=True, *, x_shift=None, silu=False, backend=None, deterministic=False):
    """The SS2D core on the chosen backend; arguments and result as cross_selective_scan_ref.

    backend: None (see memorymamba._backend), "torch" (the fast pure-PyTorch scan), "cpu" or "cuda"
    (the fused kernel). deterministic asks the kernels for run-to-run identical weight gradients; the
    torch backend is deterministic anyway. Under autocast the op keeps its own precision (fp32
    maths, y in x's dtype): autocast would otherwise recast its projections to the autocast dtype.
    """
    N = check_cross_selective_scan_args(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                        x_proj_bias)[5]
    check_x_shift(x_shift, x)
    b = pick_backend("cross_selective_scan", backend, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs,
                     Ds, x_proj_bias, x_shift)
    with torch.autocast(x.device.type, enabled=False):
        if b == "torch":
            if N > TORCH_MAX_DSTATE:
                raise ValueError(f"A_logs has N = {N} states; the torch backend supports N <= {TORCH_MAX_DSTATE}")
            return _core(selective_scan_torch, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                         x_proj_bias, delta_softplus, x_shift, bool(silu))
        return kernel("cross_selective_scan")(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                              x_proj_bias, delta_softplus, x_shift=x_shift, silu=bool(silu),
                                              deterministic=deterministic)
