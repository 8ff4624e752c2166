"""memory_attention: one memory network's query MLP, softmax, readout and similarity weighting,
compiled kernel vs the pure-PyTorch op. A tiny op: launch count, not bandwidth, decides its time,
so rows carry the minimum bytes but are judged on time.

Grid entries with `side` are the block's whole memory path instead (op memory_attention_fused): F~
(B, D, side, side) -> pooling + coarse (`cells`) and fine (2 * `cells`) networks, the fused kernel
(one launch forward, two backward) vs the pure-PyTorch path (f.mean + two ops.memory_attention);
there the one read of F~ (and the broadcast write of its gradient) are the minimum bytes."""
from __future__ import annotations

import torch

from bench import common
from bench.harness import Case, Provider, esize


def make_case(batch: int, dim: int, cells: int, similarity: str, dtype: torch.dtype, device: str,
              modes=("fwd", "bwd", "fwd+bwd")) -> Case:
    from memorymamba import ops
    from memorymamba.nn.memory import query_hidden_width

    hidden = query_hidden_width(dim)

    def make_inputs():
        def param(*shape, scale):
            return (torch.randn(*shape, device=device) * scale).requires_grad_()
        p = torch.randn(batch, dim, device=device, dtype=dtype, requires_grad=True)
        return (p, param(hidden, dim, scale=dim ** -0.5), param(hidden, scale=0.1),
                param(cells, hidden, scale=hidden ** -0.5), param(cells, scale=0.1), param(cells, dim, scale=0.02))

    def run(backend):
        return lambda *a: ops.memory_attention(*a, similarity, backend=backend)

    providers = [Provider(f"kernel-{device}", run(device), common.backend_why_not("memory_attention", device)),
                 Provider("torch", run("torch"), baseline=True)]

    def nbytes(mode):
        params = (hidden * dim + hidden + cells * hidden + cells + cells * dim) * 4
        fwd = batch * (dim + 2 * dim + cells) * esize(dtype) + params  # read p, write w, v, h
        return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]

    return Case(op="memory_attention",
                shape=dict(batch=batch, dim=dim, hidden=hidden, cells=cells, similarity=similarity),
                dtype=dtype, providers=providers, make_inputs=make_inputs, modes=modes, bytes_fn=nbytes)


def make_fused_case(batch: int, dim: int, side: int, cells: int, similarity: str, dtype: torch.dtype, device: str,
                    modes=("fwd", "bwd", "fwd+bwd")) -> Case:
    from memorymamba import ops
    from memorymamba.nn.memory import query_hidden_width

    hidden = query_hidden_width(dim)
    sizes = (cells, 2 * cells)

    def make_inputs():
        def net(m):
            return tuple((torch.randn(*s, device=device) * sc).requires_grad_() for s, sc in (
                ((hidden, dim), dim ** -0.5), ((hidden,), 0.1), ((m, hidden), hidden ** -0.5), ((m,), 0.1),
                ((m, dim), 1.0)))
        f = torch.randn(batch, dim, side, side, device=device, dtype=dtype, requires_grad=True)
        return (f, *(net(m) for m in sizes))

    def fused(f, coarse, fine):
        from memorymamba.ops._kernels.memory_attention import memory_attention_fused
        return memory_attention_fused(f, coarse, fine, similarity)

    def torch_path(f, coarse, fine):
        p = f.mean(dim=(2, 3))
        return (p, *ops.memory_attention(p, *coarse, similarity, backend="torch"),
                *ops.memory_attention(p, *fine, similarity, backend="torch"))

    providers = [Provider(f"kernel-{device}", fused, common.backend_why_not("memory_attention", device)),
                 Provider("torch", torch_path, baseline=True)]

    def nbytes(mode):
        f_bytes = batch * dim * side * side * esize(dtype)
        return {"fwd": f_bytes, "bwd": f_bytes, "fwd+bwd": 2 * f_bytes}[mode]

    return Case(op="memory_attention_fused",
                shape=dict(batch=batch, dim=dim, side=side, hidden=hidden, cells=f"{sizes[0]}+{sizes[1]}",
                           similarity=similarity),
                dtype=dtype, providers=providers, make_inputs=make_inputs, modes=modes, bytes_fn=nbytes)


def case(g: dict, device: str) -> Case:
    """The case of one bench.suites grid entry (with `side`: the fused memory path of a block)."""
    if "side" in g:
        return make_fused_case(g["batch"], g["dim"], g["side"], g["cells"], g["similarity"], g["dtype"], device,
                               g["modes"])
    return make_case(g["batch"], g["dim"], g["cells"], g["similarity"], g["dtype"], device, g["modes"])
