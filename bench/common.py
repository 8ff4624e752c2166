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


def backends_why_not(ops: tuple[str, ...], backend: str) -> str | None:
    """None when every op of `ops` runs on `backend`, else the distinct reasons why not."""
    reasons = dict.fromkeys(r for r in (backend_why_not(op, backend) for op in ops) if r)
    return "; ".join(reasons) or None


def mamba_ssm_scan():
    """(mamba_ssm's selective_scan_fn, None) or (None, why it cannot run)."""
    try:
        mod = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        return mod.selective_scan_fn, None
    except Exception as e:  # ImportError, or a broken CUDA build of it
        return None, f"mamba_ssm is not importable ({type(e).__name__})"
