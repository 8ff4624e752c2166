"""What `python -m memorymamba info` prints: versions, the extension build, and each backend."""
from __future__ import annotations

import platform

import torch

from memorymamba import __version__
from memorymamba._backend import _C, _C_ERROR, available_backends


def _device_line() -> str:
    if not torch.cuda.is_available():
        return "GPU: none visible to torch"
    names = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        names.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    return "GPU: " + "; ".join(names)


def _extension_lines() -> list[str]:
    if _C is None:
        return [f"extension memorymamba._C: not usable: {_C_ERROR}"]
    lines = [f"extension memorymamba._C: built against torch {_C.torch_version}"]
    if _C.with_cuda:
        lines.append(f"  CUDA kernels: built for archs {_C.cuda_archs or '(unknown)'}; fused scan: "
                     f"{_C.css_cuda_block_channels} channels per block, {_C.css_cuda_segment_len}-step segments")
    else:
        lines.append("  CUDA kernels: not built (CPU kernels only)")
    try:
        lines.append(f"  CPU scan kernels: {_C.css_cpu_vector()}")
    except RuntimeError as e:  # a bad MEMORYMAMBA_CPU_ISA: say so here, the kernels raise the same
        lines.append(f"  CPU scan kernels: {str(e).splitlines()[0]}")
    if hasattr(_C, "selective_scan_chunk_size"):
        lines.append(f"  selective_scan: chunk {_C.selective_scan_chunk_size} positions, "
                     f"N <= {_C.selective_scan_max_dstate}")
    return lines


def info() -> str:
    """A multi-line report: package/torch/CUDA versions, the extension's build, every backend and,
    for each one that cannot run here, why."""
    cuda = torch.version.cuda or "none (CPU build of torch)"
    lines = [
        f"memorymamba {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, torch CUDA {cuda}, "
        f"{torch.get_num_threads()} CPU threads",
        _device_line(),
        *_extension_lines(),
        "backends:",
    ]
    for backend, reason in available_backends().items():
        lines.append(f"  {backend}: " + ("available" if reason is None else f"unavailable: {reason}"))
    return "\n".join(lines)
