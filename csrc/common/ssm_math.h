// Scalar arithmetic of a selective scan, written once for the CPU and CUDA builds.
//
// What is here (all fp32, all MM_HD):
//   mm_exp, mm_log1p, mm_sigmoid        fast intrinsics on the GPU, branch-free polynomials
//                                       on the host (vectorisable)
//   softplus / softplus_grad            mamba's threshold: x > 20 -> x
//   mm_log1p_unit, softplus_stable      log1p on [0, 1]; softplus as max(x,0) + log1p(exp(-|x|)),
//                                       optionally with its slope from the same exp
//   silu / silu_grad                    the z gate y * silu(z)
//   ScanPair, scan_combine              state recurrence x_t = a_t * x_{t-1} + b_t as an
//                                       associative operator (also used reversed for grads)
//   discretise                          (exp(delta*A), delta*B*u) for one element
//   StepGrad, step_grad                 per-element gradients of one recurrence step
// cross_selective_scan includes this header too: keep the names stable. The functions it uses are
// templates on the value type: float everywhere, and on the CPU also f32x16 / f32x8 / f32x4, one SIMD
// register of AVX-512 / AVX2 / SSE (GCC vector extension), so that its CPU kernels run the very same
// lines on 16 / 8 / 4 channels at once.
#pragma once

#include <bit>
#include <cmath>

#include "common/macros.h"

namespace memorymamba {

#if !defined(__CUDACC__) && defined(__GNUC__)
typedef float f32x16 __attribute__((vector_size(64)));
typedef int i32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int i32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int i32x4 __attribute__((vector_size(16)));
#define MM_HAVE_SIMD_VECTORS 1
#endif

#if !defined(__CUDA_ARCH__)
namespace host {
#define MM_HOST_INLINE inline __attribute__((always_inline))
// float -> int (truncating) and int bits -> float, for scalars and the SIMD vectors.
MM_HOST_INLINE int to_int(float x) { return static_cast<int>(x); }
MM_HOST_INLINE float from_bits(int i) { return std::bit_cast<float>(i); }
#ifdef MM_HAVE_SIMD_VECTORS
MM_HOST_INLINE i32x16 to_int(f32x16 x) { return __builtin_convertvector(x, i32x16); }
MM_HOST_INLINE f32x16 from_bits(i32x16 i) { return std::bit_cast<f32x16>(i); }
MM_HOST_INLINE i32x8 to_int(f32x8 x) { return __builtin_convertvector(x, i32x8); }
MM_HOST_INLINE f32x8 from_bits(i32x8 i) { return std::bit_cast<f32x8>(i); }
MM_HOST_INLINE i32x4 to_int(f32x4 x) { return __builtin_convertvector(x, i32x4); }
MM_HOST_INLINE f32x4 from_bits(i32x4 i) { return std::bit_cast<f32x4>(i); }
#endif

// Branch-free Cephes-style exp/log (about 1 ulp in the ranges the scan uses) so that the CPU
// kernels' loops over positions auto-vectorise; libm calls would keep them scalar.
template <class T>
MM_HOST_INLINE T exp_poly(T x) {
  x = x < -87.3f ? -87.3f : (x > 88.f ? 88.f : x);  // keeps 2^n a normal float
  const T t = x * 1.44269504f;
  const T fn = (t + 12582912.f) - 12582912.f;        // round to nearest without a libm call
  const T r = x - fn * 0.693359375f + fn * 2.12194440e-4f;  // x - n*ln2 in two parts
  T p = T{} + 1.9875691500e-4f;  // T{} + c: c as a T (a scalar or every lane)
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * from_bits((to_int(fn) + 127) << 23);
}

// log(v) for normal v > 0.
inline float log_poly(float v) {
  const int bits = std::bit_cast<int>(v);
  const float m0 = std::bit_cast<float>((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const bool small = m0 < 0.707106781f;
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 126 - (small ? 1 : 0));
  const float m = small ? m0 + m0 - 1.f : m0 - 1.f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float r = p * m * z + e * -2.12194440e-4f - 0.5f * z;
  return m + r + e * 0.693359375f;
}
}  // namespace host
#endif

template <class T>
MM_HD T mm_exp(T x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return host::exp_poly(x);
#endif
}

// log1p(y) for y > -1.
MM_HD float mm_log1p(float y) {
#if defined(__CUDA_ARCH__)
  return log1pf(y);
#else
  // log(v) * y / (v - 1) cancels the rounding of v = 1 + y (Goldberg); v == 1: log1p(y) == y.
  const float v = 1.f + y;
  const float lv = host::log_poly(v);
  return v == 1.f ? y : lv * (y / (v - 1.f));
#endif
}

template <class T>
MM_HD T mm_sigmoid(T x) { return 1.f / (1.f + mm_exp(-x)); }

// log1p(z) for z in [0, 1] only: 2*atanh(s), s = z/(2+z) <= 1/3 (no cancellation). On the host a
// single division and polynomial, cheaper than mm_log1p's log; what a stable softplus needs.
template <class T>
MM_HD T mm_log1p_unit(T z) {
#if defined(__CUDA_ARCH__)
  return log1pf(z);
#else
  const T s = z / (2.f + z);
  const T s2 = s * s;
  T p = T{} + 1.f / 17.f;
  p = p * s2 + 1.f / 15.f;
  p = p * s2 + 1.f / 13.f;
  p = p * s2 + 1.f / 11.f;
  p = p * s2 + 1.f / 9.f;
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return 2.f * s * p;
#endif
}

// Above 20, log1p(exp(x)) == x in fp32; the cut also keeps exp from overflowing.
MM_HD float softplus(float x) { return x <= 20.f ? mm_log1p(mm_exp(x)) : x; }

// d softplus(x) / dx; matches the forward's cut (slope 1 above 20).
MM_HD float softplus_grad(float x) { return x <= 20.f ? mm_sigmoid(x) : 1.f; }

// Softplus without a threshold, max(x, 0) + log1p(e), e = exp(-|x|) (cross_selective_scan's form):
// the same function as softplus, cheaper on the host (no log). `slope` gets its derivative sigmoid(x)
// = (x < 0 ? e : 1) / (1 + e) from the same exponential (1 above 20 in fp32, like softplus_grad).
template <class T>
MM_HD T softplus_stable(T x, T& slope) {
  const T ax = x < 0.f ? -x : x;
  const T e = mm_exp(-ax);
  slope = (x < 0.f ? e : 1.f) / (1.f + e);
  return (x > 0.f ? x : 0.f) + mm_log1p_unit(e);
}
template <class T>
MM_HD T softplus_stable(T x) {
  T slope;  // unused: the compiler drops its division
  return softplus_stable(x, slope);
}
template <class T>
MM_HD T softplus_stable_grad(T x) {
  T slope;
  softplus_stable(x, slope);  // its value is unused: the compiler drops the log
  return slope;
}

template <class T>
MM_HD T silu(T z) { return z * mm_sigmoid(z); }

template <class T>
MM_HD T silu_grad(T z) {
  const T s = mm_sigmoid(z);
  return s * (1.f + z * (1.f - s));
}

// x_t = a * x_{t-1} + b. Composition is associative, which the block-wide scans rely on.
template <class T>
struct ScanPairT {
  T a;
  T b;
};
using ScanPair = ScanPairT<float>;

MM_HD ScanPair scan_identity() { return ScanPair{1.f, 0.f}; }

// `earlier` is applied first, then `later`.
template <class T>
MM_HD ScanPairT<T> scan_combine(ScanPairT<T> earlier, ScanPairT<T> later) {
  return ScanPairT<T>{later.a * earlier.a, later.a * earlier.b + later.b};
}

// Delta after bias and (optionally) softplus, from the raw input.
MM_HD float effective_delta(float delta_raw, float delta_bias, bool softplus_on) {
  const float d = delta_raw + delta_bias;
  return softplus_on ? softplus(d) : d;
}

// One step of the zero-order-hold discretisation: (exp(delta*A), delta*B*u).
MM_HD ScanPair discretise(float delta, float A, float B, float u) {
  return ScanPair{mm_exp(delta * A), delta * B * u};
}

// Gradients of one step x_t = exp(delta*A) x_{t-1} + delta*B*u, given g = dL/dx_t.
template <class T>
struct StepGradT {
  T dA;      // dL/dA contribution
  T ddelta;  // dL/ddelta contribution
  T dB;      // dL/dB_t
  T du;      // dL/du_t (scan part; D*dy is added separately)
};
using StepGrad = StepGradT<float>;

// T: float or f32x16; A, B: float or T (a scalar is broadcast).
template <class T, class SA, class SB>
MM_HD StepGradT<T> step_grad(T g, T x_prev, T dA_t, T delta, SA A, SB B, T u) {
  const T gx = g * x_prev * dA_t;  // dL/d(delta*A)
  return StepGradT<T>{gx * delta, gx * A + g * B * u, g * delta * u, g * delta * B};
}

}  // namespace memorymamba
