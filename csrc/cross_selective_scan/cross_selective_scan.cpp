// Fused cross-direction selective scan: input checks, the CPU kernels, and the Python bindings.
//
// CPU forward: one task per (batch, channel) runs all four directions, so the cross-merge is a sum
// in a private fp32 row and y is written once. CPU backward: one task per (batch, channel chunk)
// runs its channels in order, all four directions each, so du is written once per channel and the
// chunk's share of d(x_dbl) (a reduction over channels) has one fixed summation order; the
// kCpuChannelChunks partials are summed in order by the caller. The chunk count is a constant, not
// the thread count, so results are bitwise identical for any number of threads. Backward
// recomputes the forward fully (no saved states).
// Each task splits its work into vectorisable per-position loops (spatial order, one channel at a
// time) and the recurrences, run for kLanes channels at once (one SIMD register), which walk the
// direction's index map through a precomputed permutation.
// The kernels read x before the block's activation and make u = act(x + shift) wherever they load
// it (load_u); the x_proj GEMM (proj_cpu) and the activation's backward with d(x_proj_weight)
// (act_bwd_cpu) do the same from row / tile buffers, so u never exists as a tensor.
// Instantiations: fwd_cpu/bwd_cpu/proj_cpu/act_bwd_cpu x 3 input dtypes; the 9 per-position/scan
// helpers are dtype-free and cloned 3x (AVX-512, AVX2+FMA, baseline).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "common/registry.h"

// Without this, GCC keeps every float compare as a branch (they could raise FP exceptions) and the
// per-position loops (softplus, exp) do not vectorise. Placed after the torch headers so only our
// code is affected; we never read FP exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "cross_selective_scan/cross_selective_scan.h"
#include "common/cpu_vec.h"
#include "common/dispatch.h"

#ifdef MEMORYMAMBA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace css {

#ifdef MEMORYMAMBA_WITH_CUDA
// Defined in cross_selective_scan_cuda.cu.
void fwd_cuda(FwdParams& p, at::ScalarType dtype);
void bwd_cuda(BwdParams& p, at::ScalarType dtype);
void proj_cuda(ProjParams& p, at::ScalarType dtype);
void act_bwd_cuda(ActBwdParams& p, at::ScalarType dtype);
int cuda_segment_len();
#endif

// Fixed (not thread-count dependent) so the backward's d(x_dbl) partials sum in the same order
// everywhere; 4 keeps the partials small (4 x d(x_dbl)) and gives B*4 tasks.
constexpr int kCpuChannelChunks = 4;

namespace {

using memorymamba::mm_dot;

// Channels scanned together: kLanes independent recurrences fill a SIMD register, where one
// channel's recurrence would be bound by the latency of its dependency chain. Measured (2-core dev
// box, 1 thread, B=8 D=96 56x56 N=1 R=6): forward 93 -> 63 ms against one channel at a time.
constexpr int kLanes = 8;

// dt_raw = bias + w . dts; delta = softplus(dt_raw); a = exp(delta A); bu = delta B u for one channel.
// xd: the (R+2N, L) x_dbl slice of one (batch, direction); a, bu: element (l, n) at (l*N + n)*kLanes
// (the caller offsets them by the channel's lane).
MM_CPU_VEC void discretize(const float* __restrict__ xd, const float* __restrict__ w, float bias,
                        const float* __restrict__ A, const float* __restrict__ u, int64_t L, int R,
                        int N, bool softplus, float* __restrict__ dt, float* __restrict__ delta,
                        float* __restrict__ a, float* __restrict__ bu) {
  for (int64_t l = 0; l < L; ++l) dt[l] = bias;
  for (int r = 0; r < R; ++r) {
    const float wr = w[r];
    const float* __restrict__ row = xd + r * L;
    for (int64_t l = 0; l < L; ++l) dt[l] += wr * row[l];
  }
  if (softplus) {
    for (int64_t l = 0; l < L; ++l) delta[l] = css_delta(dt[l], true);
  } else {
    for (int64_t l = 0; l < L; ++l) delta[l] = css_delta(dt[l], false);
  }
  for (int n = 0; n < N; ++n) {
    const float An = A[n];
    const float* __restrict__ Bn = xd + (R + n) * L;
    for (int64_t l = 0; l < L; ++l) {
      a[(l * N + n) * kLanes] = css_decay(delta[l], An);
      bu[(l * N + n) * kLanes] = css_input(delta[l], Bn[l], u[l]);
    }
  }
}

// The recurrences of kLanes channels along one direction (all arrays (L*N, kLanes) interleaved, at
// spatial index): h_t (state after step t) into hs, the state before step t into hs_prev.
MM_CPU_VEC void scan_forward(const int32_t* __restrict__ perm, const float* __restrict__ a,
                          const float* __restrict__ bu, int64_t L, int N, float* __restrict__ hs,
                          float* __restrict__ hs_prev) {
  float h[kMaxDState][kLanes] = {};
  for (int64_t t = 0; t < L; ++t) {
    const int64_t o = int64_t(perm[t]) * N;
    for (int n = 0; n < N; ++n) {
      const int64_t e = (o + n) * kLanes;
      for (int j = 0; j < kLanes; ++j) {
        hs_prev[e + j] = h[n][j];
        h[n][j] = css_combine({1.f, h[n][j]}, {a[e + j], bu[e + j]}).b;
        hs[e + j] = h[n][j];
      }
    }
  }
}

// Reverse recurrence for the state gradients: dh_t = C_t g_t + a_{t+1} dh_{t+1} (interleaved like
// scan_forward; g is (L, kLanes) interleaved, Cmat the (N, L) C rows shared by all channels).
MM_CPU_VEC void scan_backward(const int32_t* __restrict__ perm, const float* __restrict__ a,
                           const float* __restrict__ Cmat, const float* __restrict__ g, int64_t L, int N,
                           float* __restrict__ dhs) {
  float e[kMaxDState][kLanes] = {};  // a_{t+1} dh_{t+1}: the gradient reaching h_t from the future
  for (int64_t t = L - 1; t >= 0; --t) {
    const int64_t l = perm[t];
    for (int n = 0; n < N; ++n) {
      const float c = Cmat[n * L + l];
      const int64_t o = (l * N + n) * kLanes;
      for (int j = 0; j < kLanes; ++j) {
        const float dh = c * g[l * kLanes + j] + e[n][j];
        dhs[o + j] = dh;
        e[n][j] = a[o + j] * dh;
      }
    }
  }
}

// Lanes of channels that do not exist (the last group of D % kLanes) scan a = 0, bu = 0.
void zero_lanes(float* a, float* bu, int64_t LN, int lanes) {
  for (int64_t i = 0; i < LN; ++i)
    for (int j = lanes; j < kLanes; ++j) a[i * kLanes + j] = bu[i * kLanes + j] = 0.f;
}

// Per-position backward (spatial order, vectorisable): fills ddt (= d dt_raw), adds into du and
// the dB/dC rows of dxd, and returns the dA sums of this channel. a, hs_prev, hs, dhs: this
// channel's lane of the interleaved arrays.
MM_CPU_VEC void grads_per_position(const float* __restrict__ xd, float* __restrict__ dxd,
                                const float* __restrict__ A, const float* __restrict__ u,
                                const float* __restrict__ g, const float* __restrict__ dt,
                                const float* __restrict__ delta, const float* __restrict__ a,
                                const float* __restrict__ hs_prev, const float* __restrict__ hs,
                                const float* __restrict__ dhs, float Dk, int64_t L, int R, int N,
                                bool softplus, const float* __restrict__ ones, float* __restrict__ ddt,
                                float* __restrict__ du, float* __restrict__ dA_sum, float* __restrict__ tmp) {
  for (int64_t l = 0; l < L; ++l) {
    ddt[l] = 0.f;
    du[l] += g[l] * Dk;
  }
  for (int n = 0; n < N; ++n) {
    const float An = A[n];
    const float* __restrict__ Bn = xd + (R + n) * L;
    float* __restrict__ dBn = dxd + (R + n) * L;
    float* __restrict__ dCn = dxd + (R + N + n) * L;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t o = (l * N + n) * kLanes;
      float dA_l = 0.f;
      dBn[l] += css_step_bwd(dhs[o], hs_prev[o], a[o], delta[l], An, Bn[l], u[l], ddt[l], du[l], dA_l);
      dCn[l] += g[l] * hs[o];
      tmp[l] = dA_l;
    }
    dA_sum[n] = mm_dot(tmp, ones, L);
  }
  if (softplus) {
    for (int64_t l = 0; l < L; ++l) ddt[l] *= css_delta_grad(dt[l], true);
  }
}

// The rank-R side of the delta projection: d dt_w[r] = sum_l ddt x_dbl[r]; d x_dbl[r] += w[r] ddt.
MM_CPU_VEC void dt_proj_grads(const float* __restrict__ xd, const float* __restrict__ w,
                           const float* __restrict__ ddt, int64_t L, int R, float* __restrict__ dxd,
                           float* __restrict__ dw) {
  for (int r = 0; r < R; ++r) {
    dw[r] = mm_dot(ddt, xd + r * L, L);
    float* __restrict__ drow = dxd + r * L;
    const float wr = w[r];
    for (int64_t l = 0; l < L; ++l) drow[l] += wr * ddt[l];
  }
}

std::vector<int32_t> direction_permutations(int H, int W) {
  const int64_t L = int64_t(H) * W;
  std::vector<int32_t> perm(kDirections * L);
  for (int k = 0; k < kDirections; ++k)
    for (int64_t t = 0; t < L; ++t) perm[k * L + t] = int32_t(css_spatial_index(k, t, H, W));
  return perm;
}

template <typename T>
void load_row(const T* x, int64_t hs, int64_t ws, int H, int W, float* out) {
  for (int h = 0; h < H; ++h)
    for (int w = 0; w < W; ++w) out[int64_t(h) * W + w] = static_cast<float>(x[h * hs + w * ws]);
}

// row = act(row + shift) in place. The silu branch is outside the loop so that the loop vectorises.
MM_CPU_VEC void activate(float* __restrict__ row, int64_t n, float shift, bool silu) {
  if (silu) {
    for (int64_t i = 0; i < n; ++i) row[i] = css_act(row[i] + shift, true);
  } else {
    for (int64_t i = 0; i < n; ++i) row[i] = row[i] + shift;
  }
}

float shift_of(const ActParams& p, int64_t b, int d) { return p.shift ? p.shift[b * p.dim + d] : 0.f; }

// u of channel d of batch b in spatial order (L floats): x loaded, shifted and activated.
template <typename T>
void load_u(const ActParams& p, int64_t b, int d, float* out) {
  const T* x = static_cast<const T*>(p.x) + b * p.x_batch_stride + d * p.x_dim_stride;
  load_row(x, p.x_h_stride, p.x_w_stride, p.height, p.width, out);
  activate(out, p.seqlen, shift_of(p, b, d), p.silu);
}

// ---- x_proj: x_dbl = w u (+ bias) with u made on the fly ----------------------------------------

// Register tile of the projection: kProjRows rows x kProjTile positions of accumulators, 8
// independent FMA chains on AVX-512 (hides the FMA latency; 4 rows were latency-bound at half the
// speed). rows = 4 (R + 2N) is a multiple of 4, so a last block of 4 rows may remain.
constexpr int kProjTile = 16;
constexpr int kProjRows = 8;
// u of one task: D x span floats staged from x, span <= kProjSpan a multiple of kProjTile and D * span
// <= kProjBufferFloats (128 KB, cache-resident). Reading x a whole span per channel row keeps the
// loads sequential; one 16-position tile across all D rows (96+ streams) was latency-bound on cache
// misses, 7.5 ms against 3.5 ms for this at B=8, D=96, 56x56 (1 thread).
constexpr int64_t kProjSpan = 256;
constexpr int64_t kProjBufferFloats = 32 * 1024;

// One register of kProjTile floats (GCC/Clang vector extension; the baseline clone splits it into SSE
// ops). Plain arrays were left on the stack by the AVX-512 clone, the store->load chain through
// memory making it ~3x slower.
typedef float ProjVec __attribute__((vector_size(kProjTile * sizeof(float))));

// out[c * ld + j] = bias[c] + sum_d w[c, d] u[d * ldu + j] for c < kRows, d < D, j < n (u readable
// up to kProjTile columns). The sum over d runs in order (deterministic, independent of the tiling).
// Also the backward's d(x_proj_weight) GEMM, with D the positions and u transposed. MM_HD forces the
// inlining, so every target clone of proj_span gets its own vector code.
template <int kRows>
MM_HD void proj_rows(const float* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ u,
                     int64_t ldu, int D, int n, float* __restrict__ out, int64_t ld) {
  ProjVec acc[kRows];
  for (int i = 0; i < kRows; ++i) acc[i] = ProjVec{} + (bias ? bias[i] : 0.f);
  for (int d = 0; d < D; ++d) {
    ProjVec ud;
    std::memcpy(&ud, u + d * ldu, sizeof(ud));
    for (int i = 0; i < kRows; ++i) acc[i] += w[int64_t(i) * D + d] * ud;
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < n; ++j) out[i * ld + j] = acc[i][j];
}

// out (rows, ld) columns [0, n) = w u (+ bias) for u (D, ldu), tile by tile.
MM_CPU_VEC void proj_span(const float* __restrict__ w, const float* __restrict__ bias,
                       const float* __restrict__ u, int64_t ldu, int rows, int D, int64_t n,
                       float* __restrict__ out, int64_t ld) {
  for (int64_t j0 = 0; j0 < n; j0 += kProjTile) {
    const int m = int(std::min<int64_t>(kProjTile, n - j0));
    int c0 = 0;
    for (; c0 + kProjRows <= rows; c0 += kProjRows)
      proj_rows<kProjRows>(w + int64_t(c0) * D, bias ? bias + c0 : nullptr, u + j0, ldu, D, m,
                           out + c0 * ld + j0, ld);
    if (c0 < rows)
      proj_rows<4>(w + int64_t(c0) * D, bias ? bias + c0 : nullptr, u + j0, ldu, D, m, out + c0 * ld + j0, ld);
  }
}

// Tasks: (batch, span of positions); each writes its own columns of x_dbl, so no reduction crosses
// tasks. u of all D channels over the span is built from x in a buffer, then projected.
template <typename T>
void proj_cpu(const ProjParams& p) {
  const int D = p.dim, W = p.width;
  const int64_t L = p.seqlen;
  const int64_t span = std::max<int64_t>(
      kProjTile, std::min(kProjSpan, std::min((L + kProjTile - 1) / kProjTile * kProjTile,
                                              kProjBufferFloats / D / kProjTile * kProjTile)));
  const int64_t spans = (L + span - 1) / span;
  const T* x = static_cast<const T*>(p.x);
  at::parallel_for(0, int64_t(p.batch) * spans, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> u(D * span);
    std::vector<int64_t> off(span);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / spans, l0 = (task % spans) * span, n = std::min(span, L - l0);
      bool contiguous = true;  // the span's x elements are consecutive in memory
      for (int64_t j = 0; j < n; ++j) {
        const int64_t h = (l0 + j) / W, w = (l0 + j) - h * W;
        off[j] = h * p.x_h_stride + w * p.x_w_stride;
        contiguous = contiguous && off[j] == off[0] + j;
      }
      for (int d = 0; d < D; ++d) {
        float* ud = u.data() + d * span;
        const T* xd = x + b * p.x_batch_stride + d * p.x_dim_stride;
        if (contiguous) {
          for (int64_t j = 0; j < n; ++j) ud[j] = static_cast<float>(xd[off[0] + j]);
        } else {
          for (int64_t j = 0; j < n; ++j) ud[j] = static_cast<float>(xd[off[j]]);
        }
        std::fill(ud + n, ud + span, 0.f);
        activate(ud, n, shift_of(p, b, d), p.silu);
      }
      proj_span(p.w, p.w_bias, u.data(), span, p.rows, D, n, p.xdbl + b * p.rows * L + l0, L);
    }
  });
}

// dx (= g) and u of one (batch, channel) row from z = x + shift (in place: z becomes u).
MM_CPU_VEC void act_bwd_row(const float* __restrict__ du, int64_t L, bool silu, float* __restrict__ z,
                         float* __restrict__ g) {
  if (silu) {
    for (int64_t l = 0; l < L; ++l) {
      g[l] = css_act_grad(z[l], true) * du[l];
      z[l] = css_act(z[l], true);
    }
  } else {
    for (int64_t l = 0; l < L; ++l) g[l] = du[l];
  }
}

// Tasks: (batch, chunk of channels); each writes its own dx rows, dshift elements and dw_part
// columns, every sum in a fixed order, so the result does not depend on the thread count. u of the
// chunk is recomputed from x and stored transposed (L x chunk, <= kProjBufferFloats unless L alone
// exceeds it), then d(x_proj_weight)[:, chunk] = d(x_dbl) u^T runs as the projection's register
// tiles. One dot product per (row, channel) instead was 1.5x slower than PyTorch's unfused path at
// B=8, D=768, 7x7 (L = 49 is too short for a dot to pay its setup).
template <typename T>
void act_bwd_cpu(const ActBwdParams& p) {
  const int D = p.dim;
  const int64_t L = p.seqlen;
  const int64_t chunk = std::max<int64_t>(
      kProjTile, std::min(kProjSpan, kProjBufferFloats / L / kProjTile * kProjTile));
  const int64_t chunks = (D + chunk - 1) / chunk;
  at::parallel_for(0, int64_t(p.batch) * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(3 * L + L * chunk);
    float *z = buf.data(), *g = z + L, *ones = g + L, *ut = ones + L;
    std::fill(ones, ones + L, 1.f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int d0 = int(task % chunks * chunk), n = int(std::min<int64_t>(chunk, D - d0));
      for (int j = 0; j < n; ++j) {
        const int64_t row = b * D + d0 + j;
        const T* x = static_cast<const T*>(p.x) + b * p.x_batch_stride + (d0 + j) * p.x_dim_stride;
        load_row(x, p.x_h_stride, p.x_w_stride, p.height, p.width, z);
        activate(z, L, shift_of(p, b, d0 + j), false);
        act_bwd_row(p.du + row * L, L, p.silu, z, g);
        T* dx = static_cast<T*>(p.dx) + row * L;
        for (int64_t l = 0; l < L; ++l) dx[l] = static_cast<T>(g[l]);
        if (p.dshift) p.dshift[row] = mm_dot(g, ones, L);
        for (int64_t l = 0; l < L; ++l) ut[l * chunk + j] = z[l];
      }
      for (int64_t l = 0; l < L; ++l) std::fill(ut + l * chunk + n, ut + (l + 1) * chunk, 0.f);
      proj_span(p.dxdbl + b * p.rows * L, nullptr, ut, chunk, p.rows, int(L), n, p.dw_part + b * p.rows * D + d0, D);
    }
  });
}

template <typename T>
void fwd_cpu(const FwdParams& p) {
  const int D = p.dim, R = p.dt_rank, N = p.dstate, H = p.height, W = p.width;
  const int64_t L = p.seqlen, C = R + 2 * N;
  const int64_t groups = (D + kLanes - 1) / kLanes;
  const std::vector<int32_t> perm = direction_permutations(H, W);
  T* y = static_cast<T*>(p.y);
  at::parallel_for(0, int64_t(p.batch) * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * kLanes * L + 2 * L + 4 * kLanes * L * N);
    float *u = buf.data(), *yacc = u + kLanes * L, *dt = yacc + kLanes * L, *delta = dt + L;
    float *a = delta + L, *bu = a + kLanes * L * N, *hs = bu + kLanes * L * N, *hs_prev = hs + kLanes * L * N;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / groups;
      const int d0 = int(task % groups) * kLanes, lanes = std::min(kLanes, D - d0);
      for (int j = 0; j < lanes; ++j) {
        const int d = d0 + j;
        float* uj = u + j * L;
        load_u<T>(p, b, d, uj);
        float Dsum = 0.f;
        for (int k = 0; k < kDirections; ++k) Dsum += p.Ds[k * D + d];
        for (int64_t l = 0; l < L; ++l) yacc[j * L + l] = Dsum * uj[l];
      }
      for (int k = 0; k < kDirections; ++k) {
        const float* xd = p.xdbl + (b * kDirections + k) * C * L;
        for (int j = 0; j < lanes; ++j) {
          const int64_t kd = int64_t(k) * D + d0 + j;
          float A[kMaxDState];
          for (int n = 0; n < N; ++n) A[n] = -std::exp(p.A_logs[kd * N + n]);
          discretize(xd, p.dt_w + kd * R, p.dt_b[kd], A, u + j * L, L, R, N, p.delta_softplus, dt, delta,
                     a + j, bu + j);
        }
        if (lanes < kLanes) zero_lanes(a, bu, L * N, lanes);
        scan_forward(perm.data() + k * L, a, bu, L, N, hs, hs_prev);
        for (int j = 0; j < lanes; ++j)
          for (int n = 0; n < N; ++n) {
            const float* Cn = xd + (R + N + n) * L;
            for (int64_t l = 0; l < L; ++l) yacc[j * L + l] += Cn[l] * hs[(l * N + n) * kLanes + j];
          }
      }
      for (int j = 0; j < lanes; ++j) {
        T* yrow = y + (b * D + d0 + j) * L;
        for (int64_t l = 0; l < L; ++l) yrow[l] = static_cast<T>(yacc[j * L + l]);
      }
    }
  });
}

template <typename T>
void bwd_cpu(const BwdParams& p) {
  const int D = p.dim, R = p.dt_rank, N = p.dstate, H = p.height, W = p.width;
  const int64_t L = p.seqlen, C = R + 2 * N;
  const std::vector<int32_t> perm = direction_permutations(H, W);
  at::parallel_for(0, int64_t(p.batch) * kCpuChannelChunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(4 * kLanes * L + 3 * L + 5 * kLanes * L * N);
    float *u = buf.data(), *g_il = u + kLanes * L, *dt = g_il + kLanes * L, *delta = dt + kLanes * L;
    float *ddt = delta + kLanes * L, *tmp = ddt + L, *ones = tmp + L;
    float *a = ones + L, *bu = a + kLanes * L * N, *hs = bu + kLanes * L * N, *hs_prev = hs + kLanes * L * N;
    float* dhs = hs_prev + kLanes * L * N;
    std::fill(ones, ones + L, 1.f);  // sums as mm_dot(x, ones): one fixed-order vectorised reduction
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kCpuChannelChunks, chunk = task % kCpuChannelChunks;
      float* dxd_chunk = p.dxdbl + task * kDirections * C * L;  // (K, C, L) partial of this chunk
      std::fill(dxd_chunk, dxd_chunk + kDirections * C * L, 0.f);
      const int d_begin = int(chunk * D / kCpuChannelChunks), d_end = int((chunk + 1) * D / kCpuChannelChunks);
      for (int d0 = d_begin; d0 < d_end; d0 += kLanes) {
        const int lanes = std::min(kLanes, d_end - d0);
        for (int j = 0; j < kLanes; ++j) {
          if (j >= lanes) {
            for (int64_t l = 0; l < L; ++l) g_il[l * kLanes + j] = 0.f;
            continue;
          }
          const float* g = p.dy + (b * D + d0 + j) * L;
          for (int64_t l = 0; l < L; ++l) g_il[l * kLanes + j] = g[l];
          std::fill(p.du + (b * D + d0 + j) * L, p.du + (b * D + d0 + j + 1) * L, 0.f);
          load_u<T>(p, b, d0 + j, u + j * L);
        }
        for (int k = 0; k < kDirections; ++k) {
          const float* xd = p.xdbl + (b * kDirections + k) * C * L;
          float* dxd = dxd_chunk + k * C * L;
          const int32_t* pk = perm.data() + k * L;
          float A[kLanes][kMaxDState];
          for (int j = 0; j < lanes; ++j) {
            const int64_t kd = int64_t(k) * D + d0 + j;
            for (int n = 0; n < N; ++n) A[j][n] = -std::exp(p.A_logs[kd * N + n]);
            discretize(xd, p.dt_w + kd * R, p.dt_b[kd], A[j], u + j * L, L, R, N, p.delta_softplus, dt + j * L,
                       delta + j * L, a + j, bu + j);
          }
          if (lanes < kLanes) zero_lanes(a, bu, L * N, lanes);
          scan_forward(pk, a, bu, L, N, hs, hs_prev);
          scan_backward(pk, a, xd + (R + N) * L, g_il, L, N, dhs);
          for (int j = 0; j < lanes; ++j) {
            const int d = d0 + j;
            const int64_t kd = int64_t(k) * D + d;
            const int64_t part = (b * kDirections + k) * D + d;  // index into the (B, K, D, ...) partials
            const float* g = p.dy + (b * D + d) * L;
            float dA_sum[kMaxDState];
            grads_per_position(xd, dxd, A[j], u + j * L, g, dt + j * L, delta + j * L, a + j, hs_prev + j, hs + j,
                               dhs + j, p.Ds[kd], L, R, N, p.delta_softplus, ones, ddt, p.du + (b * D + d) * L,
                               dA_sum, tmp);
            for (int n = 0; n < N; ++n) p.dA_logs_part[part * N + n] = dA_sum[n] * A[j][n];
            p.dDs_part[part] = mm_dot(g, u + j * L, L);
            p.ddt_b_part[part] = mm_dot(ddt, ones, L);
            dt_proj_grads(xd, p.dt_w + kd * R, ddt, L, R, dxd, p.ddt_w_part + part * R);
          }
        }
      }
    }
  });
}

// ---- checks shared by both devices ---------------------------------------------------------------

std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

void check_tensor(const at::Tensor& t, const char* name, std::vector<int64_t> shape, const at::Device& dev,
                  bool need_fp32, bool need_contiguous, const char* shape_desc) {
  MM_CHECK(t.device() == dev, name, " must be on ", dev, " like x, got ", t.device());
  MM_CHECK(t.sizes() == at::IntArrayRef(shape), name, " must have shape ", shape_desc, " = ",
           shape_str(shape), ", got ", shape_str(t.sizes()));
  if (need_fp32) MM_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  if (need_contiguous) MM_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// x (any strides) and the optional shift, checked; the fields every kernel of the op shares.
ActParams make_act_params(const at::Tensor& x, const c10::optional<at::Tensor>& shift, bool silu) {
  MM_CHECK(x.dim() == 4, "x must have shape (batch, dim, height, width), got ", shape_str(x.sizes()));
  MM_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
           "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t B = x.size(0), D = x.size(1), H = x.size(2), W = x.size(3);
  MM_CHECK(B >= 1 && D >= 1 && H >= 1 && W >= 1, "x must have no empty dimension, got ", shape_str(x.sizes()));
  MM_CHECK(H * W <= INT32_MAX, "height*width must fit in int32, got ", H * W);
  // Every CUDA kernel of the op puts the batch on gridDim.y, which is limited to 65535.
  MM_CHECK(!x.is_cuda() || B <= 65535, "batch (x.shape[0]) must be <= 65535 for the CUDA kernels, got ", B);
  ActParams p{};
  p.batch = int(B); p.dim = int(D); p.height = int(H); p.width = int(W); p.seqlen = int(H * W);
  p.silu = silu;
  p.x_batch_stride = x.stride(0); p.x_dim_stride = x.stride(1);
  p.x_h_stride = x.stride(2); p.x_w_stride = x.stride(3);
  p.x = x.data_ptr();
  p.shift = nullptr;
  if (shift.has_value() && shift->defined()) {
    check_tensor(*shift, "x_shift", {B, D}, x.device(), true, true, "(batch, dim)");
    p.shift = shift->data_ptr<float>();
  }
  return p;
}

FwdParams make_fwd_params(const at::Tensor& x, const c10::optional<at::Tensor>& shift, bool silu,
                          const at::Tensor& xdbl, const at::Tensor& dt_w, const at::Tensor& dt_b,
                          const at::Tensor& A_logs, const at::Tensor& Ds, bool delta_softplus) {
  FwdParams p{};
  static_cast<ActParams&>(p) = make_act_params(x, shift, silu);
  const int64_t B = p.batch, D = p.dim;
  MM_CHECK(dt_w.dim() == 3, "dt_projs_weight must have shape (4, dim, dt_rank), got ", shape_str(dt_w.sizes()));
  const int64_t R = dt_w.size(2);
  MM_CHECK(R >= 1 && R <= kMaxDtRank, "dt_rank must be in [1, ", kMaxDtRank, "], got ", R);
  MM_CHECK(A_logs.dim() == 2, "A_logs must have shape (4*dim, d_state), got ", shape_str(A_logs.sizes()));
  const int64_t N = A_logs.size(1);
  MM_CHECK(N >= 1 && N <= kMaxDState, "d_state (A_logs.shape[1]) must be in [1, ", kMaxDState,
           "] for the fused kernel, got ", N);
  const auto dev = x.device();
  check_tensor(xdbl, "x_dbl", {B, kDirections, R + 2 * N, p.seqlen}, dev, true, true,
               "(batch, 4, dt_rank + 2*d_state, height*width)");
  check_tensor(dt_w, "dt_projs_weight", {kDirections, D, R}, dev, true, true, "(4, dim, dt_rank)");
  check_tensor(dt_b, "dt_projs_bias", {kDirections, D}, dev, true, true, "(4, dim)");
  check_tensor(A_logs, "A_logs", {kDirections * D, N}, dev, true, true, "(4*dim, d_state)");
  check_tensor(Ds, "Ds", {kDirections * D}, dev, true, true, "(4*dim,)");
  p.dstate = int(N); p.dt_rank = int(R);
  p.delta_softplus = delta_softplus;
  p.xdbl = xdbl.data_ptr<float>();
  p.dt_w = dt_w.data_ptr<float>(); p.dt_b = dt_b.data_ptr<float>();
  p.A_logs = A_logs.data_ptr<float>(); p.Ds = Ds.data_ptr<float>();
  return p;
}

// y: CPU (B, D, H, W) in x's dtype; CUDA (B, D, H, W) fp32 (the four directions accumulate in it).
// u = act(x + x_shift) is made from x inside (ActParams).
void fwd(const at::Tensor& x, const at::Tensor& xdbl, const at::Tensor& dt_w, const at::Tensor& dt_b,
         const at::Tensor& A_logs, const at::Tensor& Ds, at::Tensor& y, bool delta_softplus,
         const c10::optional<at::Tensor>& shift, bool silu) {
  FwdParams p = make_fwd_params(x, shift, silu, xdbl, dt_w, dt_b, A_logs, Ds, delta_softplus);
  const bool cuda = x.is_cuda();
  check_tensor(y, "y", {p.batch, p.dim, p.height, p.width}, x.device(), cuda, true, "(batch, dim, height, width)");
  if (!cuda) MM_CHECK(y.scalar_type() == x.scalar_type(), "y must have x's dtype ", x.scalar_type(), ", got ", y.scalar_type());
  p.y = y.data_ptr();
  if (cuda) {
#ifdef MEMORYMAMBA_WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    fwd_cuda(p, x.scalar_type());
    return;
#else
    MM_CHECK(false, "memorymamba._C was built without CUDA kernels; x is on ", x.device());
#endif
  }
  MM_DISPATCH_FLOAT_TYPES(x.scalar_type(), scalar_t, "cross_selective_scan_fwd: x",
                                  [&] { fwd_cpu<scalar_t>(p); });
}

// Outputs (fp32, allocated by the caller, fully overwritten):
//   du: (B, D, L), the scan's part of dL/du (the x_proj GEMM's part and the activation's backward
//       are the caller's)
//   dxdbl: CUDA (B, 4, R+2N, L) (zero-filled by the caller unless deterministic); CPU
//          (B, kCpuChannelChunks, 4, R+2N, L) per channel chunk
//   dxdbl_part: CUDA deterministic mode (B, 4, D, 1+2N, L), else undefined
//   ddt_w_part (B, 4, D, R), ddt_b_part (B, 4, D), dA_logs_part (B, 4, D, N), dDs_part (B, 4, D)
//   seg_states: CUDA scratch (B, D, 4, ceil(L / segment_len), N); undefined on CPU
void bwd(const at::Tensor& x, const at::Tensor& xdbl, const at::Tensor& dt_w, const at::Tensor& dt_b,
         const at::Tensor& A_logs, const at::Tensor& Ds, const at::Tensor& dy, at::Tensor& du,
         at::Tensor& dxdbl, const c10::optional<at::Tensor>& dxdbl_part, at::Tensor& ddt_w_part,
         at::Tensor& ddt_b_part, at::Tensor& dA_logs_part, at::Tensor& dDs_part,
         const c10::optional<at::Tensor>& seg_states, bool delta_softplus, const c10::optional<at::Tensor>& shift,
         bool silu) {
  BwdParams p{};
  static_cast<FwdParams&>(p) = make_fwd_params(x, shift, silu, xdbl, dt_w, dt_b, A_logs, Ds, delta_softplus);
  const int64_t B = p.batch, D = p.dim, L = p.seqlen, N = p.dstate, R = p.dt_rank, K = kDirections;
  const bool cuda = x.is_cuda();
  const auto dev = x.device();
  check_tensor(dy, "dy", {B, D, p.height, p.width}, dev, true, true, "(batch, dim, height, width)");
  check_tensor(du, "du", {B, D, L}, dev, true, true, "(batch, dim, height*width)");
  if (cuda) check_tensor(dxdbl, "dxdbl", {B, K, R + 2 * N, L}, dev, true, true, "(batch, 4, dt_rank + 2*d_state, height*width)");
  else check_tensor(dxdbl, "dxdbl", {B, kCpuChannelChunks, K, R + 2 * N, L}, dev, true, true,
                    "(batch, css_cpu_channel_chunks, 4, dt_rank + 2*d_state, height*width)");
  check_tensor(ddt_w_part, "ddt_w_part", {B, K, D, R}, dev, true, true, "(batch, 4, dim, dt_rank)");
  check_tensor(ddt_b_part, "ddt_b_part", {B, K, D}, dev, true, true, "(batch, 4, dim)");
  check_tensor(dA_logs_part, "dA_logs_part", {B, K, D, N}, dev, true, true, "(batch, 4, dim, d_state)");
  check_tensor(dDs_part, "dDs_part", {B, K, D}, dev, true, true, "(batch, 4, dim)");
  p.dy = dy.data_ptr<float>(); p.du = du.data_ptr<float>(); p.dxdbl = dxdbl.data_ptr<float>();
  p.ddt_w_part = ddt_w_part.data_ptr<float>(); p.ddt_b_part = ddt_b_part.data_ptr<float>();
  p.dA_logs_part = dA_logs_part.data_ptr<float>(); p.dDs_part = dDs_part.data_ptr<float>();
  p.dxdbl_part = nullptr;
  p.seg_states = nullptr;
  if (cuda) {
#ifdef MEMORYMAMBA_WITH_CUDA
    if (dxdbl_part.has_value() && dxdbl_part->defined()) {
      check_tensor(*dxdbl_part, "dxdbl_part", {B, K, D, 1 + 2 * N, L}, dev, true, true,
                   "(batch, 4, dim, 1 + 2*d_state, height*width)");
      p.dxdbl_part = dxdbl_part->data_ptr<float>();
    }
    const int64_t nseg = (L + cuda_segment_len() - 1) / cuda_segment_len();
    MM_CHECK(seg_states.has_value() && seg_states->defined(), "seg_states is required on CUDA");
    check_tensor(*seg_states, "seg_states", {B, D, K, nseg, N}, dev, true, true,
                 "(batch, dim, 4, ceil(height*width / segment_len), d_state)");
    p.seg_states = seg_states->data_ptr<float>();
    c10::cuda::CUDAGuard guard(x.device());
    bwd_cuda(p, x.scalar_type());
    return;
#else
    MM_CHECK(false, "memorymamba._C was built without CUDA kernels; x is on ", x.device());
#endif
  }
  MM_DISPATCH_FLOAT_TYPES(x.scalar_type(), scalar_t, "cross_selective_scan_bwd: x",
                                  [&] { bwd_cpu<scalar_t>(p); });
}

// x_dbl (B, rows, L) fp32 = w (rows, D) @ act(x + x_shift) (+ w_bias (rows,)), fully overwritten.
void proj(const at::Tensor& x, const c10::optional<at::Tensor>& shift, bool silu, const at::Tensor& w,
          const c10::optional<at::Tensor>& w_bias, at::Tensor& xdbl) {
  ProjParams p{};
  static_cast<ActParams&>(p) = make_act_params(x, shift, silu);
  const auto dev = x.device();
  MM_CHECK(w.dim() == 2 && w.size(0) % kDirections == 0 && w.size(0) >= kDirections,
           "x_proj weight must have shape (4*(dt_rank + 2*d_state), dim), got ", shape_str(w.sizes()));
  const int64_t rows = w.size(0);
  check_tensor(w, "x_proj weight", {rows, p.dim}, dev, true, true, "(4*(dt_rank + 2*d_state), dim)");
  check_tensor(xdbl, "x_dbl", {p.batch, rows, p.seqlen}, dev, true, true, "(batch, 4*(dt_rank + 2*d_state), height*width)");
  p.rows = int(rows);
  p.w = w.data_ptr<float>();
  p.w_bias = nullptr;
  if (w_bias.has_value() && w_bias->defined()) {
    check_tensor(*w_bias, "x_proj bias", {rows}, dev, true, true, "(4*(dt_rank + 2*d_state),)");
    p.w_bias = w_bias->data_ptr<float>();
  }
  p.xdbl = xdbl.data_ptr<float>();
  if (x.is_cuda()) {
#ifdef MEMORYMAMBA_WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    proj_cuda(p, x.scalar_type());
    return;
#else
    MM_CHECK(false, "memorymamba._C was built without CUDA kernels; x is on ", x.device());
#endif
  }
  MM_DISPATCH_FLOAT_TYPES(x.scalar_type(), scalar_t, "cross_selective_scan_proj: x", [&] { proj_cpu<scalar_t>(p); });
}

// The activation's backward, given du = dL/du (B, D, L) fp32. Outputs (allocated by the caller, fully
// overwritten): dx (B, D, H, W) contiguous in x's dtype; dshift (B, D) fp32 when given. CPU also
// takes dxdbl (B, rows, L) and writes dw_part (B, rows, D), the per-batch d(x_proj weight), with u
// recomputed in per-task buffers; CUDA writes u (B, D, L) fp32 instead, for the caller's GEMM.
void act_bwd(const at::Tensor& x, const c10::optional<at::Tensor>& shift, bool silu, const at::Tensor& du,
             at::Tensor& dx, const c10::optional<at::Tensor>& dshift, const c10::optional<at::Tensor>& dxdbl,
             const c10::optional<at::Tensor>& dw_part, const c10::optional<at::Tensor>& u) {
  ActBwdParams p{};
  static_cast<ActParams&>(p) = make_act_params(x, shift, silu);
  const auto dev = x.device();
  const int64_t B = p.batch, D = p.dim, L = p.seqlen;
  check_tensor(du, "du", {B, D, L}, dev, true, true, "(batch, dim, height*width)");
  check_tensor(dx, "dx", {B, D, p.height, p.width}, dev, false, true, "(batch, dim, height, width)");
  MM_CHECK(dx.scalar_type() == x.scalar_type(), "dx must have x's dtype ", x.scalar_type(), ", got ", dx.scalar_type());
  p.du = du.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dshift = nullptr;
  if (dshift.has_value() && dshift->defined()) {
    check_tensor(*dshift, "dshift", {B, D}, dev, true, true, "(batch, dim)");
    p.dshift = dshift->data_ptr<float>();
  }
  p.dxdbl = nullptr; p.dw_part = nullptr; p.u = nullptr;
  if (x.is_cuda()) {
#ifdef MEMORYMAMBA_WITH_CUDA
    MM_CHECK(u.has_value() && u->defined(), "u is required on CUDA");
    check_tensor(*u, "u", {B, D, L}, dev, true, true, "(batch, dim, height*width)");
    p.u = u->data_ptr<float>();
    c10::cuda::CUDAGuard guard(x.device());
    act_bwd_cuda(p, x.scalar_type());
    return;
#else
    MM_CHECK(false, "memorymamba._C was built without CUDA kernels; x is on ", x.device());
#endif
  }
  MM_CHECK(dxdbl.has_value() && dxdbl->defined() && dxdbl->dim() == 3,
           "dxdbl (batch, rows, height*width) is required on CPU");
  const int64_t rows = dxdbl->size(1);
  check_tensor(*dxdbl, "dxdbl", {B, rows, L}, dev, true, true, "(batch, rows, height*width)");
  MM_CHECK(dw_part.has_value() && dw_part->defined(), "dw_part (batch, rows, dim) is required on CPU");
  check_tensor(*dw_part, "dw_part", {B, rows, D}, dev, true, true, "(batch, rows, dim)");
  p.rows = int(rows);
  p.dxdbl = dxdbl->data_ptr<float>();
  p.dw_part = dw_part->data_ptr<float>();
  MM_DISPATCH_FLOAT_TYPES(x.scalar_type(), scalar_t, "cross_selective_scan_act_bwd: x", [&] { act_bwd_cpu<scalar_t>(p); });
}

}  // namespace
}  // namespace css

void bind_cross_selective_scan(pybind11::module_& m) {
  m.def("cross_selective_scan_fwd", &css::fwd, "fused cross-direction selective scan, forward");
  m.def("cross_selective_scan_bwd", &css::bwd, "fused cross-direction selective scan, backward");
  m.def("cross_selective_scan_proj", &css::proj, "x_proj of all directions on u = act(x + x_shift)");
  m.def("cross_selective_scan_act_bwd", &css::act_bwd, "backward of u = act(x + x_shift) and of x_proj's weight");
  m.attr("css_max_dstate") = css::kMaxDState;
  m.attr("css_max_dt_rank") = css::kMaxDtRank;
  m.attr("css_cpu_channel_chunks") = css::kCpuChannelChunks;
#ifdef MEMORYMAMBA_WITH_CUDA
  m.attr("css_cuda_segment_len") = css::cuda_segment_len();
#endif
}
