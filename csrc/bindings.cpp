// The one Python module of the extension: memorymamba._C.
#include <torch/extension.h>

#include "common/registry.h"

#ifndef MEMORYMAMBA_TORCH_VERSION
#error "setup.py must define MEMORYMAMBA_TORCH_VERSION"
#endif

#ifndef MEMORYMAMBA_CUDA_ARCHS
#define MEMORYMAMBA_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("torch_version") = MEMORYMAMBA_TORCH_VERSION;
  // TORCH_CUDA_ARCH_LIST at build time, e.g. "8.0;9.0"; "" without CUDA kernels.
  m.attr("cuda_archs") = MEMORYMAMBA_CUDA_ARCHS;
#ifdef MEMORYMAMBA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  bind_selective_scan(m);
  bind_cross_selective_scan(m);
  bind_memory_attention(m);
}
