// Fused cross-direction selective scan (VMamba SS2D "v05_noz" core): params and the arithmetic
// shared by the CPU and CUDA builds. Every formula of the op lives here as an MM_HD function, so the
// CPU kernels (the CI-tested path) run the very lines the GPU runs.
//
// Layout: x (B, D, H, W) any strides; xdbl (B, K, R+2N, L) fp32 contiguous in *spatial* order
// l = h*W + w (the x_proj GEMM is per-position, so it never needs a cross-scan copy); direction k
// visits l = css_spatial_index(k, t, H, W) at time t.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace css {

constexpr int kDirections = 4;
constexpr int kMaxDState = 16;
constexpr int kMaxDtRank = 64;

struct FwdParams {
  int batch, dim, height, width, seqlen, dstate, dt_rank;
  bool delta_softplus;
  // x strides in elements; everything else is contiguous.
  int64_t x_batch_stride, x_dim_stride, x_h_stride, x_w_stride;
  const void* __restrict__ x;          // (B, D, H, W) input dtype
  const float* __restrict__ xdbl;      // (B, K, R+2N, L)
  const float* __restrict__ dt_w;      // (K, D, R)
  const float* __restrict__ dt_b;      // (K, D)
  const float* __restrict__ A_logs;    // (K*D, N)
  const float* __restrict__ Ds;        // (K*D,)
  void* __restrict__ y;                // CPU: (B, D, H, W) input dtype; CUDA: fp32 accumulator
};

struct BwdParams : FwdParams {
  const float* __restrict__ dy;        // (B, D, H, W) fp32 contiguous
  float* __restrict__ du;              // (B, D, L) fp32
  // CPU: (B, kCpuChannelChunks, K, R+2N, L) partials. CUDA: (B, K, R+2N, L), atomics into it when
  // dxdbl_part is null.
  float* __restrict__ dxdbl;
  // CUDA deterministic mode: (B, K, D, 1+2N, L) per-channel contributions
  // (row 0: d(dt_raw), rows 1..N: dB, rows N+1..2N: dC), reduced in a fixed order by the caller.
  float* __restrict__ dxdbl_part;
  // Per-(b, k, d) partial sums, reduced over b by the caller: (B, K, D, R), (B, K, D), (B, K, D, N), (B, K, D).
  float* __restrict__ ddt_w_part;
  float* __restrict__ ddt_b_part;
  float* __restrict__ dA_logs_part;
  float* __restrict__ dDs_part;
  float* __restrict__ seg_states;      // CUDA only: (B, D, K, n_segments, N) scratch
};

// ---- platform primitives -------------------------------------------------------------------
#if defined(__CUDA_ARCH__)
MM_HD float mm_exp(float x) { return __expf(x); }
MM_HD float mm_log1p(float x) { return log1pf(x); }
#else
// Branch-free polynomials so the CPU loops auto-vectorise (libm calls would not, without
// -ffast-math). exp: 2^n * e^r, |r| <= ln2/2, degree-7 Taylor (truncation < 6e-9 relative).
inline float mm_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest by the 1.5*2^23 trick: vectorises without -ffast-math, unlike nearbyint.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693145751953125f;  // Cody-Waite: ln2 = hi + lo, hi exact in 11 bits
  r = r - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
// log1p(z) for z in [0, 1] (all softplus needs): 2*atanh(s), s = z/(2+z) <= 1/3, no cancellation.
inline float mm_log1p(float z) {
  const float s = z / (2.0f + z);
  const float s2 = s * s;
  float p = 1.0f / 17.0f;
  p = p * s2 + 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}
#endif

// ---- the op's arithmetic ---------------------------------------------------------------------

// Direction k at time t -> spatial index h*W + w. 0: row-major, 1: column-major, 2/3: their reverses.
MM_HD int64_t css_spatial_index(int k, int64_t t, int H, int W) {
  const int64_t L = int64_t(H) * W;
  const int64_t s = (k >= 2) ? (L - 1 - t) : t;
  if ((k & 1) == 0) return s;
  const int64_t w = s / H, h = s - w * H;
  return h * W + w;
}

// Stable softplus: max(x, 0) + log1p(exp(-|x|)).
MM_HD float css_softplus(float x) {
  const float ax = x < 0.f ? -x : x;
  return (x > 0.f ? x : 0.f) + mm_log1p(mm_exp(-ax));
}

// d softplus / dx = sigmoid(x), from the same exp as the forward.
MM_HD float css_softplus_grad(float x) {
  const float ax = x < 0.f ? -x : x;
  const float e = mm_exp(-ax);
  const float inv = 1.0f / (1.0f + e);
  return x > 0.f ? inv : e * inv;
}

MM_HD float css_delta(float dt_raw, bool softplus) { return softplus ? css_softplus(dt_raw) : dt_raw; }
MM_HD float css_delta_grad(float dt_raw, bool softplus) { return softplus ? css_softplus_grad(dt_raw) : 1.0f; }

// Zero-order-hold-free discretisation of mamba: h_t = a h_{t-1} + b with a = exp(delta A), b = delta B u.
MM_HD float css_decay(float delta, float A) { return mm_exp(delta * A); }
MM_HD float css_input(float delta, float B, float u) { return delta * B * u; }

// Compose the affine maps h -> a h + b: `first` then `second`.
struct Affine {
  float a, b;
};
MM_HD Affine css_combine(Affine first, Affine second) {
  return {second.a * first.a, second.a * first.b + second.b};
}

// Per-element backward of one state n at one time step. Inputs: dh (total grad of h_t), h_prev,
// a, delta, A, B, u. Accumulates into ddelta, du, dA and returns dB.
MM_HD float css_step_bwd(float dh, float h_prev, float a, float delta, float A, float B, float u,
                         float& ddelta, float& du, float& dA) {
  const float da_a = dh * h_prev * a;  // d/d(delta*A) of a * h_prev
  ddelta += da_a * A + dh * B * u;
  dA += da_a * delta;
  du += dh * delta * B;
  return dh * delta * u;
}

}  // namespace css
