"""The coarse / fine memory networks of the Mem-SSM block (paper eq. 15-22, DESIGN section 2.3-2.4)."""
from __future__ import annotations

import torch
import torch.nn as nn

from memorymamba import ops
from memorymamba.nn.layers import Mlp
from memorymamba.ops.memory_attention import SIMILARITIES


def query_hidden_width(dim: int) -> int:
    """Hidden width of the memory MLPs: an eighth of the channels, at least 16.

    The MLPs only map D channels to a handful of cell logits; D // 8 keeps the memory of
    memorymamba_tiny at ~4% of VMamba-T's parameters (D // 4 would add ~8%).
    """
    return max(dim // 8, 16)


class MemoryNetwork(nn.Module):
    """One memory network: query MLP -> softmax over `size` cells -> readout v -> (fused) memory vector.

    Parameters (all removed with the network): `query.fc1`, `query.fc2` (the MLP producing the query
    logits h), `cells` (size, dim) the memory M, `scale` (1,) the learnable weight of the fused vector
    (only with fusion), and `proj` (an MLP dim -> dim of the readout, only for the fine network, used
    by the InfoNCE loss).

    With fusion the block adds `scale * beta * v` (beta = similarity(v, p)); without it the readout
    v is added unweighted, so fusion owns exactly `scale` and the similarity weighting.
    """

    def __init__(self, dim: int, size: int, *, similarity: str = "cosine", fusion: bool = True,
                 projection: bool = False, hidden: int | None = None, scale_init: float = 0.1,
                 cell_std: float = 0.02):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        hidden = hidden or query_hidden_width(dim)
        self.dim, self.size, self.similarity, self.fusion = dim, size, similarity, fusion
        self.scale_init, self.cell_std = float(scale_init), float(cell_std)
        self.query = Mlp(dim, hidden, size, channel_first=False)
        self.cells = nn.Parameter(torch.empty(size, dim))
        self.scale = nn.Parameter(torch.empty(1)) if fusion else None
        self.proj = Mlp(dim, hidden, dim, channel_first=False) if projection else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fresh memory: small cells, scale = scale_init, fan-in (Kaiming) MLP weights, zero biases.

        Small cells keep a new memory from disturbing a pretrained backbone at the start. The MLPs do
        not take VMamba's 0.02 Linear init: with it the query logits h_c were ~1e-3 of |p|, and the
        contrastive hinge, a cosine of h_c whose gradient grows as 1/|h_c|, gave the query MLP a
        gradient norm of 250 against 3.5 for the whole classification gradient at initialisation
        (nano, batch 16), which gradient clipping then turns into a starved CE signal. Fan-in scaling
        keeps |h_c| ~ |p| (measured: query-MLP gradient 2.0).
        """
        nn.init.trunc_normal_(self.cells, std=self.cell_std)
        if self.scale is not None:
            self.scale.fill_(self.scale_init)
        for mlp in (self.query, self.proj):
            if mlp is not None:
                for linear in (mlp.fc1, mlp.fc2):
                    nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
                    nn.init.zeros_(linear.bias)

    def attention_params(self):
        """(w1, b1, w2, b2, cells): the arguments of ops.memory_attention after p."""
        return self.query.fc1.weight, self.query.fc1.bias, self.query.fc2.weight, self.query.fc2.bias, self.cells

    def fuse(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The vector the block adds: scale * w with fusion, else the readout v."""
        return self.scale * w if self.fusion else v

    def forward(self, p: torch.Tensor, *, backend: str | None = None):
        """p (B, dim) pooled features -> (add (B, dim), h (B, size) query logits, v (B, dim) readout)."""
        with torch.autocast(p.device.type, enabled=False):  # the op keeps its own (fp32) precision
            w, h, v = ops.memory_attention(p, *self.attention_params(), self.similarity, backend=backend)
        return self.fuse(w, v), h, v

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, similarity={self.similarity!r}, fusion={self.fusion}"
