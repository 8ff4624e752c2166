"""Which implementation an op call runs.

Ops in KERNEL_OPS have compiled kernels (their torch.library wrappers live in
memorymamba/ops/_kernels/<op>.py, imported by memorymamba.ops). Other ops (cross_scan) are
pure PyTorch: `backend=None` or MEMORYMAMBA_BACKEND runs them on "torch", and an explicit
backend="cpu"/"cuda" raises BackendUnavailableError.
"""
from __future__ import annotations

from memorymamba._backend import BackendUnavailableError, resolve
from memorymamba.ops import _kernels

KERNEL_OPS = ("selective_scan", "cross_selective_scan", "memory_attention")


def pick_backend(op: str, backend: str | None, *tensors) -> str:
    """"torch", "cpu" or "cuda" for one call of `op` on `tensors` (see the module rule)."""
    chosen = resolve(backend, *tensors)
    if chosen == "torch" or op in KERNEL_OPS:
        return chosen
    if backend is None:
        return "torch"
    raise BackendUnavailableError(
        f"backend={backend!r} is unavailable for {op}: it has no compiled kernel (it is fused into "
        f"cross_selective_scan); use backend='torch'")


def kernel(op: str, name: str | None = None):
    """The function `name` (default: `op`) of memorymamba.ops._kernels.<op>.

    A plain attribute lookup (no import machinery) so torch.compile traces through it.
    """
    return getattr(getattr(_kernels, op), name or op)
