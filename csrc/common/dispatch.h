// The activation dtypes every kernel is instantiated for (no float64: it would add kernels nobody
// calls; the pure-PyTorch references run float64). TYPE names the type alias inside the lambda.
#pragma once
#include <ATen/ATen.h>

#define MM_DISPATCH_FLOAT_TYPES(DTYPE, TYPE, WHAT, ...)                                    \
  [&] {                                                                                   \
    switch (DTYPE) {                                                                      \
      case at::kFloat: { using TYPE = float; return __VA_ARGS__(); }                      \
      case at::kHalf: { using TYPE = at::Half; return __VA_ARGS__(); }                    \
      case at::kBFloat16: { using TYPE = at::BFloat16; return __VA_ARGS__(); }            \
      default: TORCH_CHECK(false, WHAT, " must be float32, float16 or bfloat16, got ", DTYPE); \
    }                                                                                     \
  }()
