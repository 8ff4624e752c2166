// CPU-only helpers shared by the ops' CPU kernels: function multi-versioning for the vectorisable
// loops, and a fixed-order dot product.
#pragma once

#include <cstdint>

// Vectorised for AVX-512 / AVX2+FMA where the CPU has them (GCC function multi-versioning; the
// ifunc resolver picks at load time).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MM_CPU_VEC __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MM_CPU_VEC
#endif

namespace memorymamba {
namespace {

// Fixed-order sum of x*y over n: 32 interleaved partial sums (several independent SIMD
// accumulators, so the add latency does not bound it); the same order on every call and thread.
MM_CPU_VEC float mm_dot(const float* __restrict__ x, const float* __restrict__ y, int64_t n) {
  constexpr int kAcc = 32;
  float acc[kAcc] = {};
  int64_t l = 0;
  for (; l + kAcc <= n; l += kAcc)
    for (int j = 0; j < kAcc; ++j) acc[j] += x[l + j] * y[l + j];
  float s = 0.f;
  for (; l < n; ++l) s += x[l] * y[l];
  for (int j = 0; j < kAcc; ++j) s += acc[j];
  return s;
}

}  // namespace
}  // namespace memorymamba
