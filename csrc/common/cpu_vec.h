// CPU-only helpers shared by the ops' CPU kernels: function multi-versioning for the vectorisable
// loops, the float mode their tasks run in (flush-to-zero), the instruction set the hand-dispatched
// kernels use, and a fixed-order dot product.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/macros.h"

// Vectorised for AVX-512 / AVX2+FMA where the CPU has them (GCC function multi-versioning; the
// ifunc resolver picks at load time).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MM_CPU_VEC __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MM_CPU_VEC
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace memorymamba {

// Flush-to-zero and denormals-are-zero for the scope of a CPU kernel's task, the caller's mode
// restored after. GCC turns the range clamps of the branch-free exp into blends of constants, so a
// silu loop computes z * 6e-39 on every lane before blending it away: a denormal result, and a
// microcode assist per vector instruction (selective_scan's z gate ran 9.0 ns per element instead
// of 0.97 ns; the whole forward 192 ms instead of 110 ms, 1 thread). Denormal inputs read as 0 here.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtzDaz); }
  ~FlushDenormals() { _mm_setcsr(saved_); }
#else
  FlushDenormals() = default;
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
#if defined(__x86_64__) || defined(_M_X64)
  static constexpr unsigned kFtzDaz = 0x8040;  // MXCSR bit 15 (FTZ) | bit 6 (DAZ)
  unsigned saved_;
#endif
};

// The widest vector instruction set the CPU kernels may use: the CPU's, or a narrower one named by
// MEMORYMAMBA_CPU_ISA (avx512 | avx2 | baseline), e.g. to test the builds this CPU would not pick.
enum class CpuIsa { kAvx512, kAvx2, kBaseline };
inline CpuIsa cpu_isa() {
  CpuIsa best = CpuIsa::kBaseline;
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
#if !defined(__clang__)
  if (__builtin_cpu_supports("x86-64-v4")) best = CpuIsa::kAvx512;
  else if (__builtin_cpu_supports("x86-64-v3")) best = CpuIsa::kAvx2;
#else
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::kAvx2;
#endif
#endif
  const char* env = std::getenv("MEMORYMAMBA_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  MM_CHECK(want == "avx512" || want == "avx2" || want == "baseline",
           "MEMORYMAMBA_CPU_ISA must be avx512, avx2 or baseline, got '", want, "'");
  const CpuIsa asked = want == "avx512" ? CpuIsa::kAvx512 : want == "avx2" ? CpuIsa::kAvx2 : CpuIsa::kBaseline;
  MM_CHECK(int(asked) >= int(best), "MEMORYMAMBA_CPU_ISA=", want, " asks for more than this CPU has");
  return asked;
}

namespace {

// Fixed-order sum of x*y over n: 32 interleaved partial sums (several independent SIMD
// accumulators, so the add latency does not bound it); the same order on every call and thread.
// (Not every file that includes this header calls it.)
[[maybe_unused]] MM_CPU_VEC float mm_dot(const float* __restrict__ x, const float* __restrict__ y, int64_t n) {
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
