// Fused cross-direction selective scan: input checks, the CPU kernels, and the Python bindings.
//
// CPU forward: one task per (batch, group of kLanes channels) runs all four directions, so the
// cross-merge is a sum in a private fp32 block and y is written once. CPU backward: one task per
// (batch, channel chunk) runs its channel groups in order, all four directions each, so du is
// written once per channel and the chunk's share of d(x_dbl) (a reduction over channels) has one
// fixed summation order; the kCpuChannelChunks partials are summed in order by the caller. The chunk
// count is a constant, not the thread count, so results are bitwise identical for any number of
// threads (on one CPU: the lane count, and so the summation order, follows its vector width).
// Backward recomputes the forward (no saved states): per direction a first pass keeps each step's
// delta, slope, states and decays, then the reverse pass computes the gradients.
// Every step runs on the kLanes channels of a group at once, one per lane of a SIMD vector (16 with
// AVX-512, 8 with AVX2, 4 otherwise; the MM_HD arithmetic of cross_selective_scan.h instantiated for
// it), walking the direction's index map through a precomputed permutation; per-channel data is laid
// out lane-interleaved, and square register transposes move it between that and row layout.
// The kernels read x before the block's activation and make u = act(x + shift) wherever they load
// it (load_u); the x_proj GEMM (proj_cpu) and the activation's backward with d(x_proj_weight)
// (act_bwd_cpu) do the same from row / tile buffers, so u never exists as a tensor.
// Instantiations: fwd_cpu/bwd_cpu x 3 input dtypes x 3 vector widths, proj_cpu/act_bwd_cpu x 3 input
// dtypes; the hot loops of each width are compiled for its instruction set (Isa<V>), the scans for
// N = 1 and any N; the other vectorisable helpers are cloned 3x (AVX-512, AVX2+FMA, baseline).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <string>
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
int cuda_block_channels();
#endif

// Fixed (not thread-count dependent) so the backward's d(x_dbl) partials sum in the same order
// everywhere; 4 keeps the partials small (4 x d(x_dbl)) and gives B*4 tasks.
constexpr int kCpuChannelChunks = 4;

// Every CPU sum over positions (the parameter gradients) is blocked: kSumBlock consecutive positions
// are summed on their own, then the block totals, so a term meets ~L/64 + 64 roundings instead of L.
// One running fp32 sum over L ~ 4000 positions was up to ~1% off the fp64 reference where the terms
// cancel, several times the error of PyTorch's blocked sums; blocking costs no measurable time. Block
// bounds depend only on positions, never on threads.
constexpr int64_t kSumBlock = 64;

namespace {

// Channels scanned together, one per lane of a SIMD vector V: each step of a direction (delta from the
// dt projection, softplus, exp, the state update and, backward, its gradients) runs on kLanes<V>
// channels at once in registers, through the MM_HD functions of cross_selective_scan.h instantiated
// for V. Per (position, channel) only the states the backward keeps and the lane-wise gradient terms
// go through memory; everything is laid out lane-interleaved, element (l, j) at l*kLanes + j.
// V is the widest vector the CPU compares and blends natively: f32x16 with AVX-512, f32x8 with AVX2,
// f32x4 otherwise (GCC turns a comparison on a wider vector than the ISA has into scalar code: f32x16
// on AVX2 ran 6x slower). Measured side by side (2-core dev box, AVX-512, B=8 D=96 56x56 N=1 R=6,
// 2 threads, whole op): fwd 20-24 -> 11-14 ms, fwd+bwd 82 -> 40 ms against 8 channels with the
// per-position quantities staged in arrays (whose lane-strided stores stayed scalar).
template <class V>
constexpr int kLanes = int(sizeof(V) / sizeof(float));
template <class V> struct IntVec;
template <> struct IntVec<memorymamba::f32x16> { using type = memorymamba::i32x16; };
template <> struct IntVec<memorymamba::f32x8> { using type = memorymamba::i32x8; };
template <> struct IntVec<memorymamba::f32x4> { using type = memorymamba::i32x4; };
template <class V>
using AffineV = memorymamba::ScanPairT<V>;

template <class V>
MM_HD V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V>
MM_HD void vstore(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

// Transposes a kLanes x kLanes block held in kLanes registers (v[i][k] <- v[k][i]) in log2(kLanes)
// butterfly stages; the stage of distance d swaps the off-diagonal d x d blocks (one two-source
// permute per output register).
template <class V, int d = kLanes<V> / 2>
MM_HD void transpose(V v[]) {
  constexpr int n = kLanes<V>;
  // lo lane k: v[i][k] where bit d of k is clear, else v[i|d][k-d]; hi: v[i][k+d], else v[i|d][k].
  typename IntVec<V>::type lo, hi;
  for (int k = 0; k < n; ++k) {
    lo[k] = (k & d) ? n + k - d : k;
    hi[k] = (k & d) ? n + k : k + d;
  }
#pragma GCC unroll 16
  for (int i = 0; i < n; ++i)
    if ((i & d) == 0) {
      const V x = v[i], y = v[i | d];
      v[i] = __builtin_shuffle(x, y, lo);
      v[i | d] = __builtin_shuffle(x, y, hi);
    }
  if constexpr (d > 1) transpose<V, d / 2>(v);
}

// il[l*kLanes + j] = rows[j*ld + l] for l < Lp (a multiple of kLanes), one square block at a time.
template <class V>
MM_HD void interleave_impl(const float* __restrict__ rows, int64_t ld, int64_t Lp, float* __restrict__ il) {
  constexpr int n = kLanes<V>;
  for (int64_t l0 = 0; l0 < Lp; l0 += n) {
    V v[n];
#pragma GCC unroll 16
    for (int j = 0; j < n; ++j) v[j] = vload<V>(rows + j * ld + l0);
    transpose(v);
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) vstore(il + (l0 + i) * n, v[i]);
  }
}

// The inverse: rows[j*ld + l] = il[l*kLanes + j].
template <class V>
MM_HD void deinterleave_impl(const float* __restrict__ il, int64_t Lp, float* __restrict__ rows, int64_t ld) {
  constexpr int n = kLanes<V>;
  for (int64_t l0 = 0; l0 < Lp; l0 += n) {
    V v[n];
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) v[i] = vload<V>(il + (l0 + i) * n);
    transpose(v);
#pragma GCC unroll 16
    for (int j = 0; j < n; ++j) vstore(rows + j * ld + l0, v[j]);
  }
}

// One direction's parameters for the kLanes channels of a group. Lanes past the last channel hold
// zeros: with u = g = 0 there they scan h = 0 and give exact zeros to every lane sum.
template <class V>
struct DirLanes {
  V w[kMaxDtRank];  // dt_projs_weight[k, d, :]
  V bias;
  V A[kMaxDState];  // -exp(A_logs)
  V D;
};

template <class V>
void load_dir_lanes(const FwdParams& p, int k, int d0, int lanes, DirLanes<V>& q) {
  const int R = p.dt_rank, N = p.dstate;
  for (int r = 0; r < R; ++r) q.w[r] = V{};
  for (int n = 0; n < N; ++n) q.A[n] = V{};
  q.bias = q.D = V{};
  for (int j = 0; j < lanes; ++j) {
    const int64_t kd = int64_t(k) * p.dim + d0 + j;
    for (int r = 0; r < R; ++r) q.w[r][j] = p.dt_w[kd * R + r];
    for (int n = 0; n < N; ++n) q.A[n][j] = -std::exp(p.A_logs[kd * N + n]);
    q.bias[j] = p.dt_b[kd];
    q.D[j] = p.Ds[kd];
  }
}

// dt_raw of the lanes at spatial index l: bias + w . dts (xd: the (R+2N, L) x_dbl slice of one
// (batch, direction), shared by all channels).
template <class V>
MM_HD V lane_dt(const DirLanes<V>& q, const float* __restrict__ xd, int64_t l, int64_t L, int R) {
  V dt = q.bias, odd = {};  // two partial sums halve the chain of dependent FMAs
  int r = 0;
  for (; r + 1 < R; r += 2) {
    dt += q.w[r] * xd[r * L + l];
    odd += q.w[r + 1] * xd[(r + 1) * L + l];
  }
  if (r < R) dt += q.w[r] * xd[r * L + l];
  return dt + odd;
}

// What the backward's reverse pass reads of step t of one direction, per lane, kept by its first pass
// at spatial index l: rec[(l*S + i)*kLanes] for i < S = 2 + 2N, i = 0: delta, 1: d delta / d dt_raw,
// 2 + n: h_t[n], 2 + N + n: a_t[n]. Keeping them (not recomputing) spares the reverse pass the
// softplus and exp, whose long dependency chains bound the first pass.
MM_HD int rec_size(int N) { return 2 + 2 * N; }

// The forward recurrence of one direction, h_t = a_t h_{t-1} + b_t along its path (perm: time ->
// spatial index), two steps per iteration. Forward (kRec false): y_il += sum_n C h_t. Backward's first
// pass (kRec): fills rec. kN: N at compile time (1) so the states stay in registers, or 0.
template <class V, int kN, bool kRec>
MM_HD void scan_dir(const int32_t* __restrict__ perm, const float* __restrict__ xd, const DirLanes<V>& q,
                    const float* __restrict__ u_il, int64_t L, int R, int n_states, bool softplus,
                    float* __restrict__ y_il, float* __restrict__ rec) {
  constexpr int kL = kLanes<V>;
  const int N = kN ? kN : n_states, S = rec_size(N);
  V h[kN ? kN : kMaxDState] = {};
  for (int64_t t = 0; t < L; t += 2) {
    // Two steps per iteration, their delta and decay computed side by side: the two independent exp
    // and log chains interleave. One step at a time, the loop was bound by the latency of those
    // chains (samples piled up along the second exp), not by the count of operations.
    const int steps = t + 1 < L ? 2 : 1;
    const int64_t ls[2] = {perm[t], perm[t + steps - 1]};
    V delta[2], slope[2], a[2][kN ? kN : kMaxDState];
#pragma GCC unroll 2
    for (int s = 0; s < 2; ++s) {
      const V dt = lane_dt(q, xd, ls[s], L, R);
      delta[s] = kRec ? css_delta(dt, softplus, slope[s]) : css_delta(dt, softplus);
    }
    for (int n = 0; n < N; ++n) {
#pragma GCC unroll 2
      for (int s = 0; s < 2; ++s) a[s][n] = css_decay(delta[s], q.A[n]);
    }
    for (int s = 0; s < steps; ++s) {
      const int64_t l = ls[s];
      const V u = vload<V>(u_il + l * kL);
      float* rl = kRec ? rec + l * S * kL : nullptr;  // no arithmetic on the forward's null rec
      if (kRec) {
        vstore(rl, delta[s]);
        vstore(rl + kL, slope[s]);
      }
      V y = {};
      for (int n = 0; n < N; ++n) {
        const AffineV<V> step{a[s][n], css_input(delta[s], xd[(R + n) * L + l], u)};
        h[n] = css_combine(AffineV<V>{V{} + 1.f, h[n]}, step).b;
        if (kRec) {
          vstore(rl + (2 + n) * kL, h[n]);
          vstore(rl + (2 + N + n) * kL, step.a);
        } else {
          y += xd[(R + N + n) * L + l] * h[n];
        }
      }
      if (!kRec) vstore(y_il + l * kL, vload<V>(y_il + l * kL) + y);
    }
  }
}

template <class V>
MM_HD void scan_dir_fwd_impl(const int32_t* __restrict__ perm, const float* __restrict__ xd, const DirLanes<V>& q,
                             const float* __restrict__ u_il, int64_t L, int R, int N, bool softplus,
                             float* __restrict__ y_il, float* __restrict__ rec) {
  if (rec) {
    if (N == 1) scan_dir<V, 1, true>(perm, xd, q, u_il, L, R, N, softplus, y_il, rec);
    else scan_dir<V, 0, true>(perm, xd, q, u_il, L, R, N, softplus, y_il, rec);
  } else {
    if (N == 1) scan_dir<V, 1, false>(perm, xd, q, u_il, L, R, N, softplus, y_il, rec);
    else scan_dir<V, 0, false>(perm, xd, q, u_il, L, R, N, softplus, y_il, rec);
  }
}

// Per-lane gradient sums of one direction (over positions, in time order, blocked by kSumBlock).
template <class V>
struct DirLaneGrads {
  V w[kMaxDtRank];
  V bias;
  V A[kMaxDState];
};

// The reverse pass of one direction, from the first pass's rec: dh_t = C_t g_t + a_{t+1} dh_{t+1} and
// the step's gradients. du_il gets D g + the scan's du. The lane terms that reduce_lanes sums over
// the lanes go into rec in place of what step t no longer needs (later steps read only h_{t-1}, at
// another position), which keeps the working set in the L2 cache at 56x56: slot 0 <- d dt_raw,
// 2 + n <- the dC terms, 2 + N + n <- the dB terms.
template <class V, int kN>
MM_HD void scan_dir_grad(const int32_t* __restrict__ perm, const float* __restrict__ xd, const DirLanes<V>& q,
                         const float* __restrict__ u_il, const float* __restrict__ g_il,
                         float* __restrict__ rec, int64_t L, int R, int n_states, float* __restrict__ du_il,
                         DirLaneGrads<V>& acc) {
  constexpr int kL = kLanes<V>;
  const int N = kN ? kN : n_states, S = rec_size(N);
  V e[kN ? kN : kMaxDState] = {};  // a_{t+1} dh_{t+1}: the gradient reaching h_t from later steps
  DirLaneGrads<V> blk;  // the sums over one block of steps (kSumBlock), added to acc at its end
  for (int64_t t1 = L; t1 > 0; t1 -= kSumBlock) {
    for (int r = 0; r < R; ++r) blk.w[r] = V{};
    for (int n = 0; n < N; ++n) blk.A[n] = V{};
    blk.bias = V{};
    for (int64_t t = t1 - 1; t >= std::max<int64_t>(t1 - kSumBlock, 0); --t) {
      const int64_t l = perm[t];
      float* rl = rec + l * S * kL;
      const float* rp = t > 0 ? rec + perm[t - 1] * S * kL : nullptr;  // step t-1: h_{t-1}
      const V delta = vload<V>(rl);
      const V u = vload<V>(u_il + l * kL), g = vload<V>(g_il + l * kL);
      V ddelta = {}, du = q.D * g;
      for (int n = 0; n < N; ++n) {
        const float Bn = xd[(R + n) * L + l], Cn = xd[(R + N + n) * L + l];
        const V a = vload<V>(rl + (2 + N + n) * kL);
        const V h_prev = rp ? vload<V>(rp + (2 + n) * kL) : V{};
        const V dh = Cn * g + e[n];
        const V dC = g * vload<V>(rl + (2 + n) * kL);
        vstore(rl + (2 + N + n) * kL, css_step_bwd(dh, h_prev, a, delta, q.A[n], Bn, u, ddelta, du, blk.A[n]));
        vstore(rl + (2 + n) * kL, dC);
        e[n] = a * dh;
      }
      const V ddt = ddelta * vload<V>(rl + kL);
      for (int r = 0; r < R; ++r) blk.w[r] += ddt * xd[r * L + l];
      blk.bias += ddt;
      vstore(rl, ddt);
      vstore(du_il + l * kL, vload<V>(du_il + l * kL) + du);
    }
    for (int r = 0; r < R; ++r) acc.w[r] += blk.w[r];
    for (int n = 0; n < N; ++n) acc.A[n] += blk.A[n];
    acc.bias += blk.bias;
  }
}

template <class V>
MM_HD void scan_dir_bwd_impl(const int32_t* __restrict__ perm, const float* __restrict__ xd, const DirLanes<V>& q,
                             const float* __restrict__ u_il, const float* __restrict__ g_il,
                             float* __restrict__ rec, int64_t L, int R, int N, float* __restrict__ du_il,
                             DirLaneGrads<V>& acc) {
  if (N == 1) scan_dir_grad<V, 1>(perm, xd, q, u_il, g_il, rec, L, R, N, du_il, acc);
  else scan_dir_grad<V, 0>(perm, xd, q, u_il, g_il, rec, L, R, N, du_il, acc);
}

// out = sum_l x_l y_l per lane over L lane-interleaved positions, blocked (kSumBlock).
template <class V>
MM_HD void lane_dot_impl(const float* __restrict__ x, const float* __restrict__ y, int64_t L, V& out) {
  constexpr int kL = kLanes<V>;
  V s = {};
  for (int64_t l0 = 0; l0 < L; l0 += kSumBlock) {
    V blk = {};
    for (int64_t l = l0; l < std::min(L, l0 + kSumBlock); ++l) blk += vload<V>(x + l * kL) * vload<V>(y + l * kL);
    s += blk;
  }
  out = s;
}

// Adds m <= kLanes values of v to row (a partial last block touches only its m elements).
template <class V>
MM_HD void add_to_row(float* row, V v, int m) {
  if (m == kLanes<V>) {
    vstore(row, vload<V>(row) + v);
    return;
  }
  V cur{};
  std::memcpy(&cur, row, m * sizeof(float));
  cur += v;
  std::memcpy(row, &cur, m * sizeof(float));
}

// One direction's d(x_dbl) rows (dxd, (R+2N, L)) from the lane terms scan_dir_grad left in rec: row
// r < R gets sum_j w[j, r] ddt_j (the dt projection's backward), rows R + n and R + N + n the sums over
// lanes of the dB and dC terms. The lanes are summed in order 0..15 (fixed, so the result is the same
// for any thread count).
template <class V>
MM_HD void reduce_lanes_impl(const float* __restrict__ rec, const DirLanes<V>& q, int64_t L, int R, int N,
                             float* __restrict__ dxd) {
  constexpr int kL = kLanes<V>;
  const int S = rec_size(N);
  for (int64_t l0 = 0; l0 < L; l0 += kL) {
    const int m = int(std::min<int64_t>(kL, L - l0));
    V v[kL];
#pragma GCC unroll 16
    for (int i = 0; i < kL; ++i) v[i] = vload<V>(rec + (l0 + i) * S * kL);
    transpose(v);  // v[j]: lane j's ddt at positions l0..l0+kL-1
    for (int r = 0; r < R; ++r) {
      V s = {};
#pragma GCC unroll 16
      for (int j = 0; j < kL; ++j) s += q.w[r][j] * v[j];
      add_to_row(dxd + r * L + l0, s, m);
    }
    for (int c = 0; c < 2 * N; ++c) {
      const int slot = c < N ? 2 + N + c : 2 + (c - N);  // dB_c, then dC_{c-N}
#pragma GCC unroll 16
      for (int i = 0; i < kL; ++i) v[i] = vload<V>(rec + ((l0 + i) * S + slot) * kL);
      transpose(v);
      V s = {};
#pragma GCC unroll 16
      for (int j = 0; j < kL; ++j) s += v[j];
      add_to_row(dxd + (R + c) * L + l0, s, m);
    }
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
// up to kProjTile columns). The sum over d runs in order, blocked by kSumBlock (deterministic,
// independent of the tiling). Also the backward's d(x_proj_weight) GEMM, with D the positions and u
// transposed (there the blocking matters). MM_HD forces the inlining, so every target clone of
// proj_span gets its own vector code.
template <int kRows>
MM_HD void proj_rows(const float* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ u,
                     int64_t ldu, int D, int n, float* __restrict__ out, int64_t ld) {
  ProjVec tot[kRows], acc[kRows];
  for (int i = 0; i < kRows; ++i) tot[i] = ProjVec{} + (bias ? bias[i] : 0.f);
  for (int d0 = 0; d0 < D; d0 += int(kSumBlock)) {
    for (int i = 0; i < kRows; ++i) acc[i] = ProjVec{};
    for (int d = d0; d < std::min<int>(D, d0 + kSumBlock); ++d) {
      ProjVec ud;
      std::memcpy(&ud, u + d * ldu, sizeof(ud));
      for (int i = 0; i < kRows; ++i) acc[i] += w[int64_t(i) * D + d] * ud;
    }
    for (int i = 0; i < kRows; ++i) tot[i] += acc[i];
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < n; ++j) out[i * ld + j] = tot[i][j];
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
    memorymamba::FlushDenormals ftz;
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

// x[0] + ... + x[n-1], blocked: kProjTile lanes sum a block of kSumBlock positions, the block totals go
// to per-lane totals, and the lanes are added as a tree. (mm_dot's 32 sequential partials, then 32
// sequential adds, were ~2x less accurate than torch's sum at L ~ 4000.)
MM_CPU_VEC float blocked_sum(const float* __restrict__ x, int64_t n) {
  ProjVec tot = {};
  for (int64_t l0 = 0; l0 < n; l0 += kSumBlock) {
    const int64_t m = std::min(kSumBlock, n - l0);
    ProjVec blk = {};
    int64_t l = 0;
    for (; l + kProjTile <= m; l += kProjTile) {
      ProjVec v;
      std::memcpy(&v, x + l0 + l, sizeof(v));
      blk += v;
    }
    for (; l < m; ++l) blk[l % kProjTile] += x[l0 + l];  // a partial last block
    tot += blk;
  }
  for (int w = kProjTile / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) tot[j] += tot[j + w];
  return tot[0];
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
    memorymamba::FlushDenormals ftz;
    std::vector<float> buf(2 * L + L * chunk);
    float *z = buf.data(), *g = z + L, *ut = g + L;
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
        if (p.dshift) p.dshift[row] = blocked_sum(g, L);
        for (int64_t l = 0; l < L; ++l) ut[l * chunk + j] = z[l];
      }
      for (int64_t l = 0; l < L; ++l) std::fill(ut + l * chunk + n, ut + (l + 1) * chunk, 0.f);
      proj_span(p.dxdbl + b * p.rows * L, nullptr, ut, chunk, p.rows, int(L), n, p.dw_part + b * p.rows * D + d0, D);
    }
  });
}

// The hot loops of one vector width V, each compiled for the instruction set that has V natively
// (the MM_HD bodies above are inlined into these).
template <class V> struct Isa;
#define MM_CSS_ISA(V, TARGET)                                                                         \
  template <> struct Isa<V> {                                                                          \
    TARGET static void interleave(const float* rows, int64_t ld, int64_t Lp, float* il) {             \
      interleave_impl<V>(rows, ld, Lp, il);                                                            \
    }                                                                                                  \
    TARGET static void deinterleave(const float* il, int64_t Lp, float* rows, int64_t ld) {           \
      deinterleave_impl<V>(il, Lp, rows, ld);                                                          \
    }                                                                                                  \
    TARGET static void scan_dir_fwd(const int32_t* perm, const float* xd, const DirLanes<V>& q,        \
                                    const float* u_il, int64_t L, int R, int N, bool softplus,         \
                                    float* y_il, float* rec) {                                         \
      scan_dir_fwd_impl<V>(perm, xd, q, u_il, L, R, N, softplus, y_il, rec);                           \
    }                                                                                                  \
    TARGET static void scan_dir_bwd(const int32_t* perm, const float* xd, const DirLanes<V>& q,        \
                                    const float* u_il, const float* g_il, float* rec, int64_t L, int R, \
                                    int N, float* du_il, DirLaneGrads<V>& acc) {                       \
      scan_dir_bwd_impl<V>(perm, xd, q, u_il, g_il, rec, L, R, N, du_il, acc);                         \
    }                                                                                                  \
    TARGET static void reduce_lanes(const float* rec, const DirLanes<V>& q, int64_t L, int R, int N,  \
                                    float* dxd) {                                                      \
      reduce_lanes_impl<V>(rec, q, L, R, N, dxd);                                                      \
    }                                                                                                  \
    TARGET static void lane_dot(const float* x, const float* y, int64_t L, V& out) {                  \
      lane_dot_impl<V>(x, y, L, out);                                                                  \
    }                                                                                                  \
  };
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
MM_CSS_ISA(memorymamba::f32x16, __attribute__((target("arch=x86-64-v4"))))
MM_CSS_ISA(memorymamba::f32x8, __attribute__((target("arch=x86-64-v3"))))
#endif
MM_CSS_ISA(memorymamba::f32x4, )
#undef MM_CSS_ISA

// One row of L floats per lane, written by fill_row(j, row) for the lanes j < lanes (zeros in the
// other lanes and past L), lane-interleaved into il; rows: kLanes x Lp staging, Lp = L rounded up to
// kLanes.
template <class V, class FillRow>
void stage_lanes(int lanes, int64_t L, int64_t Lp, float* rows, float* il, FillRow&& fill_row) {
  for (int j = 0; j < kLanes<V>; ++j) {
    float* row = rows + j * Lp;
    if (j < lanes) fill_row(j, row);
    std::fill(row + (j < lanes ? L : 0), row + Lp, 0.f);
  }
  Isa<V>::interleave(rows, Lp, Lp, il);
}

// u of the lanes of group (b, d0) (lanes past D: zeros), lane-interleaved into u_il.
template <typename T, class V>
void load_u_lanes(const ActParams& p, int64_t b, int d0, int lanes, int64_t Lp, float* rows, float* u_il) {
  stage_lanes<V>(lanes, p.seqlen, Lp, rows, u_il, [&](int j, float* row) { load_u<T>(p, b, d0 + j, row); });
}

template <class V>
int64_t round_to_lanes(int64_t L) { return (L + kLanes<V> - 1) / kLanes<V> * kLanes<V>; }

// Tasks: (batch, group of kLanes channels); each runs its channels through all four directions,
// accumulating the cross-merge in a private row block, and writes its y rows once.
template <typename T, class V>
void fwd_cpu(const FwdParams& p) {
  constexpr int kL = kLanes<V>;
  const int D = p.dim, R = p.dt_rank, N = p.dstate;
  const int64_t L = p.seqlen, C = R + 2 * N, Lp = round_to_lanes<V>(L);
  const int64_t groups = (D + kL - 1) / kL;
  const std::vector<int32_t> perm = direction_permutations(p.height, p.width);
  T* y = static_cast<T*>(p.y);
  at::parallel_for(0, int64_t(p.batch) * groups, 1, [&](int64_t begin, int64_t end) {
    memorymamba::FlushDenormals ftz;
    std::vector<float> buf(3 * kL * Lp);
    float *rows = buf.data(), *u_il = rows + kL * Lp, *y_il = u_il + kL * Lp;
    DirLanes<V> q;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / groups;
      const int d0 = int(task % groups) * kL, lanes = std::min(kL, D - d0);
      load_u_lanes<T, V>(p, b, d0, lanes, Lp, rows, u_il);
      V Dsum = {};
      for (int j = 0; j < lanes; ++j)
        for (int k = 0; k < kDirections; ++k) Dsum[j] += p.Ds[k * D + d0 + j];
      for (int64_t l = 0; l < Lp; ++l) vstore(y_il + l * kL, Dsum * vload<V>(u_il + l * kL));
      for (int k = 0; k < kDirections; ++k) {
        load_dir_lanes(p, k, d0, lanes, q);
        Isa<V>::scan_dir_fwd(perm.data() + k * L, p.xdbl + (b * kDirections + k) * C * L, q, u_il, L, R, N,
                             p.delta_softplus, y_il, nullptr);
      }
      Isa<V>::deinterleave(y_il, Lp, rows, Lp);
      for (int j = 0; j < lanes; ++j) {
        T* yrow = y + (b * D + d0 + j) * L;
        for (int64_t l = 0; l < L; ++l) yrow[l] = static_cast<T>(rows[j * Lp + l]);
      }
    }
  });
}

// Tasks: (batch, channel chunk); chunk c holds the channel groups [c G / 4, (c+1) G / 4) of the G groups
// and runs them in order, all four directions each (the forward recomputed, its states kept per
// direction), so du is written once per channel and the chunk's d(x_dbl) partial has one fixed
// summation order.
template <typename T, class V>
void bwd_cpu(const BwdParams& p) {
  constexpr int kL = kLanes<V>;
  const int D = p.dim, R = p.dt_rank, N = p.dstate;
  const int64_t L = p.seqlen, C = R + 2 * N, Lp = round_to_lanes<V>(L);
  const int64_t groups = (D + kL - 1) / kL;
  const std::vector<int32_t> perm = direction_permutations(p.height, p.width);
  at::parallel_for(0, int64_t(p.batch) * kCpuChannelChunks, 1, [&](int64_t begin, int64_t end) {
    memorymamba::FlushDenormals ftz;
    std::vector<float> buf((4 + rec_size(N)) * kL * Lp);
    float *rows = buf.data(), *u_il = rows + kL * Lp, *g_il = u_il + kL * Lp, *du_il = g_il + kL * Lp;
    float* rec = du_il + kL * Lp;
    DirLanes<V> q;
    DirLaneGrads<V> acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kCpuChannelChunks, chunk = task % kCpuChannelChunks;
      float* dxd_chunk = p.dxdbl + task * kDirections * C * L;  // (K, C, L) partial of this chunk
      std::fill(dxd_chunk, dxd_chunk + kDirections * C * L, 0.f);
      for (int64_t grp = chunk * groups / kCpuChannelChunks; grp < (chunk + 1) * groups / kCpuChannelChunks; ++grp) {
        const int d0 = int(grp) * kL, lanes = std::min(kL, D - d0);
        load_u_lanes<T, V>(p, b, d0, lanes, Lp, rows, u_il);
        stage_lanes<V>(lanes, L, Lp, rows, g_il, [&](int j, float* row) {
          const float* g = p.dy + (b * D + d0 + j) * L;
          std::copy(g, g + L, row);
        });
        V dD;  // d Ds = sum_l g u, the same for every direction
        Isa<V>::lane_dot(g_il, u_il, L, dD);
        std::fill(du_il, du_il + kL * Lp, 0.f);
        for (int k = 0; k < kDirections; ++k) {
          const float* xd = p.xdbl + (b * kDirections + k) * C * L;
          const int32_t* pk = perm.data() + k * L;
          load_dir_lanes(p, k, d0, lanes, q);
          Isa<V>::scan_dir_fwd(pk, xd, q, u_il, L, R, N, p.delta_softplus, nullptr, rec);
          for (int r = 0; r < R; ++r) acc.w[r] = V{};
          for (int n = 0; n < N; ++n) acc.A[n] = V{};
          acc.bias = V{};
          Isa<V>::scan_dir_bwd(pk, xd, q, u_il, g_il, rec, L, R, N, du_il, acc);
          Isa<V>::reduce_lanes(rec, q, L, R, N, dxd_chunk + k * C * L);
          for (int j = 0; j < lanes; ++j) {
            const int64_t part = (b * kDirections + k) * D + d0 + j;  // index into the (B, K, D, ...) partials
            for (int r = 0; r < R; ++r) p.ddt_w_part[part * R + r] = acc.w[r][j];
            for (int n = 0; n < N; ++n) p.dA_logs_part[part * N + n] = acc.A[n][j] * q.A[n][j];
            p.ddt_b_part[part] = acc.bias[j];
            p.dDs_part[part] = dD[j];
          }
        }
        Isa<V>::deinterleave(du_il, Lp, rows, Lp);
        for (int j = 0; j < lanes; ++j)
          std::copy(rows + j * Lp, rows + j * Lp + L, p.du + (b * D + d0 + j) * L);
      }
    }
  });
}

// The scan kernels' vector width follows memorymamba::cpu_isa() (the tests force all three).
using memorymamba::CpuIsa;
using memorymamba::cpu_isa;

// What `memorymamba info` prints: the build the CPU kernels run and its lane count.
std::string cpu_vector_name() {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return "avx512 (16 channels per step)";
    case CpuIsa::kAvx2: return "avx2 (8 channels per step)";
    default: return "baseline (4 channels per step)";
  }
}

// Runs f.template operator()<V>() for the vector type of cpu_isa().
template <class F>
void with_cpu_vector(F&& f) {
  switch (cpu_isa()) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    case CpuIsa::kAvx512: return f.template operator()<memorymamba::f32x16>();
    case CpuIsa::kAvx2: return f.template operator()<memorymamba::f32x8>();
#endif
    default: return f.template operator()<memorymamba::f32x4>();
  }
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
                                  [&] { with_cpu_vector([&]<class V>() { fwd_cpu<scalar_t, V>(p); }); });
}

// Outputs (fp32, allocated by the caller, fully overwritten):
//   du: (B, D, L), the scan's part of dL/du (the x_proj GEMM's part and the activation's backward
//       are the caller's)
//   dxdbl: CUDA (B, 4, R+2N, L) (zero-filled by the caller unless deterministic); CPU
//          (B, kCpuChannelChunks, 4, R+2N, L) per channel chunk
//   dxdbl_part: CUDA deterministic mode (B, 4, G, R+2N, L), one partial of d(x_dbl) per group of
//               cuda_block_channels() channels (G groups), summed by the caller; else undefined
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
      const int64_t groups = (D + cuda_block_channels() - 1) / cuda_block_channels();
      check_tensor(*dxdbl_part, "dxdbl_part", {B, K, groups, R + 2 * N, L}, dev, true, true,
                   "(batch, 4, ceil(dim / css_cuda_block_channels), dt_rank + 2*d_state, height*width)");
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
                                  [&] { with_cpu_vector([&]<class V>() { bwd_cpu<scalar_t, V>(p); }); });
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
  m.def("css_cpu_vector", &css::cpu_vector_name,
        "the vector build the CPU scan kernels run (MEMORYMAMBA_CPU_ISA may pick a narrower one)");
#ifdef MEMORYMAMBA_WITH_CUDA
  m.attr("css_cuda_segment_len") = css::cuda_segment_len();
  m.attr("css_cuda_block_channels") = css::cuda_block_channels();
#endif
}
