"""Shared test helpers: backend parametrization with clean skips, seeded inputs, error-printing asserts.

No CUDA call happens at import: devices are touched only inside tests that asked for them.
"""
import zlib

import pytest
import torch

from memorymamba._backend import unavailable_reason
from memorymamba.ops import _dispatch

BACKENDS = ("torch", "cpu", "cuda")

# The references' dense convs and matmuls must run in true fp32 on a GPU: TF32 (cuDNN's default)
# errs ~1e-3, far above the fp32 tolerances. Setting the flags makes no CUDA call.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed(request):
    # A different but reproducible stream per test id, so parametrized cases see different data.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def require_backend(backend, op):
    """Skip unless `backend` can run `op` here; returns the device its tensors must live on."""
    reason = unavailable_reason(backend)
    if reason is None and backend != "torch" and op not in _dispatch.KERNEL_OPS:
        reason = f"{op} has no compiled kernel"
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")
    return torch.device("cuda" if backend == "cuda" else "cpu")


def assert_close(name, actual, expected, rtol, atol):
    """assert_close that prints the max abs and rel errors first (visible with pytest -s / on failure)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (actual - expected).abs()
    rel = (err / expected.abs().clamp_min(atol)).max().item() if err.numel() else 0.0
    print(f"{name}: max abs err {err.max().item() if err.numel() else 0.0:.3e}, max rel err {rel:.3e}")
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
