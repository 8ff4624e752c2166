"""selective_scan on the compiled kernels (memorymamba._C), as torch.library custom ops.

Two ops, `memorymamba::selective_scan_fwd` and `memorymamba::selective_scan_bwd`, each with a fake
kernel, joined by register_autograd, so torch.compile(fullgraph=True) traces through them.
Outputs are allocated here, in Python; the C++ functions fill them.

Kernel dtypes: u, delta, z and variable B/C share one dtype (fp32, fp16 or bf16); A, D,
delta_bias and constant B/C are fp32. `selective_scan` casts its arguments to that contract
outside the custom ops, so autograd casts the gradients back.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from memorymamba._backend import extension

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ext():
    return extension()


def chunk_size() -> int:
    """Sequence positions per saved state in the forward (a constant of the C++ build)."""
    return int(_ext().selective_scan_chunk_size)


def max_dstate() -> int:
    """Largest N the kernels accept."""
    return int(_ext().selective_scan_max_dstate)


def _n_chunks(L: int) -> int:
    return (L + chunk_size() - 1) // chunk_size()


def _last_contig(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels index L with stride 1; other strides are passed through."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


@torch.library.custom_op("memorymamba::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                       delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """out (batch, dim, L) in u's dtype, states (batch, dim, n_chunks, N) fp32 (chunk-end states)."""
    batch, dim, L = u.shape
    out = torch.empty((batch, dim, L), dtype=u.dtype, device=u.device)
    states = torch.empty((batch, dim, _n_chunks(L), A.shape[1]), dtype=torch.float32, device=u.device)
    _ext().selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out, states)
    return out, states


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, L = u.shape
    return (u.new_empty((batch, dim, L)),
            u.new_empty((batch, dim, _n_chunks(L), A.shape[1]), dtype=torch.float32))


def _empty(u, dtype):
    """A fresh (0,) placeholder for the grad of an absent optional input (outputs may not alias)."""
    return u.new_empty((0,), dtype=dtype)


@torch.library.custom_op("memorymamba::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                       delta_softplus: bool, states: Tensor, dout: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias, dz), each shaped and typed like its input.

    dD / ddelta_bias / dz are empty (0,) tensors when D / delta_bias / z is None.
    """
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = torch.empty_like(u, memory_format=torch.contiguous_format), torch.empty_like(
        delta, memory_format=torch.contiguous_format)
    dA = torch.zeros(A.shape, **f32)
    # Weight grads are summed in fp32 (over batch, and over the channels of a group for
    # variable B/C), then cast back to the input's dtype.
    dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
    dD = torch.zeros(D.shape, **f32) if D is not None else None
    ddb = torch.zeros(delta_bias.shape, **f32) if delta_bias is not None else None
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else None
    # Empty u (batch or dim 0): every grad is empty or zero already. Skipping the call also avoids
    # the CPU backward's per-(batch, group) split (it divides by batch * G) and an empty dout whose
    # stride(-1) is 0 (.contiguous() keeps it), which the extension's checks reject.
    if u.numel() > 0:
        _ext().selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, states, dout,
                                  du, ddelta, dA, dB, dC, dD, ddb, dz)
    return (du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype),
            dD if dD is not None else _empty(u, torch.float32),
            ddb if ddb is not None else _empty(u, torch.float32),
            dz if dz is not None else _empty(u, u.dtype))


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, states, dout):
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A),
            torch.empty_like(B), torch.empty_like(C),
            torch.empty_like(D) if D is not None else _empty(u, torch.float32),
            torch.empty_like(delta_bias) if delta_bias is not None else _empty(u, torch.float32),
            torch.empty_like(z) if z is not None else _empty(u, u.dtype))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.delta_softplus = delta_softplus
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])


def _backward(ctx, dout, _dstates):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, ddb, dz = selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, states, _last_contig(dout))
    need = ctx.needs_input_grad
    pick = lambda g, i, present=True: g if need[i] and present else None  # noqa: E731
    return (pick(du, 0), pick(ddelta, 1), pick(dA, 2), pick(dB, 3), pick(dC, 4),
            pick(dD, 5, D is not None), pick(dz, 6, z is not None),
            pick(ddb, 7, delta_bias is not None), None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """Selective scan on the compiled kernels, on the device of the tensors (mamba_ssm semantics).

    u, delta, z: (batch, dim, L) fp32/fp16/bf16; A: (dim, N) with N <= max_dstate();
    B, C: (batch, G, N, L), (batch, N, L) or constant (dim, N); D, delta_bias: (dim,).
    Returns out (batch, dim, L) in u's dtype, or (out, last_state (batch, dim, N) fp32).
    Parameters are used in fp32 and variable B/C in u's dtype (cast here if needed); fp32 variable
    B/C with fp16/bf16 u run the fp32 kernel.
    """
    if u.dtype not in KERNEL_DTYPES:
        raise TypeError(f"u must be float32, float16 or bfloat16 for the compiled kernels, got {u.dtype}")
    for name, t in (("A", A), ("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.dtype == torch.float64:
            raise TypeError(f"{name} must be float32 for the compiled kernels, got float64")
    if A.dim() == 2 and A.shape[1] > max_dstate():
        raise ValueError(f"A has N = {A.shape[1]} states; the compiled kernels support N <= {max_dstate()}")

    out_dtype = u.dtype
    if u.dtype != torch.float32 and any(t.dim() > 2 and t.dtype == torch.float32 for t in (B, C)):
        # fp32 variable B/C with low-precision u: the maths is fp32 anyway, so run the fp32
        # kernel on upcast sequences rather than round B/C down.
        u, delta = u.float(), delta.float()
        z = None if z is None else z.float()

    def bc(t):
        if t.dim() == 2:
            return t.float()
        if t.dim() == 3:  # (batch, N, L): one group
            t = t.unsqueeze(1)
        return _last_contig(t.to(u.dtype))

    out, states = selective_scan_fwd(
        _last_contig(u), _last_contig(delta), A.float(), bc(B), bc(C),
        None if D is None else D.float(), _last_contig(z),
        None if delta_bias is None else delta_bias.float(), bool(delta_softplus))
    out = out.to(out_dtype)
    return (out, states[:, :, -1]) if return_last_state else out
