// Scalar arithmetic of a selective scan, written once for the CPU and CUDA builds.
//
// What is here (all fp32, all MM_HD):
//   mm_exp, mm_log1p, mm_sigmoid        fast intrinsics on the GPU, libm on the host
//   softplus / softplus_grad            mamba's threshold: x > 20 -> x
//   silu / silu_grad                    the z gate y * silu(z)
//   ScanPair, scan_combine              state recurrence x_t = a_t * x_{t-1} + b_t as an
//                                       associative operator (also used reversed for grads)
//   discretise                          (exp(delta*A), delta*B*u) for one element
//   StepGrad, step_grad                 per-element gradients of one recurrence step
// cross_selective_scan includes this header too: keep the names stable.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace memorymamba {

MM_HD float mm_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

MM_HD float mm_log1p(float x) {
#if defined(__CUDA_ARCH__)
  return log1pf(x);
#else
  return std::log1p(x);
#endif
}

MM_HD float mm_sigmoid(float x) { return 1.f / (1.f + mm_exp(-x)); }

// Above 20, log1p(exp(x)) == x in fp32; the cut also keeps exp from overflowing.
MM_HD float softplus(float x) { return x <= 20.f ? mm_log1p(mm_exp(x)) : x; }

// d softplus(x) / dx; matches the forward's cut (slope 1 above 20).
MM_HD float softplus_grad(float x) { return x <= 20.f ? mm_sigmoid(x) : 1.f; }

MM_HD float silu(float z) { return z * mm_sigmoid(z); }

MM_HD float silu_grad(float z) {
  const float s = mm_sigmoid(z);
  return s * (1.f + z * (1.f - s));
}

// x_t = a * x_{t-1} + b. Composition is associative, which the block-wide scans rely on.
struct ScanPair {
  float a;
  float b;
};

MM_HD ScanPair scan_identity() { return ScanPair{1.f, 0.f}; }

// `earlier` is applied first, then `later`.
MM_HD ScanPair scan_combine(ScanPair earlier, ScanPair later) {
  return ScanPair{later.a * earlier.a, later.a * earlier.b + later.b};
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
struct StepGrad {
  float dA;      // dL/dA contribution
  float ddelta;  // dL/ddelta contribution
  float dB;      // dL/dB_t
  float du;      // dL/du_t (scan part; D*dy is added separately)
};

MM_HD StepGrad step_grad(float g, float x_prev, float dA_t, float delta, float A, float B,
                         float u) {
  const float gx = g * x_prev * dA_t;  // dL/d(delta*A)
  return StepGrad{gx * delta, gx * A + g * B * u, g * delta * u, g * delta * B};
}

}  // namespace memorymamba
