"""Operators of MemoryMamba: pure-PyTorch references and the public ops with a `backend` switch."""
from memorymamba.ops.cross_scan import cross_merge, cross_scan
from memorymamba.ops.cross_selective_scan import cross_selective_scan, cross_selective_scan_ref
from memorymamba.ops.memory_attention import SIMILARITIES, memory_attention, memory_attention_ref
from memorymamba.ops.selective_scan import selective_scan_fn, selective_scan_ref, selective_scan_torch

# The compiled-kernel wrappers import the modules above, so they come last.
import importlib as _importlib

from memorymamba.ops._dispatch import KERNEL_OPS as _KERNEL_OPS

for _op in _KERNEL_OPS:
    _importlib.import_module(f"memorymamba.ops._kernels.{_op}")

__all__ = [
    "SIMILARITIES",
    "cross_merge",
    "cross_scan",
    "cross_selective_scan",
    "cross_selective_scan_ref",
    "memory_attention",
    "memory_attention_ref",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_scan_torch",
]
