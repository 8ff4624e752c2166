"""Shapes and provider availability shared by the bench_<op>.py scripts."""
from __future__ import annotations

import importlib
import importlib.util
import math

# VMamba v2 widths per config (stage 1 width; it doubles per stage) and the four stage resolutions
# at 224x224 input (DESIGN section 2).
WIDTHS = {"tiny": 96, "small": 96, "base": 128}
STAGE_SIDES = (56, 28, 14, 7)
K_DIRECTIONS = 4


def stage_shape(config: str, stage: int) -> tuple[int, int]:
    """(D, side) of VMamba-<config> stage 1..4 at 224x224 (ssm_ratio 1: D is the stage width)."""
    return WIDTHS[config] * 2 ** (stage - 1), STAGE_SIDES[stage - 1]


def dt_rank(dim: int) -> int:
    return math.ceil(dim / 16)


def backend_why_not(op: str, backend: str) -> str | None:
    """None when `op` can run on `backend` here, else why not (the compiled kernel of an op exists
    only once memorymamba/ops/_kernels/<op>.py does; see memorymamba.ops._dispatch)."""
    from memorymamba._backend import unavailable_reason

    reason = unavailable_reason(backend)
    if reason is not None or backend == "torch":
        return reason
    if importlib.util.find_spec(f"memorymamba.ops._kernels.{op}") is None:
        return f"the {backend} kernel of {op} is not built yet (memorymamba/ops/_kernels/{op}.py is missing)"
    return None


MODULE_OPS = ("cross_selective_scan", "selective_scan", "memory_attention")


def module_kernel_provider(device: str) -> tuple[str | None, str | None]:
    """(why_not, note) for running a module or model with backend=None on `device` tensors: each op
    whose compiled kernel exists runs it, the others run PyTorch (memorymamba.ops._dispatch).
    It needs at least the fused SS2D core; the note lists the ops that ran compiled."""
    why = backend_why_not("cross_selective_scan", device)
    compiled = [op for op in MODULE_OPS if backend_why_not(op, device) is None]
    return why, "compiled: " + ",".join(compiled)


def mamba_ssm_scan():
    """(mamba_ssm's selective_scan_fn, None) or (None, why it cannot run)."""
    try:
        mod = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        return mod.selective_scan_fn, None
    except Exception as e:  # ImportError, or a broken CUDA build of it
        return None, f"mamba_ssm is not importable ({type(e).__name__})"
