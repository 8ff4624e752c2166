"""Selective scan (mamba_ssm semantics): a loop reference, a fast pure-PyTorch scan, the public op.

Semantics (real A), per batch b, channel d, state n, position t:
    delta = softplus(delta + delta_bias)            (each step optional)
    x_t   = exp(delta_t * A[d, n]) * x_{t-1} + delta_t * B_t[n] * u_t,   x_{-1} = 0
    y_t   = sum_n C_t[n] * x_t[n] + D[d] * u_t
    out   = y * silu(z)                             (if z is given)
B and C are variable, (batch, G, N, L) with channel d reading group d // (dim // G) (a
(batch, N, L) tensor is G = 1), or constant, (dim, N). Maths is fp32 (fp64 for fp64 inputs);
out has u's dtype, the last state x_{L-1} is (batch, dim, N) in the maths dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from memorymamba.ops._dispatch import kernel, pick_backend

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PARAM_DTYPES = (torch.float32, torch.float64)
# Mamba's kernels stop at 256 states; the pure-PyTorch scan keeps the same limit so a model that
# runs here also runs on the kernels.
TORCH_MAX_DSTATE = 256
# Chunk of the fast scan: 16 beat 8 and 32 at (2, 384, 1, 3136) on the 2-core dev box (0.060 s vs
# 0.081 s / 0.095 s per forward scan; whole-L doubling 0.082 s), measured while other jobs ran: a rough pick.
SCAN_CHUNK = 16


def _shape_error(name, what, expected, got):
    return ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(got)}")


def _check_tensor(name, t, dtypes):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")


def check_selective_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """Validate the inputs of a selective scan; returns (batch, dim, L, N, B_groups, C_groups).

    B_groups / C_groups is None for a constant (dim, N) B / C. Raises ValueError (shapes, sizes)
    or TypeError (types, dtypes) naming the argument and the rule.
    """
    _check_tensor("u", u, ACT_DTYPES)
    if u.dim() != 3:
        raise ValueError(f"u must have rank 3 (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    if batch < 1 or dim < 1 or L < 1:
        raise ValueError(f"u must have batch, dim, L >= 1, got shape {tuple(u.shape)}")
    _check_tensor("delta", delta, ACT_DTYPES)
    if delta.shape != u.shape:
        raise _shape_error("delta", "(batch, dim, L)", u.shape, delta.shape)
    if delta.dtype != u.dtype:
        raise TypeError(f"delta must have u's dtype {u.dtype}, got {delta.dtype}")
    _check_tensor("A", A, PARAM_DTYPES)
    if A.dim() != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"A must have shape (dim, N) with dim = {dim} and N >= 1, got {tuple(A.shape)}")
    N = A.shape[1]
    groups = []
    for name, t in (("B", B), ("C", C)):
        _check_tensor(name, t, ACT_DTYPES)
        if t.dtype not in (u.dtype, torch.float32):
            raise TypeError(f"{name} must have u's dtype {u.dtype} or float32, got {t.dtype}")
        if t.dim() == 2:
            if t.shape != (dim, N):
                raise _shape_error(name, "(dim, N) when constant", (dim, N), t.shape)
            groups.append(None)
            continue
        if t.dim() == 3:
            if t.shape != (batch, N, L):
                raise _shape_error(name, "(batch, N, L) when variable with one group", (batch, N, L), t.shape)
            groups.append(1)
            continue
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 2 (dim, N), 3 (batch, N, L) or 4 (batch, G, N, L), "
                             f"got shape {tuple(t.shape)}")
        G = t.shape[1]
        if G < 1 or dim % G != 0:
            raise ValueError(f"{name} has G = {G} groups, which must divide dim = {dim}")
        if t.shape != (batch, G, N, L):
            raise _shape_error(name, "(batch, G, N, L)", (batch, G, N, L), t.shape)
        groups.append(G)
    if D is not None:
        _check_tensor("D", D, PARAM_DTYPES)
        if D.shape != (dim,):
            raise _shape_error("D", "(dim,)", (dim,), D.shape)
    if z is not None:
        _check_tensor("z", z, ACT_DTYPES)
        if z.shape != u.shape:
            raise _shape_error("z", "(batch, dim, L)", u.shape, z.shape)
        if z.dtype != u.dtype:
            raise TypeError(f"z must have u's dtype {u.dtype}, got {z.dtype}")
    if delta_bias is not None:
        _check_tensor("delta_bias", delta_bias, PARAM_DTYPES)
        if delta_bias.shape != (dim,):
            raise _shape_error("delta_bias", "(dim,)", (dim,), delta_bias.shape)
    return batch, dim, L, N, groups[0], groups[1]


def _maths_dtype(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare_delta(delta, delta_bias, delta_softplus, dtype):
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y, u, D, z, dtype):
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Loop reference (one Python step per position; slow, for tests).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, G, N, L), (batch, N, L) or (dim, N);
    D, delta_bias: (dim,). Returns out (batch, dim, L) in u's dtype, or (out, last_state) with
    last_state (batch, dim, N) in the maths dtype (fp32, fp64 for fp64 inputs).
    """
    batch, dim, L, N, _, _ = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype = _maths_dtype(u, A, B, C, D, delta_bias)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    uf, Af = u.to(dtype), A.to(dtype)

    def per_position(M):
        """B or C as L tensors (batch, dim, N) (or L references to the constant (dim, N))."""
        M = M.to(dtype)
        if M.dim() == 2:
            return [M] * L
        if M.dim() == 3:  # (batch, N, L): one group
            M = M[:, None]
        return M.repeat_interleave(dim // M.shape[1], dim=1).unbind(-1)

    # unbind once: indexing [..., t] inside the loop would make autograd build a full-size
    # gradient per position, O(L^2) in the backward.
    steps = zip(delta.unbind(-1), uf.unbind(-1), per_position(B), per_position(C))
    x = torch.zeros(batch, dim, N, dtype=dtype, device=u.device)
    ys = []
    for dt, ut, Bt, Ct in steps:
        dt = dt[:, :, None]
        x = torch.exp(dt * Af) * x + dt * Bt * ut[:, :, None]
        ys.append((x * Ct).sum(-1))
    out = _finish(torch.stack(ys, dim=-1), uf, D, z, dtype).to(u.dtype)
    return (out, x) if return_last_state else out


def _doubling_scan(a, b):
    """x_t = a_t * x_{t-1} + b_t along the last axis (x_{-1} = 0) in ceil(log2 L) doubling steps.

    After the step of stride s, b_t is the recurrence over the 2s inputs ending at t (started from 0)
    and a_t the product of their decays: only products of decays are formed, never exp of a
    cumulative sum, so nothing overflows. Writes go through out= into fresh tensors (building them
    with torch.cat was 2-10x slower on the 2-core dev box).
    """
    L = a.shape[-1]
    s = 1
    while s < L:
        nb = torch.empty_like(b)
        nb[..., :s] = b[..., :s]
        torch.addcmul(b[..., s:], a[..., s:], b[..., :-s], out=nb[..., s:])
        b = nb
        if 2 * s < L:
            na = torch.empty_like(a)
            na[..., :s] = a[..., :s]
            torch.mul(a[..., s:], a[..., :-s], out=na[..., s:])
            a = na
        s *= 2
    return b


def _scan(a, b):
    """x_t = a_t * x_{t-1} + b_t along the last axis: doubling inside chunks of SCAN_CHUNK, doubling
    across the chunk-end states, then one correction pass (about half the memory passes of doubling
    over all of L)."""
    L = a.shape[-1]
    if L <= SCAN_CHUNK:
        return _doubling_scan(a, b)
    n = -(-L // SCAN_CHUNK)
    pad = n * SCAN_CHUNK - L
    if pad:  # decay 1 and input 0 after the end leave every real position unchanged
        a = F.pad(a, (0, pad), value=1.0)
        b = F.pad(b, (0, pad))
    a = a.unflatten(-1, (n, SCAN_CHUNK))
    x = _doubling_scan(a, b.unflatten(-1, (n, SCAN_CHUNK)))
    decay = torch.cumprod(a, dim=-1)  # decay since each chunk's start: a product of decays
    ends = _doubling_scan(decay[..., -1], x[..., -1])  # the true state at each chunk's end
    x[..., 1:, :].addcmul_(decay[..., 1:, :], ends[..., :-1, None])
    return x.flatten(-2)[..., :L]


class _LinearRecurrence(torch.autograd.Function):
    """x = scan(a, b) with the reversed scan as backward: autograd keeps a and x, not each step."""

    @staticmethod
    def forward(ctx, a, b):
        x = _scan(a, b)
        ctx.save_for_backward(a, x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        a, x = ctx.saved_tensors
        # dLoss/db_t = r_t = grad_x_t + a_{t+1} r_{t+1}: the same recurrence on reversed sequences,
        # whose decay at reversed position t' is a_{L-t'} (t' = 0 has none).
        decay = torch.empty_like(a)
        decay[..., 0] = 0
        decay[..., 1:] = a.flip(-1)[..., :-1]
        grad_b = _scan(decay, grad_x.flip(-1)).flip(-1)
        grad_a = torch.empty_like(grad_b)
        grad_a[..., 0] = 0  # x_{-1} = 0
        torch.mul(grad_b[..., 1:], x[..., :-1], out=grad_a[..., 1:])
        return grad_a, grad_b


def _grouped(M, dtype):
    """Variable B or C as (batch, G, 1, N, L); constant as (dim, N, 1)."""
    M = M.to(dtype)
    if M.dim() == 2:
        return M[:, :, None]
    if M.dim() == 3:
        M = M[:, None]
    return M[:, :, None]


def _per_channel_product(v, M, dtype):
    """v (batch, dim, [N,] L) times B or C broadcast to (batch, dim, N, L), without copying M per channel."""
    Mg = _grouped(M, dtype)
    if v.dim() == 3:
        v = v[:, :, None]
    if Mg.dim() == 3:
        return v * Mg
    batch, dim = v.shape[:2]
    G = Mg.shape[1]
    return (v.reshape(batch, G, dim // G, *v.shape[2:]) * Mg).reshape(batch, dim, *Mg.shape[3:])


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """Fast pure-PyTorch selective scan: a chunked doubling scan, whose backward is the same scan reversed.

    Same arguments, shapes and results as selective_scan_ref. Memory is O(batch*dim*N*L).
    """
    batch, dim, L, N, _, _ = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype = _maths_dtype(u, A, B, C, D, delta_bias)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    uf = u.to(dtype)
    dA = torch.exp(delta[:, :, None, :] * A.to(dtype)[None, :, :, None])
    dBu = _per_channel_product(delta * uf, B, dtype)
    x = _LinearRecurrence.apply(dA, dBu)
    y = _per_channel_product(x, C, dtype).sum(2)
    out = _finish(y, uf, D, z, dtype).to(u.dtype)
    return (out, x[..., -1]) if return_last_state else out


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, backend=None):
    """The public selective scan (mamba_ssm's selective_scan_fn) on the chosen backend.

    u, delta, z: (batch, dim, L) fp32/fp16/bf16; A: (dim, N) fp32; B, C: (batch, G, N, L),
    (batch, N, L) or constant (dim, N), in u's dtype or fp32; D, delta_bias: (dim,) fp32.
    Returns out (batch, dim, L) in u's dtype, or (out, last_state (batch, dim, N) fp32).
    backend: None (see memorymamba._backend), "torch", "cpu" or "cuda".
    """
    N = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias)[3]
    b = pick_backend("selective_scan", backend, u, delta, A, B, C, D, z, delta_bias)
    if b == "torch":
        if N > TORCH_MAX_DSTATE:
            raise ValueError(f"A has N = {N} states; the torch backend supports N <= {TORCH_MAX_DSTATE}")
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return kernel("selective_scan")(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
