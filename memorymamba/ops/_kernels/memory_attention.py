"""torch.library ops over the fused memory-attention kernels (memorymamba._C).

`memory_attention_fused(f_tilde, coarse, fine, similarity)` pools F~ once and runs zero, one or both
memory networks in one kernel launch (one block / one CPU task per sample); `memory_attention(p, ...)`
(the kernel backend of the public per-network op) is the same kernel on p viewed as a 1x1 image.
Backward: two launches (per-sample gradients, then the parameter gradients summed over the batch in
a fixed order); no atomics, so every backend is bitwise deterministic. dL/dF~ is dL/dp / (H*W)
broadcast over (H, W), returned as an expanded view (the caller's sum with the main gradient reads it).
Parameters are used in fp32; outputs have F~'s dtype, the pooled p is computed in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

from memorymamba._backend import extension
from memorymamba.ops.memory_attention import SIMILARITIES, check_memory_attention_args

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Tensor = torch.Tensor
_NET_ARGS = 5  # w1, b1, w2, b2, memory


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _nets(flat):
    """The enabled networks of a flat (w1, b1, w2, b2, memory) x 2 argument list (w1 None = off)."""
    return [flat[i:i + _NET_ARGS] for i in (0, _NET_ARGS) if flat[i] is not None]


@torch.library.custom_op("memorymamba::memory_attention_fused", mutates_args=())
def _fused(f: Tensor, w1_c: Optional[Tensor], b1_c: Optional[Tensor], w2_c: Optional[Tensor],
           b2_c: Optional[Tensor], mem_c: Optional[Tensor], w1_f: Optional[Tensor], b1_f: Optional[Tensor],
           w2_f: Optional[Tensor], b2_f: Optional[Tensor], mem_f: Optional[Tensor], similarity: int
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, D = f.shape[:2]
    p = torch.empty(B, D, device=f.device, dtype=torch.float32)
    outs, args = [], []
    for w1, b1, w2, b2, mem in (_nets([w1_c, b1_c, w2_c, b2_c, mem_c, w1_f, b1_f, w2_f, b2_f, mem_f])):
        w, v = (torch.empty(B, D, device=f.device, dtype=f.dtype) for _ in range(2))
        h = torch.empty(B, w2.shape[0], device=f.device, dtype=f.dtype)
        args.append([w1, b1, w2, b2, mem, w, h, v])
        outs.append((w, h, v))
    extension().memory_attention_fwd(f, p, similarity, args)
    res = [p]
    for on in (w1_c is not None, w1_f is not None):
        res.extend(outs.pop(0) if on else (f.new_empty(0) for _ in range(3)))  # outputs may not alias
    return tuple(res)


@_fused.register_fake
def _(f, w1_c, b1_c, w2_c, b2_c, mem_c, w1_f, b1_f, w2_f, b2_f, mem_f, similarity):
    B, D = f.shape[:2]
    res = [f.new_empty(B, D, dtype=torch.float32)]
    for w2 in (w2_c, w2_f):
        if w2 is None:
            res.extend(f.new_empty(0) for _ in range(3))
        else:
            res.extend((f.new_empty(B, D), f.new_empty(B, w2.shape[0]), f.new_empty(B, D)))
    return tuple(res)


@torch.library.custom_op("memorymamba::memory_attention_fused_bwd", mutates_args=())
def _fused_bwd(p: Tensor, dp: Optional[Tensor], dw_c: Optional[Tensor], dh_c: Optional[Tensor],
               dv_c: Optional[Tensor], dw_f: Optional[Tensor], dh_f: Optional[Tensor], dv_f: Optional[Tensor],
               w1_c: Optional[Tensor], b1_c: Optional[Tensor], w2_c: Optional[Tensor], b2_c: Optional[Tensor],
               mem_c: Optional[Tensor], w1_f: Optional[Tensor], b1_f: Optional[Tensor], w2_f: Optional[Tensor],
               b2_f: Optional[Tensor], mem_f: Optional[Tensor], similarity: int, dp_scale: float
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dp * dp_scale (B, D) fp32, then per network dw1, db1, dw2, db2, dmemory; empty where absent)."""
    dp_out = torch.empty_like(p)
    args, grads = [], []
    params = [w1_c, b1_c, w2_c, b2_c, mem_c, w1_f, b1_f, w2_f, b2_f, mem_f]
    incoming = {0: (dw_c, dh_c, dv_c), _NET_ARGS: (dw_f, dh_f, dv_f)}
    for i in (0, _NET_ARGS):
        w1, b1, w2, b2, mem = params[i:i + _NET_ARGS]
        if w1 is None:
            grads.extend(p.new_empty(0) for _ in range(_NET_ARGS))
            continue
        g = [torch.empty_like(w1), None if b1 is None else torch.empty_like(b1), torch.empty_like(w2),
             None if b2 is None else torch.empty_like(b2), torch.empty_like(mem)]
        args.append([w1, b1, w2, b2, mem, *(_f32(t) for t in incoming[i]), *g])
        grads.extend(p.new_empty(0) if t is None else t for t in g)
    extension().memory_attention_bwd(p, _f32(dp), dp_out, dp_scale, similarity, args)
    return (dp_out, *grads)


@_fused_bwd.register_fake
def _(p, dp, dw_c, dh_c, dv_c, dw_f, dh_f, dv_f, w1_c, b1_c, w2_c, b2_c, mem_c, w1_f, b1_f, w2_f, b2_f, mem_f,
      similarity, dp_scale):
    params = [w1_c, b1_c, w2_c, b2_c, mem_c, w1_f, b1_f, w2_f, b2_f, mem_f]
    return (torch.empty_like(p), *(p.new_empty(0) if t is None else torch.empty_like(t) for t in params))


def _setup_context(ctx, inputs, output):
    f, *params, similarity = inputs
    ctx.save_for_backward(output[0], *params)
    ctx.f_meta = (f.shape, f.dtype)
    ctx.similarity = similarity
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None (the kernel skips them): no zero fills


def _backward(ctx, dp, dw_c, dh_c, dv_c, dw_f, dh_f, dv_f):
    p, *params = ctx.saved_tensors
    (B, D, H, W), dtype = ctx.f_meta
    dp_scaled, *grads = _fused_bwd(p, dp, dw_c, dh_c, dv_c, dw_f, dh_f, dv_f, *params, ctx.similarity,
                                   1.0 / (H * W))
    df = dp_scaled.to(dtype)[:, :, None, None].expand(B, D, H, W)
    return (df, *(None if t is None else g for t, g in zip(params, grads)), None)


_fused.register_autograd(_backward, setup_context=_setup_context)


def _net_args(net, D, name):
    if net is None:
        return [None] * _NET_ARGS
    if len(net) != _NET_ARGS:
        raise ValueError(f"{name} must be (w1, b1, w2, b2, memory), got {len(net)} items")
    w1, b1, w2, b2, mem = net
    probe = torch.empty(1, D, device=w1.device, dtype=torch.float32)
    check_memory_attention_args(probe, w1, b1, w2, b2, mem, "cosine")
    for pname, t in zip(("w1", "b1", "w2", "b2", "memory"), net):
        if t is not None and t.dtype == torch.float64:
            raise TypeError(f"{name}.{pname} must be float32 (or half) for the compiled kernels, got float64")
    return [_f32(t) for t in net]


def memory_attention_fused(f_tilde, coarse=None, fine=None, similarity="cosine"):
    """Pooling + both memory networks of a Mem-SSM block in one kernel (CPU or CUDA).

    f_tilde (B, D, H, W) fp32/fp16/bf16, any strides; coarse / fine: (w1 (Hd, D), b1 (Hd,) | None,
    w2 (m, Hd), b2 (m,) | None, memory (m, D)) or None for a network that is off (Hd, m may differ
    between them). Returns (p (B, D), w_c, h_c, v_c, w_f, h_f, v_f) in f_tilde's dtype, with w, v
    (B, D), h (B, m) as memory_attention's and None for a network that is off.
    """
    if not isinstance(f_tilde, torch.Tensor) or f_tilde.dim() != 4 or min(f_tilde.shape) < 1:
        raise ValueError("f_tilde must be a tensor of shape (B, D, H, W) with every size >= 1, got "
                         f"{tuple(f_tilde.shape) if isinstance(f_tilde, torch.Tensor) else type(f_tilde).__name__}")
    if f_tilde.dtype not in KERNEL_DTYPES:
        raise TypeError(f"f_tilde must be float32, float16 or bfloat16 for the compiled kernels, got {f_tilde.dtype}; "
                        "use the pure-PyTorch path for other dtypes")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    D = f_tilde.shape[1]
    args = _net_args(coarse, D, "coarse") + _net_args(fine, D, "fine")
    p, *outs = _fused(f_tilde, *args, SIMILARITIES.index(similarity))
    outs = [None if net is None else t for net, t in zip((coarse,) * 3 + (fine,) * 3, outs)]
    return (p.to(f_tilde.dtype), *outs)


def memory_attention(p, w1, b1, w2, b2, memory, similarity="cosine"):
    """Kernel backend of ops.memory_attention: p (B, D) as a 1x1 image. Returns (w, h, v) in p's dtype."""
    if p.dtype not in KERNEL_DTYPES:
        raise TypeError(f"p must be float32, float16 or bfloat16 for the compiled kernels, got {p.dtype}; "
                        "use backend='torch' for float64")
    _, w, h, v, *_ = memory_attention_fused(p[:, :, None, None], (w1, b1, w2, b2, memory), None, similarity)
    return w, h, v
