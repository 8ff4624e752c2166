"""Memory query, readout and fusion weighting of one MemoryMamba memory network (eq. 15-22).

For pooled features p (B, D) and m memory cells (m, D):
    h    = w2 @ gelu(w1 @ p + b1) + b2          (B, m) query logits; gelu is the exact (erf) GELU
    a    = softmax(h) over the m cells
    v    = a @ memory                           (B, D) readout M_bar
    beta = sim(v, p)                            (B,) one of, with EPS = 1e-8:
           "cosine": <v, p> / (sqrt(max(|v|^2, EPS^2)) * sqrt(max(|p|^2, EPS^2)))
           "l1":     -mean_d |v_d - p_d|
           "l2":     -sqrt(mean_d (v_d - p_d)^2 + EPS)
    w    = beta * v                             (B, D) the vector added to F~ (broadcast over H, W)
The kernels implement exactly these forms. Maths is fp32 (fp64 for fp64 inputs); outputs have p's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memorymamba.ops._dispatch import kernel, pick_backend
from memorymamba.ops.selective_scan import ACT_DTYPES, _check_tensor, _maths_dtype

SIMILARITIES = ("cosine", "l1", "l2")
EPS = 1e-8


def check_memory_attention_args(p, w1, b1, w2, b2, memory, similarity):
    """Validate the inputs; returns (B, D, Hd, m). Errors name the argument and the rule."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    for name, t in (("p", p), ("w1", w1), ("w2", w2), ("memory", memory)):
        _check_tensor(name, t, ACT_DTYPES)
    if p.dim() != 2 or min(p.shape) < 1:
        raise ValueError(f"p must have shape (B, D) with B, D >= 1, got {tuple(p.shape)}")
    B, D = p.shape
    if w1.dim() != 2 or w1.shape[1] != D or w1.shape[0] < 1:
        raise ValueError(f"w1 must have shape (Hd, D) with D = {D} and Hd >= 1, got {tuple(w1.shape)}")
    Hd = w1.shape[0]
    if w2.dim() != 2 or w2.shape[1] != Hd or w2.shape[0] < 1:
        raise ValueError(f"w2 must have shape (m, Hd) with Hd = {Hd} and m >= 1, got {tuple(w2.shape)}")
    m = w2.shape[0]
    if memory.shape != (m, D):
        raise ValueError(f"memory must have shape (m, D) = {(m, D)}, got {tuple(memory.shape)}")
    for name, t, size in (("b1", b1, Hd), ("b2", b2, m)):
        if t is not None:
            _check_tensor(name, t, ACT_DTYPES)
            if t.shape != (size,):
                raise ValueError(f"{name} must have shape ({'Hd' if name == 'b1' else 'm'},) = ({size},), "
                                 f"got {tuple(t.shape)}")
    return B, D, Hd, m


def similarity_fn(v, p, similarity):
    """beta (B,) = sim(v, p) for v, p (B, D), in the exact forms of the module docstring."""
    if similarity == "cosine":
        nv = v.square().sum(-1).clamp_min(EPS * EPS).sqrt()
        np_ = p.square().sum(-1).clamp_min(EPS * EPS).sqrt()
        return (v * p).sum(-1) / (nv * np_)
    if similarity == "l1":
        return -(v - p).abs().mean(-1)
    return -((v - p).square().mean(-1) + EPS).sqrt()


def memory_attention_ref(p, w1, b1, w2, b2, memory, similarity="cosine"):
    """Reference memory attention.

    p (B, D) pooled features; w1 (Hd, D), b1 (Hd,) or None; w2 (m, Hd), b2 (m,) or None;
    memory (m, D). Returns (w (B, D), h (B, m), v (B, D)) in p's dtype.
    """
    check_memory_attention_args(p, w1, b1, w2, b2, memory, similarity)
    dtype = _maths_dtype(p, w1, b1, w2, b2, memory)
    pf = p.to(dtype)
    hidden = F.gelu(F.linear(pf, w1.to(dtype), None if b1 is None else b1.to(dtype)))
    h = F.linear(hidden, w2.to(dtype), None if b2 is None else b2.to(dtype))
    v = torch.softmax(h, dim=-1) @ memory.to(dtype)
    w = similarity_fn(v, pf, similarity)[:, None] * v
    return w.to(p.dtype), h.to(p.dtype), v.to(p.dtype)


def memory_attention(p, w1, b1, w2, b2, memory, similarity="cosine", *, backend=None):
    """Memory attention on the chosen backend; arguments and results as memory_attention_ref.

    backend=None runs "torch" until memorymamba/ops/_kernels/memory_attention.py exists (see
    memorymamba.ops._dispatch); an explicit "cpu"/"cuda" before then raises BackendUnavailableError.
    """
    check_memory_attention_args(p, w1, b1, w2, b2, memory, similarity)
    if pick_backend("memory_attention", backend, p, w1, b1, w2, b2, memory) == "torch":
        return memory_attention_ref(p, w1, b1, w2, b2, memory, similarity)
    return kernel("memory_attention")(p, w1, b1, w2, b2, memory, similarity)
