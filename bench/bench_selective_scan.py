"""selective_scan: our compiled kernel vs the fast pure-PyTorch scan, the loop reference and mamba_ssm.

Shapes are the scan inside VMamba's SS2D core: (batch, K*D, L = side^2) with K = 4 groups of B, C
(one per direction), delta_bias + softplus and a D skip, as forward_corev2 calls it.
"""
from __future__ import annotations

import torch

from bench import common
from bench.harness import Case, Provider, scan_flops, scan_sfu_ops, selective_scan_bytes

# The loop reference runs one Python step per position: only on cases this small.
REF_MAX_WORK = 2_000_000  # batch * channels * L
REF_MAX_L = 1024


def make_case(batch: int, dim: int, side: int, N: int, dtype: torch.dtype, device: str,
              modes=("fwd", "bwd", "fwd+bwd")) -> Case:
    from memorymamba import ops

    K = common.K_DIRECTIONS
    channels, L = K * dim, side * side

    def make_inputs():
        # mamba's initialisation ranges: delta ~ softplus(-4.6..-2.3) in [0.001, 0.1], A = -exp(log(1..N)).
        req = dict(device=device, requires_grad=True)
        u = torch.randn(batch, channels, L, dtype=dtype, **req)
        delta = (torch.rand(batch, channels, L, device=device, dtype=dtype) * 2.3 - 4.6).requires_grad_()
        A = (-torch.exp(torch.log(torch.arange(1, N + 1, device=device, dtype=torch.float32)).repeat(channels, 1)
                        + 0.1 * torch.randn(channels, N, device=device))).requires_grad_()
        Bm = torch.randn(batch, K, N, L, dtype=dtype, **req)
        Cm = torch.randn(batch, K, N, L, dtype=dtype, **req)
        D = torch.randn(channels, device=device, requires_grad=True)
        bias = (0.5 * torch.randn(channels, device=device)).requires_grad_()
        return u, delta, A, Bm, Cm, D, bias

    def call(scan):
        return lambda u, delta, A, Bm, Cm, D, bias: scan(u, delta, A, Bm, Cm, D, None, bias, True)

    providers = []
    kernel_backend = device
    why = common.backend_why_not("selective_scan", kernel_backend)
    providers.append(Provider(f"kernel-{kernel_backend}",
                              call(lambda *a: ops.selective_scan_fn(*a, backend=kernel_backend)), why))
    providers.append(Provider("torch", call(ops.selective_scan_torch), baseline=True))
    if batch * channels * L <= REF_MAX_WORK and L <= REF_MAX_L:
        providers.append(Provider("ref", call(ops.selective_scan_ref), baseline=True))
    if device == "cuda":
        fn, why = common.mamba_ssm_scan()
        providers.append(Provider("mamba_ssm", call(fn) if fn else None, why, baseline=True))

    return Case(
        op="selective_scan",
        shape=dict(batch=batch, dim=channels, L=L, N=N, groups=K),
        dtype=dtype, providers=providers, make_inputs=make_inputs, modes=modes,
        bytes_fn=lambda mode: selective_scan_bytes(batch, channels, L, N, K, dtype, mode),
        flops_fn=lambda mode: scan_flops(batch, channels, L, N, mode),
        sfu_fn=lambda mode: scan_sfu_ops(batch, channels, L, N, mode))


def case(g: dict, device: str) -> Case:
    """The case of one bench.suites grid entry."""
    return make_case(g["batch"], g["dim"], g["side"], g["N"], g["dtype"], device, g["modes"])
