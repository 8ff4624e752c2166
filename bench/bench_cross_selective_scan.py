"""cross_selective_scan (VMamba's SS2D core): the fused kernel vs the unfused pipeline, the fast
pure-PyTorch pipeline, the loop reference and mamba_ssm's scan in the unfused pipeline.

Grid entries with act=True (shape key act="shift+silu") time the Mem-SSM block's memory add and SiLU:
fused-act-<device> passes the pre-activation x, x_shift and silu=True to the op (neither F_bar nor u
is materialised); unfused-act-<device> adds the shift and applies SiLU in PyTorch, then runs the same
op on u. Their provider names keep these rows out of the plain rows' criteria.

Parameters are fp32 (as model parameters are); x has the benchmarked dtype. The unfused pipeline is
what VMamba's forward_corev2 does: PyTorch cross-scan, x_proj and dt_proj einsums in x's dtype (as
autocast would run them), a selective-scan kernel, PyTorch cross-merge.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench import common
from bench.harness import (Case, Provider, cross_selective_scan_bytes, scan_flops, scan_sfu_ops,
                           unfused_pipeline_bytes)

REF_MAX_WORK = 500_000  # batch * 4D * L for the loop reference
REF_MAX_L = 256


def unfused_pipeline(scan):
    """SS2D core from separate steps; `scan` has selective_scan_fn's positional signature."""
    from memorymamba import ops

    def core(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
        B, D, H, W = x.shape
        K, L, N = common.K_DIRECTIONS, H * W, A_logs.shape[1]
        R = x_proj_weight.shape[1] - 2 * N
        xs = ops.cross_scan(x, backend="torch")
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight.to(x.dtype))
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight.to(x.dtype))
        ys = scan(xs.reshape(B, K * D, L), dts.reshape(B, K * D, L), -torch.exp(A_logs.float()),
                  Bs.contiguous(), Cs.contiguous(), Ds.float(), None, dt_projs_bias.float().reshape(K * D), True)
        return ops.cross_merge(ys.reshape(B, K, D, L), H, W, backend="torch")
    return core


def _make_inputs(batch: int, dim: int, side: int, N: int, dtype: torch.dtype, device: str, with_shift: bool):
    K, R = common.K_DIRECTIONS, common.dt_rank(dim)

    def make_inputs():
        def param(*shape, scale=1.0, shift=0.0):
            return (torch.randn(*shape, device=device) * scale + shift).requires_grad_()
        x = torch.randn(batch, dim, side, side, device=device, dtype=dtype, requires_grad=True)
        # VMamba's init scales: x_proj ~ 1/sqrt(D), dt_proj ~ 1/sqrt(R), dt bias so softplus gives ~0.01,
        # A = -(1..N) jittered, D ~ 1.
        x_proj_weight = param(K, R + 2 * N, dim, scale=dim ** -0.5)
        dt_projs_weight = param(K, dim, R, scale=R ** -0.5)
        dt_projs_bias = param(K, dim, scale=0.5, shift=-4.6)
        A_logs = (torch.log(torch.arange(1, N + 1, device=device, dtype=torch.float32)).repeat(K * dim, 1)
                  + 0.1 * torch.randn(K * dim, N, device=device)).requires_grad_()
        Ds = param(K * dim, scale=0.1, shift=1.0)
        # the memory vector w (B, D): fp32 like the memory networks' output
        extra = (param(batch, dim, scale=0.1),) if with_shift else ()
        return (x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, *extra)
    return make_inputs


def _cost_models(batch: int, dim: int, side: int, N: int, dtype: torch.dtype) -> dict:
    K, L, R = common.K_DIRECTIONS, side * side, common.dt_rank(dim)

    def flops(mode):
        proj = 2 * batch * L * K * dim * (R + 2 * N) + 2 * batch * L * K * dim * R
        return scan_flops(batch, K * dim, L, N, mode) + {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode] * proj

    return dict(bytes_fn=lambda mode: cross_selective_scan_bytes(batch, dim, L, N, R, dtype, mode),
                flops_fn=flops, sfu_fn=lambda mode: scan_sfu_ops(batch, K * dim, L, N, mode))


def make_act_case(batch: int, dim: int, side: int, N: int, dtype: torch.dtype, device: str,
                  modes=("fwd", "bwd", "fwd+bwd")) -> Case:
    """The block's u = SiLU(x + w) inside the op (fused-act) vs in PyTorch before it (unfused-act)."""
    from memorymamba import ops

    def fused(x, *rest):
        return ops.cross_selective_scan(x, *rest[:5], x_shift=rest[5], silu=True, backend=device)

    def unfused(x, *rest):
        u = F.silu(x + rest[5].to(x.dtype)[:, :, None, None])
        return ops.cross_selective_scan(u, *rest[:5], backend=device)

    why = common.backend_why_not("cross_selective_scan", device)
    providers = [Provider(f"fused-act-{device}", fused, why),
                 Provider(f"unfused-act-{device}", unfused, why, baseline=True)]
    return Case(op="cross_selective_scan",
                shape=dict(batch=batch, dim=dim, H=side, W=side, N=N, R=common.dt_rank(dim), act="shift+silu"),
                dtype=dtype, providers=providers, make_inputs=_make_inputs(batch, dim, side, N, dtype, device, True),
                modes=modes, **_cost_models(batch, dim, side, N, dtype))


def make_case(batch: int, dim: int, side: int, N: int, dtype: torch.dtype, device: str,
              modes=("fwd", "bwd", "fwd+bwd")) -> Case:
    from memorymamba import ops

    K, L = common.K_DIRECTIONS, side * side
    make_inputs = _make_inputs(batch, dim, side, N, dtype, device, False)

    providers = [Provider(f"fused-{device}",
                          lambda *a: ops.cross_selective_scan(*a, backend=device),
                          common.backend_why_not("cross_selective_scan", device))]
    providers.append(Provider(
        f"unfused-{device}",
        unfused_pipeline(lambda *a: ops.selective_scan_fn(*a, backend=device)),
        common.backend_why_not("selective_scan", device), baseline=True))
    providers.append(Provider("torch", lambda *a: ops.cross_selective_scan(*a, backend="torch"), baseline=True))
    if batch * K * dim * L <= REF_MAX_WORK and L <= REF_MAX_L:
        providers.append(Provider("ref", ops.cross_selective_scan_ref, baseline=True))
    if device == "cuda":
        fn, why = common.mamba_ssm_scan()
        providers.append(Provider("unfused-mamba_ssm", unfused_pipeline(fn) if fn else None, why, baseline=True))

    return Case(
        op="cross_selective_scan",
        shape=dict(batch=batch, dim=dim, H=side, W=side, N=N, R=common.dt_rank(dim)),
        dtype=dtype, providers=providers, make_inputs=make_inputs, modes=modes,
        **_cost_models(batch, dim, side, N, dtype),
        # what the unfused pipeline moves forward (DESIGN's ~22D + 8N per position), for comparison
        extra=dict(unfused_fwd_bytes_est=unfused_pipeline_bytes(batch, dim, L, N, dtype)))


def case(g: dict, device: str) -> Case:
    """The case of one bench.suites grid entry."""
    make = make_act_case if g.get("act") else make_case
    return make(g["batch"], g["dim"], g["side"], g["N"], g["dtype"], device, g["modes"])
