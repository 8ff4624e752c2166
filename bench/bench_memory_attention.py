"""memory_attention: one memory network's query MLP, softmax, readout and similarity weighting,
compiled kernel vs the pure-PyTorch op. A tiny op: launch count, not bandwidth, decides its time,
so rows carry the minimum bytes but are judged on time."""
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


def case(g: dict, device: str) -> Case:
    """The case of one bench.suites grid entry."""
    return make_case(g["batch"], g["dim"], g["cells"], g["similarity"], g["dtype"], device, g["modes"])
