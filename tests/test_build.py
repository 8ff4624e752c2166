"""The built extension: it imports, matches the running torch, has CUDA kernels where a toolkit is
present, and `info()` reports every backend."""
import glob
import os
import re
import shutil

import pytest
import torch

from memorymamba._backend import BACKENDS, unavailable_reason


def _extension():
    from memorymamba._backend import extension
    return extension()


def _cuda_toolkit_present():
    return bool(os.environ.get("CUDA_HOME") or shutil.which("nvcc") or glob.glob("/usr/local/cuda*/bin/nvcc"))


def test_extension_imports_and_matches_torch():
    _C = _extension()
    assert _C.torch_version == torch.__version__, (
        f"memorymamba._C was built against torch {_C.torch_version}, running {torch.__version__}")


def test_cuda_kernels_built_where_the_toolkit_is_present():
    if torch.version.cuda is None or not _cuda_toolkit_present():
        pytest.skip("no CUDA toolkit or a CPU-only torch: the CPU-only build is expected")
    if os.environ.get("MEMORYMAMBA_SKIP_CUDA_BUILD", "0").lower() in ("1", "true", "yes", "on"):
        pytest.skip("MEMORYMAMBA_SKIP_CUDA_BUILD is set")
    _C = _extension()
    assert _C.with_cuda, "nvcc and a CUDA torch are present but memorymamba._C has no CUDA kernels"
    archs = _C.cuda_archs.split(";")
    print(f"built for archs {archs}")
    assert archs and all(re.fullmatch(r"\d+\.\d+(\+PTX)?a?", a) for a in archs), _C.cuda_archs


def test_kernel_constants_are_exposed():
    _C = _extension()
    assert _C.selective_scan_max_dstate == 64
    assert _C.selective_scan_chunk_size > 0


def test_info_mentions_each_backend():
    from memorymamba._info import info
    text = info()
    print(text)
    assert f"torch {torch.__version__}" in text
    for backend in BACKENDS:
        reason = unavailable_reason(backend)
        assert f"  {backend}: " + ("available" if reason is None else f"unavailable: {reason}") in text
    assert "built against torch" in text and "CUDA kernels:" in text
    assert f"CPU scan kernels: {_extension().css_cpu_vector()}" in text
    if _extension().with_cuda:  # CI's build has the CUDA kernels, so this runs there
        assert f"{_extension().css_cuda_block_channels} channels per block" in text


def test_info_names_the_forced_cpu_vector_build(monkeypatch):
    monkeypatch.setenv("MEMORYMAMBA_CPU_ISA", "baseline")
    assert _extension().css_cpu_vector() == "baseline (4 channels per step)"
