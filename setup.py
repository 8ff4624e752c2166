"""Build memorymamba and its one extension, memorymamba._C, from csrc/.

Environment:
  MEMORYMAMBA_SKIP_CUDA_BUILD=1   build the CPU kernels only
  MEMORYMAMBA_FORCE_CUDA_BUILD=1  fail if the CUDA kernels cannot be built
  TORCH_CUDA_ARCH_LIST            archs to build (default without a visible GPU: "8.0;9.0")
  MAX_JOBS                        parallel compile jobs (ninja)
  CUDA_HOME                       CUDA toolkit; default: the folder above the real nvcc's bin/
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The toolkit folder of the nvcc on PATH (following wrapper scripts), not PyTorch's guess."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    # /usr/local/bin/nvcc may be a shell wrapper that execs the real one.
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            for word in head.decode(errors="ignore").split():
                if word.endswith("/bin/nvcc") and os.path.exists(word):
                    candidates.insert(0, os.path.dirname(os.path.dirname(word)))
    except OSError:
        pass
    for c in candidates:
        if os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


CUDA_HOME = _find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # must be set before torch.utils.cpp_extension is imported


def _pip_cuda_includes():
    """Library headers (cusparse.h, cublas_v2.h) that ATen's CUDA headers include, from the pip
    nvidia wheels that a CUDA build of torch installs, when the toolkit itself lacks them."""
    if os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    import sysconfig
    found = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "include", "cusparse.h"))
    return [os.path.dirname(found[0])] if found else []


def _extensions():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    skip_cuda = _env_flag("MEMORYMAMBA_SKIP_CUDA_BUILD")
    force_cuda = _env_flag("MEMORYMAMBA_FORCE_CUDA_BUILD")
    why_no_cuda = None
    if skip_cuda:
        why_no_cuda = "MEMORYMAMBA_SKIP_CUDA_BUILD is set"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None:
        why_no_cuda = "nvcc not found on PATH and CUDA_HOME is not set"
    if why_no_cuda and force_cuda:
        sys.exit(f"MEMORYMAMBA_FORCE_CUDA_BUILD=1 but the CUDA kernels cannot be built: {why_no_cuda}")
    with_cuda = why_no_cuda is None

    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    include_dirs = [os.path.join(HERE, "csrc")]
    if with_cuda:
        include_dirs += _pip_cuda_includes()
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    jobs = os.environ.get("MAX_JOBS", "")
    # The archs the CUDA kernels are compiled for, as `_C.cuda_archs` ("" for a CPU-only build).
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    archs = ";".join(a for a in archs.replace(" ", ";").split(";") if a)
    versions = [f'-DMEMORYMAMBA_TORCH_VERSION="{torch.__version__}"',
                f'-DMEMORYMAMBA_CUDA_ARCHS="{archs}"']
    # torch >= 2.10 headers require C++20.
    # -fopenmp: without it at::parallel_for (an inline header) compiles to a serial loop in our
    # files; the GOMP symbols resolve to the libgomp that torch already loads.
    # -fno-trapping-math lets GCC if-convert the branch-free exp/log of csrc/common/ssm_math.h
    # so the CPU kernels' loops vectorise; it changes no result, only FP exception flags.
    # -Wno-psabi: the CPU kernels pass 64-byte SIMD vectors only to forced-inline functions, so GCC's
    # note that their by-value ABI changed between GCC versions does not apply.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-Wno-psabi", *versions]
    define = []
    if with_cuda:
        define.append(("MEMORYMAMBA_WITH_CUDA", None))
        nvcc = [
            "-O3", "-std=c++20", "-lineinfo", "-Xptxas=-v", "--use_fast_math",
            "--expt-relaxed-constexpr", "--expt-extended-lambda",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
            *versions,
            f"--threads={jobs or 1}",
        ]
        ext = CUDAExtension(
            "memorymamba._C", sources + cuda_sources, define_macros=define,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
        print(f"memorymamba: building CPU + CUDA kernels (CUDA_HOME={CUDA_HOME}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    else:
        ext = CppExtension(
            "memorymamba._C", sources, define_macros=define,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
        )
        print(f"memorymamba: building CPU kernels only ({why_no_cuda})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="memorymamba",
    version="0.1.0",
    description="MemoryMamba (arXiv 2405.03673) with fused CUDA/CPU kernels for its block",
    packages=find_packages(include=["memorymamba", "memorymamba.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "einops", "numpy", "pillow", "pyyaml", "tqdm", "matplotlib"],
    extras_require={
        "train": ["torchvision"],
        "bench": ["pytest-benchmark", "nvidia-ml-py", "triton"],
        "test": ["pytest", "pytest-timeout", "scikit-learn"],
    },
    entry_points={"console_scripts": ["memorymamba=memorymamba.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
