// Fused cross-direction selective scan (VMamba SS2D "v05_noz" core): params and the arithmetic
// shared by the CPU and CUDA builds. Every formula of the op lives here or in common/ssm_math.h
// (shared with selective_scan) as an MM_HD function, so the CPU kernels (the CI-tested path) run the
// very lines the GPU runs.
//
// Layout: x (B, D, H, W) any strides, before the activation (see ActParams); xdbl (B, K, R+2N, L)
// fp32 contiguous in *spatial* order l = h*W + w (the x_proj GEMM is per-position, so it never needs
// a cross-scan copy); direction k visits l = css_spatial_index(k, t, H, W) at time t.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/ssm_math.h"

namespace css {

constexpr int kDirections = 4;
constexpr int kMaxDState = 16;
constexpr int kMaxDtRank = 64;

// The scan's input u = act(x + shift): the Mem-SSM block's memory add (F_bar = F~ + w, one shift per
// (batch, channel)) and its SiLU, applied in registers wherever a kernel reads u, so neither F_bar
// nor u is ever written to memory. shift == nullptr: no add; silu == false: act is the identity.
struct ActParams {
  int batch, dim, height, width, seqlen;
  bool silu;
  // x strides in elements; everything else is contiguous.
  int64_t x_batch_stride, x_dim_stride, x_h_stride, x_w_stride;
  const void* __restrict__ x;          // (B, D, H, W) input dtype, pre-activation
  const float* __restrict__ shift;     // (B, D) or nullptr
};
// x_dbl = w @ u (+ w_bias): the x_proj GEMM of all four directions at once, u made on the fly.
struct ProjParams : ActParams {
  int rows;                            // 4 * (R + 2N)
  const float* __restrict__ w;         // (rows, D)
  const float* __restrict__ w_bias;    // (rows,) or nullptr
  float* __restrict__ xdbl;            // (B, rows, L)
};
// The activation's backward, given du = dL/du (the scan's part plus w^T d(x_dbl)):
// dx = act'(x + shift) * du, dshift = its sum over positions, and what d(x_proj_weight) needs.
struct ActBwdParams : ActParams {
  int rows;
  const float* __restrict__ du;        // (B, D, L)
  void* __restrict__ dx;               // (B, D, H, W) contiguous, input dtype
  float* __restrict__ dshift;          // (B, D) or nullptr
  // CPU: d(x_proj_weight) per batch, u recomputed in per-task buffers.
  const float* __restrict__ dxdbl;     // (B, rows, L)
  float* __restrict__ dw_part;         // (B, rows, D)
  // CUDA: u written out for the caller's d(x_proj_weight) GEMM.
  float* __restrict__ u;               // (B, D, L)
};
struct FwdParams : ActParams {
  int dstate, dt_rank;
  bool delta_softplus;
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
  // CUDA deterministic mode: (B, K, G, R+2N, L), d(x_dbl) of each group of cuda_block_channels()
  // channels, summed over the G groups by the caller.
  float* __restrict__ dxdbl_part;
  // Per-(b, k, d) partial sums, reduced over b by the caller: (B, K, D, R), (B, K, D), (B, K, D, N), (B, K, D).
  float* __restrict__ ddt_w_part;
  float* __restrict__ ddt_b_part;
  float* __restrict__ dA_logs_part;
  float* __restrict__ dDs_part;
  float* __restrict__ seg_states;      // CUDA only: (B, D, K, n_segments, N) scratch
};

// exp, log1p, softplus and the per-step recurrence maths are selective_scan's (common/ssm_math.h):
// one copy, so both ops run the same lines on CPU and GPU.
using memorymamba::mm_exp;

// ---- the op's arithmetic ---------------------------------------------------------------------
// u from z = x + shift, and du/dz.
template <class T>
MM_HD T css_act(T z, bool silu) { return silu ? memorymamba::silu(z) : z; }
template <class T>
MM_HD T css_act_grad(T z, bool silu) { return silu ? memorymamba::silu_grad(z) : T{} + 1.f; }

// Direction k at time t -> spatial index h*W + w. 0: row-major, 1: column-major, 2/3: their reverses.
MM_HD int64_t css_spatial_index(int k, int64_t t, int H, int W) {
  const int64_t L = int64_t(H) * W;
  const int64_t s = (k >= 2) ? (L - 1 - t) : t;
  if ((k & 1) == 0) return s;
  const int64_t w = s / H, h = s - w * H;
  return h * W + w;
}

// The functions below take T = float (CUDA, and scalar CPU code) or memorymamba::f32x16 (the CPU
// kernels' 16 channels at once); A and B may stay scalars, shared by all lanes.
template <class T>
MM_HD T css_delta(T dt_raw, bool softplus) {
  return softplus ? memorymamba::softplus_stable(dt_raw) : dt_raw;
}
template <class T>
MM_HD T css_delta_grad(T dt_raw, bool softplus) {
  return softplus ? memorymamba::softplus_stable_grad(dt_raw) : T{} + 1.f;
}
// Both at once, sharing the exponential.
template <class T>
MM_HD T css_delta(T dt_raw, bool softplus, T& grad) {
  if (softplus) return memorymamba::softplus_stable(dt_raw, grad);
  grad = T{} + 1.f;
  return dt_raw;
}

// Zero-order-hold-free discretisation of mamba: h_t = a h_{t-1} + b with a = exp(delta A), b = delta B u.
template <class T, class SA>
MM_HD T css_decay(T delta, SA A) { return mm_exp(delta * A); }
template <class T, class SB>
MM_HD T css_input(T delta, SB B, T u) { return delta * B * u; }

// Compose the affine maps h -> a h + b: `first` then `second`.
using Affine = memorymamba::ScanPair;
template <class T>
MM_HD memorymamba::ScanPairT<T> css_combine(memorymamba::ScanPairT<T> first, memorymamba::ScanPairT<T> second) {
  return memorymamba::scan_combine(first, second);
}

// Per-element backward of one state n at one time step. Inputs: dh (total grad of h_t), h_prev,
// a, delta, A, B, u. Accumulates into ddelta, du, dA and returns dB.
template <class T, class SA, class SB>
MM_HD T css_step_bwd(T dh, T h_prev, T a, T delta, SA A, SB B, T u, T& ddelta, T& du, T& dA) {
  const memorymamba::StepGradT<T> s = memorymamba::step_grad(dh, h_prev, a, delta, A, B, u);
  ddelta += s.ddelta;
  dA += s.dA;
  du += s.du;
  return s.dB;
}

}  // namespace css
