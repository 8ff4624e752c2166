"""Which implementation an op call runs, with one rule for kernels that are not written yet.

Rule: `backend=None` (including MEMORYMAMBA_BACKEND) picks a compiled backend for an op only
when its wrapper module memorymamba/ops/_kernels/<op>.py exists; otherwise it runs "torch".
An explicit backend="cpu"/"cuda" for such an op raises BackendUnavailableError.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

from memorymamba._backend import BackendUnavailableError, resolve


@functools.lru_cache(maxsize=None)
def _kernel_module_exists(op: str) -> bool:
    return importlib.util.find_spec(f"memorymamba.ops._kernels.{op}") is not None


def pick_backend(op: str, backend: str | None, *tensors) -> str:
    """"torch", "cpu" or "cuda" for one call of `op` on `tensors` (see the module rule)."""
    chosen = resolve(backend, *tensors)
    if chosen == "torch" or _kernel_module_exists(op):
        return chosen
    if backend is None:
        return "torch"
    raise BackendUnavailableError(
        f"backend={backend!r} is unavailable for {op}: its kernel is not built yet "
        f"(memorymamba/ops/_kernels/{op}.py does not exist); use backend='torch'")


def kernel(op: str, name: str | None = None):
    """The function `name` (default: `op`) of memorymamba.ops._kernels.<op>."""
    return getattr(importlib.import_module(f"memorymamba.ops._kernels.{op}"), name or op)
