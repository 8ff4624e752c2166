// The three F~ dtypes of the memory-attention kernels (float64 runs the pure-PyTorch reference).
#pragma once
#include <ATen/ATen.h>

#define MATTN_DISPATCH_INPUT_TYPES(DTYPE, NAME, ...)                                                 \
  [&] {                                                                                               \
    switch (DTYPE) {                                                                                  \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                              \
      case at::kHalf: { using scalar_t = at::Half; return __VA_ARGS__(); }                            \
      case at::kBFloat16: { using scalar_t = at::BFloat16; return __VA_ARGS__(); }                    \
      default: TORCH_CHECK(false, NAME, ": f_tilde must be float32, float16 or bfloat16, got ", DTYPE); \
    }                                                                                                 \
  }()
