// Fused memory attention (MemoryMamba eq. 15-22): params and the arithmetic shared by the CPU and
// CUDA builds. Per sample b, from F~ (B, D, H, W):
//   p = mean_{h,w} F~[b]                         (the one pass over F~)
//   for each enabled network (coarse, fine):
//     pre = w1 p + b1;  hid = gelu(pre)          (Hd)   exact erf GELU
//     h = w2 hid + b2;  a = softmax(h)           (m)
//     v = a @ memory;   beta = sim(v, p);  w = beta v    (D)
// The per-element formulas (GELU and its derivative, the similarity sums, value and gradient) are
// MM_HD functions here, so the CPU kernels (the CI-tested path) run the lines the GPU runs; only the
// loops differ (serial per sample on CPU, block-strided on CUDA).
//
// Backward (deterministic by construction: no atomics anywhere). Kernel 1, per sample, recomputes
// the forward from the saved fp32 p and writes dp (B, D) plus the per-sample vectors the parameter
// gradients are outer products of: g_pre (B, Hd), g_h (B, m), g_v (B, D), and hid (B, Hd), a (B, m).
// Kernel 2 reduces them over the batch in fixed order b = 0..B-1, one output element per thread:
//   dw1 = g_pre^T p, db1 = sum g_pre, dw2 = g_h^T hid, db2 = sum g_h, dmemory = a^T g_v.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace mattn {

constexpr int kMaxNets = 2;  // coarse, fine
constexpr float kEps = 1e-8f;
enum Similarity : int { kCosine = 0, kL1 = 1, kL2 = 2 };

// One memory network; all fp32 contiguous. b1/b2 may be null (no bias).
struct NetParams {
  const float* __restrict__ w1;      // (Hd, D)
  const float* __restrict__ b1;      // (Hd,)
  const float* __restrict__ w2;      // (m, Hd)
  const float* __restrict__ b2;      // (m,)
  const float* __restrict__ memory;  // (m, D)
  int hidden, cells;
  // Forward outputs, (B, D), (B, m), (B, D) in F~'s dtype.
  void* __restrict__ w;
  void* __restrict__ h;
  void* __restrict__ v;
};

struct FwdParams {
  int batch, dim, height, width, n_nets, similarity;
  int64_t f_batch_stride, f_dim_stride, f_h_stride, f_w_stride;  // in elements
  const void* __restrict__ f;  // (B, D, H, W) F~, fp32/fp16/bf16, any strides
  float* __restrict__ p;       // (B, D) fp32 pooled features (out in forward, in for backward)
  NetParams net[kMaxNets];
};

// Per-network backward tensors, fp32 contiguous. Incoming grads may be null (= zero).
struct NetGrads {
  const float* __restrict__ dw;  // (B, D)
  const float* __restrict__ dh;  // (B, m)
  const float* __restrict__ dv;  // (B, D)
  float* __restrict__ g_pre;     // (B, Hd) scratch: dL/d pre
  float* __restrict__ g_h;       // (B, m)  scratch: dL/d h (through softmax)
  float* __restrict__ g_v;       // (B, D)  scratch: dL/d v (all paths)
  float* __restrict__ hid;       // (B, Hd) scratch: recomputed gelu(pre)
  float* __restrict__ a;         // (B, m)  scratch: recomputed softmax
  float* __restrict__ dw1;       // (Hd, D) outputs of kernel 2
  float* __restrict__ db1;       // (Hd,) or null when the network has no b1
  float* __restrict__ dw2;       // (m, Hd)
  float* __restrict__ db2;       // (m,) or null
  float* __restrict__ dmemory;   // (m, D)
};

struct BwdParams : FwdParams {
  const float* __restrict__ dp_in;  // (B, D) incoming grad of the returned p, or null
  float* __restrict__ dp;           // (B, D) out: total dL/dp times dp_scale
  float dp_scale;                   // 1 / (H*W): dL/dF~ is dp broadcast over (H, W)
  NetGrads grad[kMaxNets];
};

// ---- per-element arithmetic -----------------------------------------------------------------

MM_HD float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }

MM_HD float gelu_grad(float x) {
  return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * expf(-0.5f * x * x);
}

// Sums over d that a similarity needs: cosine (|v|^2, |p|^2, <v,p>); l1 (sum |v-p|, -, -);
// l2 (sum (v-p)^2, -, -).
struct SimSums {
  float s0, s1, s2;
};

MM_HD void sim_accumulate(int kind, float v, float p, SimSums& s) {
  if (kind == kCosine) {
    s.s0 += v * v;
    s.s1 += p * p;
    s.s2 += v * p;
  } else if (kind == kL1) {
    s.s0 += fabsf(v - p);
  } else {
    s.s0 += (v - p) * (v - p);
  }
}

MM_HD SimSums sim_add(SimSums x, SimSums y) { return {x.s0 + y.s0, x.s1 + y.s1, x.s2 + y.s2}; }

MM_HD float sim_value(int kind, SimSums s, int D) {
  if (kind == kCosine) {
    const float nv = sqrtf(fmaxf(s.s0, kEps * kEps)), np = sqrtf(fmaxf(s.s1, kEps * kEps));
    return s.s2 / (nv * np);
  }
  if (kind == kL1) return -s.s0 / float(D);
  return -sqrtf(s.s0 / float(D) + kEps);
}

// d beta / d v_d and d beta / d p_d for one element; beta = sim_value(kind, s, D). The clamp of the
// cosine norms passes no gradient below EPS^2 (as torch's clamp_min).
MM_HD void sim_grad(int kind, float v, float p, SimSums s, float beta, int D, float& dv, float& dp) {
  if (kind == kCosine) {
    const float vv = fmaxf(s.s0, kEps * kEps), pp = fmaxf(s.s1, kEps * kEps);
    const float inv = 1.f / (sqrtf(vv) * sqrtf(pp));
    dv = p * inv - (s.s0 >= kEps * kEps ? beta * v / vv : 0.f);
    dp = v * inv - (s.s1 >= kEps * kEps ? beta * p / pp : 0.f);
  } else if (kind == kL1) {
    const float d = v - p;
    const float sg = d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f);
    dv = -sg / float(D);
    dp = -dv;
  } else {
    // beta = -sqrt(S/D + EPS): d beta / d v_d = (v_d - p_d) / (D beta).
    dv = (v - p) / (float(D) * beta);
    dp = -dv;
  }
}

// Softmax backward for one cell: dL/dh_i = a_i (dL/da_i - <a, dL/da>).
MM_HD float softmax_grad(float a, float da, float a_dot_da) { return a * (da - a_dot_da); }

}  // namespace mattn

namespace mattn {

// ---- backward kernel 2: one parameter-gradient element, summed over the batch in order ---------

MM_HD int64_t net_param_count(const NetParams& n, int D) {
  return int64_t(n.hidden) * D + n.hidden + int64_t(n.cells) * n.hidden + n.cells + int64_t(n.cells) * D;
}

// sum_b x[b*xs] * y[b*ys] (y null: sum_b x[b*xs]), in the fixed order b = 0..B-1.
MM_HD float batch_dot(const float* x, int64_t xs, const float* y, int64_t ys, int B) {
  float s = 0.f;
  for (int b = 0; b < B; ++b) s += x[b * xs] * (y ? y[b * ys] : 1.f);
  return s;
}

// Element e (in [0, net_param_count)) of network k's flattened (dw1, db1, dw2, db2, dmemory).
MM_HD void reduce_param_element(const BwdParams& P, int k, int64_t e) {
  const NetParams& n = P.net[k];
  const NetGrads& g = P.grad[k];
  const int D = P.dim, Hd = n.hidden, m = n.cells, B = P.batch;
  if (e < int64_t(Hd) * D) {
    g.dw1[e] = batch_dot(g.g_pre + e / D, Hd, P.p + e % D, D, B);
    return;
  }
  e -= int64_t(Hd) * D;
  if (e < Hd) {
    if (g.db1) g.db1[e] = batch_dot(g.g_pre + e, Hd, nullptr, 0, B);
    return;
  }
  e -= Hd;
  if (e < int64_t(m) * Hd) {
    g.dw2[e] = batch_dot(g.g_h + e / Hd, m, g.hid + e % Hd, Hd, B);
    return;
  }
  e -= int64_t(m) * Hd;
  if (e < m) {
    if (g.db2) g.db2[e] = batch_dot(g.g_h + e, m, nullptr, 0, B);
    return;
  }
  e -= m;
  g.dmemory[e] = batch_dot(g.a + e / D, m, g.g_v + e % D, D, B);
}

}  // namespace mattn
