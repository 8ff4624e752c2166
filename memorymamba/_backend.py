"""Which implementation runs an op: "torch" (pure PyTorch), "cpu" or "cuda" (the compiled kernels).

`backend=None` picks, in order: the MEMORYMAMBA_BACKEND environment variable if set,
else the compiled kernels for the tensors' device when they are built, else "torch".
Asking for a backend that cannot run raises BackendUnavailableError saying why.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("torch", "cpu", "cuda")
ENV_VAR = "MEMORYMAMBA_BACKEND"
REBUILD_HINT = "rebuild it with `pip install --no-build-isolation --force-reinstall --no-deps .`"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def _load_extension():
    try:
        from memorymamba import _C
    except ImportError as e:
        return None, f"the compiled extension memorymamba._C failed to import ({e}); {REBUILD_HINT}"
    if _C.torch_version != torch.__version__:
        msg = (f"memorymamba._C was built against torch {_C.torch_version} but torch "
               f"{torch.__version__} is installed; {REBUILD_HINT}")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return None, msg
    return _C, None


_C, _C_ERROR = _load_extension()


def extension():
    """The compiled module, or BackendUnavailableError with the reason it is missing."""
    if _C is None:
        raise BackendUnavailableError(_C_ERROR)
    return _C


def unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run in this process, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS}"
    if _C is None:
        return _C_ERROR
    if backend == "cuda":
        if not _C.with_cuda:
            return "memorymamba._C was built without CUDA kernels (no nvcc, a CPU torch, or MEMORYMAMBA_SKIP_CUDA_BUILD)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
    return None


def resolve(backend: str | None, *tensors: torch.Tensor | None) -> str:
    """The backend an op call runs on, checked against the device of its tensors."""
    devices = {t.device.type for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensor arguments must be on one device, got {sorted(devices)}")
    device = devices.pop() if devices else "cpu"
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"{ENV_VAR}={backend!r}"
    else:
        source = f"backend={backend!r}"
    if backend is None:
        return device if device in ("cpu", "cuda") and unavailable_reason(device) is None else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{source} is not a backend; choose one of {BACKENDS} or None")
    reason = unavailable_reason(backend)
    if reason is not None:
        raise BackendUnavailableError(f"{source} is unavailable: {reason}")
    if backend != "torch" and backend != device:
        raise ValueError(f"{source} needs {backend} tensors, got tensors on {device}")
    return backend


def available_backends() -> dict[str, str | None]:
    """backend -> None if it runs here, else why not (for `memorymamba info`)."""
    return {b: unavailable_reason(b) for b in BACKENDS}
