// Fused cross-direction selective scan, CUDA forward and backward.
//
// One block per (channel d, batch b) runs the four directions one after another. A direction's
// sequence is cut into segments of kNThreads * kNItems time steps; thread i owns kNItems consecutive
// steps of a segment, folds its steps into one affine map (css_combine), and a block-wide scan of
// those maps gives every thread its starting state; the state carries across segments in smem.
// The merged y (and, in backward, du) is accumulated in an fp32 buffer with plain read-add-write in
// direction order 0..3, separated by __syncthreads: the block owns its (b, d) row, so the merge is
// deterministic without atomics. delta is computed in registers from x_dbl's rank-R rows.
//
// Backward recomputes everything: a first pass stores each segment's starting state (seg_states),
// then segments run in reverse with a forward scan (states h) and a reverse scan (state grads dh).
// d(x_dbl) sums over channels, i.e. over blocks: fp32 atomics, or (deterministic mode) per-channel
// rows in dxdbl_part that the caller reduces in a fixed order. Parameter grads: per-(b, k, d)
// block reductions in a fixed order, written as partials.
//
// u = act(x + shift) (ActParams) is made from x wherever a kernel loads it: the scans (load_step),
// the x_proj GEMM (proj_kernel) and the activation's backward (act_bwd_kernel); the silu flag and the
// shift pointer are runtime values, uniform over the grid, so they cost no instantiations.
// Instantiations: (forward, backward, proj, act_bwd) x 3 input dtypes = 12 kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "cross_selective_scan/cross_selective_scan.h"
#include "common/dispatch.h"

namespace css {

struct KernelTraits {
  static constexpr int kNThreads = 128;
  static constexpr int kNItems = 4;
  static constexpr int kNWarps = kNThreads / 32;
  static constexpr int kSegment = kNThreads * kNItems;
  static_assert(kNThreads % 32 == 0, "whole warps only");
};

int cuda_segment_len() { return KernelTraits::kSegment; }

namespace {

using KT = KernelTraits;

// Exclusive scan of affine maps over the block's threads, in thread order (kReverse: from the last
// thread down). Returns the composition of the maps of all earlier threads; `total` = all threads.
template <bool kReverse>
__device__ Affine block_exclusive_scan(Affine v, Affine& total, Affine* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  Affine inc = v;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float pa = kReverse ? __shfl_down_sync(0xffffffffu, inc.a, off) : __shfl_up_sync(0xffffffffu, inc.a, off);
    const float pb = kReverse ? __shfl_down_sync(0xffffffffu, inc.b, off) : __shfl_up_sync(0xffffffffu, inc.b, off);
    const bool has = kReverse ? (lane + off < 32) : (lane >= off);
    if (has) inc = css_combine({pa, pb}, inc);
  }
  const int last = kReverse ? 0 : 31;   // its inclusive value covers the whole warp
  const int first = kReverse ? 31 : 0;  // nothing precedes it inside the warp
  if (lane == last) smem[warp] = inc;
  const float ea = kReverse ? __shfl_down_sync(0xffffffffu, inc.a, 1) : __shfl_up_sync(0xffffffffu, inc.a, 1);
  const float eb = kReverse ? __shfl_down_sync(0xffffffffu, inc.b, 1) : __shfl_up_sync(0xffffffffu, inc.b, 1);
  __syncthreads();
  Affine before{1.f, 0.f};
  total = {1.f, 0.f};
#pragma unroll
  for (int i = 0; i < KT::kNWarps; ++i) {
    const int w = kReverse ? KT::kNWarps - 1 - i : i;
    if (kReverse ? (w > warp) : (w < warp)) before = css_combine(before, smem[w]);
    total = css_combine(total, smem[w]);
  }
  __syncthreads();  // smem is reused by the next call
  const Affine ex = (lane == first) ? Affine{1.f, 0.f} : Affine{ea, eb};
  return css_combine(before, ex);
}

// Fixed-order block sum (deterministic); result valid in every thread.
__device__ float block_sum(float v, float* smem) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < KT::kNWarps; ++w) s += smem[w];
  __syncthreads();
  return s;
}

struct Smem {
  float A[kMaxDState];
  float w[kMaxDtRank];
  float carry[kMaxDState];
  Affine scan[KT::kNWarps];
  float red[KT::kNWarps];
};

__device__ float shift_of(const ActParams& p, int b, int d) {
  return p.shift ? p.shift[int64_t(b) * p.dim + d] : 0.f;
}

// x at spatial index l of the (b, d) row, as fp32 (any strides).
template <typename T>
__device__ float load_x(const ActParams& p, int b, int d, int l) {
  const int h = l / p.width, w = l - h * p.width;
  const T* x = static_cast<const T*>(p.x);
  return static_cast<float>(
      x[b * p.x_batch_stride + d * p.x_dim_stride + h * p.x_h_stride + w * p.x_w_stride]);
}

// Loads the step-independent data of one time step: spatial index, u = act(x + shift), raw and
// final delta.
template <typename T>
__device__ void load_step(const FwdParams& p, int b, int d, int k, int64_t t, const float* xd, const Smem& s,
                          float bias, float shift, int& l, float& u, float& dt, float& delta) {
  l = int(css_spatial_index(k, t, p.height, p.width));
  u = css_act(load_x<T>(p, b, d, l) + shift, p.silu);
  dt = bias;
  for (int r = 0; r < p.dt_rank; ++r) dt += s.w[r] * xd[int64_t(r) * p.seqlen + l];
  delta = css_delta(dt, p.delta_softplus);
}

__device__ void load_direction_params(const FwdParams& p, int k, int d, Smem& s) {
  const int64_t kd = int64_t(k) * p.dim + d;
  for (int i = threadIdx.x; i < p.dstate; i += KT::kNThreads) {
    s.A[i] = -expf(p.A_logs[kd * p.dstate + i]);
    s.carry[i] = 0.f;
  }
  for (int i = threadIdx.x; i < p.dt_rank; i += KT::kNThreads) s.w[i] = p.dt_w[kd * p.dt_rank + i];
  __syncthreads();
}

template <typename T>
__global__ __launch_bounds__(KT::kNThreads) void fwd_kernel(FwdParams p) {
  __shared__ Smem s;
  const int d = blockIdx.x, b = blockIdx.y;
  const int64_t L = p.seqlen, N = p.dstate, R = p.dt_rank;
  const float shift = shift_of(p, b, d);
  float* y = static_cast<float*>(p.y) + (int64_t(b) * p.dim + d) * L;
  for (int k = 0; k < kDirections; ++k) {
    load_direction_params(p, k, d, s);
    const int64_t kd = int64_t(k) * p.dim + d;
    const float bias = p.dt_b[kd], Dk = p.Ds[kd];
    const float* xd = p.xdbl + (int64_t(b) * kDirections + k) * (R + 2 * N) * L;
    for (int64_t t0 = 0; t0 < L; t0 += KT::kSegment) {
      int l[KT::kNItems];
      float u[KT::kNItems], dt[KT::kNItems], delta[KT::kNItems], yv[KT::kNItems];
#pragma unroll
      for (int j = 0; j < KT::kNItems; ++j) {
        const int64_t t = t0 + threadIdx.x * KT::kNItems + j;
        yv[j] = 0.f;
        if (t < L) load_step<T>(p, b, d, k, t, xd, s, bias, shift, l[j], u[j], dt[j], delta[j]);
        else { l[j] = -1; u[j] = 0.f; delta[j] = 0.f; }
      }
      for (int n = 0; n < N; ++n) {
        const float* Bn = xd + (R + n) * L;
        const float* Cn = xd + (R + N + n) * L;
        Affine step[KT::kNItems];
        Affine agg{1.f, 0.f};
#pragma unroll
        for (int j = 0; j < KT::kNItems; ++j) {
          step[j] = l[j] >= 0 ? Affine{css_decay(delta[j], s.A[n]), css_input(delta[j], Bn[l[j]], u[j])}
                              : Affine{1.f, 0.f};
          agg = css_combine(agg, step[j]);
        }
        Affine total;
        const Affine before = block_exclusive_scan<false>(agg, total, s.scan);
        const float carry = s.carry[n];
        float h = before.a * carry + before.b;
#pragma unroll
        for (int j = 0; j < KT::kNItems; ++j) {
          h = step[j].a * h + step[j].b;
          if (l[j] >= 0) yv[j] += Cn[l[j]] * h;
        }
        __syncthreads();  // everyone has read carry
        if (threadIdx.x == 0) s.carry[n] = total.a * carry + total.b;
        __syncthreads();
      }
#pragma unroll
      for (int j = 0; j < KT::kNItems; ++j) {
        if (l[j] < 0) continue;
        const float v = yv[j] + Dk * u[j];
        y[l[j]] = k == 0 ? v : y[l[j]] + v;
      }
    }
    __syncthreads();  // direction k's writes of y are visible before direction k+1 adds to them
  }
}

template <typename T>
__global__ __launch_bounds__(KT::kNThreads) void bwd_kernel(BwdParams p) {
  __shared__ Smem s;
  __shared__ float e_carry[kMaxDState];
  const int d = blockIdx.x, b = blockIdx.y;
  const int64_t L = p.seqlen, N = p.dstate, R = p.dt_rank, C = R + 2 * N;
  const int64_t nseg = (L + KT::kSegment - 1) / KT::kSegment;
  const float shift = shift_of(p, b, d);
  const float* g_row = p.dy + (int64_t(b) * p.dim + d) * L;
  float* du_row = p.du + (int64_t(b) * p.dim + d) * L;
  for (int k = 0; k < kDirections; ++k) {
    load_direction_params(p, k, d, s);
    const int64_t kd = int64_t(k) * p.dim + d;
    const int64_t part = (int64_t(b) * kDirections + k) * p.dim + d;
    const float bias = p.dt_b[kd], Dk = p.Ds[kd];
    const float* xd = p.xdbl + (int64_t(b) * kDirections + k) * C * L;
    float* dxd = p.dxdbl + (int64_t(b) * kDirections + k) * C * L;
    float* dpart = p.dxdbl_part ? p.dxdbl_part + part * (1 + 2 * N) * L : nullptr;
    float* states = p.seg_states + ((int64_t(b) * p.dim + d) * kDirections + k) * nseg * N;

    // Pass 1: the state entering every segment.
    for (int64_t seg = 0; seg < nseg; ++seg) {
      int l[KT::kNItems];
      float u[KT::kNItems], dt[KT::kNItems], delta[KT::kNItems];
#pragma unroll
      for (int j = 0; j < KT::kNItems; ++j) {
        const int64_t t = seg * KT::kSegment + threadIdx.x * KT::kNItems + j;
        if (t < L) load_step<T>(p, b, d, k, t, xd, s, bias, shift, l[j], u[j], dt[j], delta[j]);
        else l[j] = -1;
      }
      for (int n = 0; n < N; ++n) {
        const float* Bn = xd + (R + n) * L;
        Affine agg{1.f, 0.f};
#pragma unroll
        for (int j = 0; j < KT::kNItems; ++j)
          if (l[j] >= 0) agg = css_combine(agg, {css_decay(delta[j], s.A[n]), css_input(delta[j], Bn[l[j]], u[j])});
        Affine total;
        block_exclusive_scan<false>(agg, total, s.scan);
        if (threadIdx.x == 0) {
          states[seg * N + n] = s.carry[n];
          s.carry[n] = total.a * s.carry[n] + total.b;
        }
        __syncthreads();
      }
    }
    for (int i = threadIdx.x; i < N; i += KT::kNThreads) e_carry[i] = 0.f;
    __syncthreads();

    // Pass 2: segments in reverse; per-thread sums of the parameter grads.
    float acc_w[kMaxDtRank], acc_A[kMaxDState];
    for (int r = 0; r < R; ++r) acc_w[r] = 0.f;
    for (int n = 0; n < N; ++n) acc_A[n] = 0.f;
    float acc_b = 0.f, acc_D = 0.f;
    for (int64_t seg = nseg - 1; seg >= 0; --seg) {
      int l[KT::kNItems];
      float u[KT::kNItems], dt[KT::kNItems], delta[KT::kNItems], g[KT::kNItems];
      float ddelta[KT::kNItems], du[KT::kNItems];
#pragma unroll
      for (int j = 0; j < KT::kNItems; ++j) {
        const int64_t t = seg * KT::kSegment + threadIdx.x * KT::kNItems + j;
        ddelta[j] = 0.f;
        if (t < L) {
          load_step<T>(p, b, d, k, t, xd, s, bias, shift, l[j], u[j], dt[j], delta[j]);
          g[j] = g_row[l[j]];
          du[j] = g[j] * Dk;
          acc_D += g[j] * u[j];
        } else {
          l[j] = -1; u[j] = 0.f; dt[j] = 0.f; delta[j] = 0.f; g[j] = 0.f; du[j] = 0.f;
        }
      }
      for (int n = 0; n < N; ++n) {
        const float* Bn = xd + (R + n) * L;
        const float* Cn = xd + (R + N + n) * L;
        Affine step[KT::kNItems];
        float h[KT::kNItems], c[KT::kNItems];
        Affine agg{1.f, 0.f};
#pragma unroll
        for (int j = 0; j < KT::kNItems; ++j) {
          const bool ok = l[j] >= 0;
          step[j] = ok ? Affine{css_decay(delta[j], s.A[n]), css_input(delta[j], Bn[l[j]], u[j])} : Affine{1.f, 0.f};
          c[j] = ok ? Cn[l[j]] * g[j] : 0.f;
          agg = css_combine(agg, step[j]);
        }
        Affine total;
        const Affine before = block_exclusive_scan<false>(agg, total, s.scan);
        const float h_in = before.a * states[seg * N + n] + before.b;
        float hh = h_in;
#pragma unroll
        for (int j = 0; j < KT::kNItems; ++j) {
          hh = step[j].a * hh + step[j].b;
          h[j] = hh;
        }
        // Reverse: e_t = a_t (c_t + e_{t+1}) is the gradient reaching h_{t-1} through step t.
        Affine ragg{1.f, 0.f};
#pragma unroll
        for (int j = KT::kNItems - 1; j >= 0; --j) ragg = css_combine(ragg, {step[j].a, step[j].a * c[j]});
        Affine rtotal;
        const Affine after = block_exclusive_scan<true>(ragg, rtotal, s.scan);
        const float e_in = e_carry[n];
        float e = after.a * e_in + after.b;
#pragma unroll
        for (int j = KT::kNItems - 1; j >= 0; --j) {
          const float dh = c[j] + e;
          e = step[j].a * dh;
          if (l[j] < 0) continue;
          const float h_prev = j > 0 ? h[j - 1] : h_in;
          const float dB = css_step_bwd(dh, h_prev, step[j].a, delta[j], s.A[n], Bn[l[j]], u[j], ddelta[j], du[j],
                                        acc_A[n]);
          const float dC = g[j] * h[j];
          if (dpart) {
            dpart[(1 + n) * L + l[j]] = dB;
            dpart[(1 + N + n) * L + l[j]] = dC;
          } else {
            atomicAdd(dxd + (R + n) * L + l[j], dB);
            atomicAdd(dxd + (R + N + n) * L + l[j], dC);
          }
        }
        __syncthreads();  // everyone has read e_carry
        if (threadIdx.x == 0) e_carry[n] = rtotal.a * e_in + rtotal.b;
        __syncthreads();
      }
#pragma unroll
      for (int j = 0; j < KT::kNItems; ++j) {
        if (l[j] < 0) continue;
        const float ddt = ddelta[j] * css_delta_grad(dt[j], p.delta_softplus);
        acc_b += ddt;
        for (int r = 0; r < R; ++r) {
          acc_w[r] += ddt * xd[r * L + l[j]];
          if (!dpart) atomicAdd(dxd + r * L + l[j], ddt * s.w[r]);
        }
        if (dpart) dpart[l[j]] = ddt;
        du_row[l[j]] = k == 0 ? du[j] : du_row[l[j]] + du[j];
      }
    }
    for (int r = 0; r < R; ++r) {
      const float v = block_sum(acc_w[r], s.red);
      if (threadIdx.x == 0) p.ddt_w_part[part * R + r] = v;
    }
    for (int n = 0; n < N; ++n) {
      const float v = block_sum(acc_A[n], s.red);
      if (threadIdx.x == 0) p.dA_logs_part[part * N + n] = v * s.A[n];
    }
    const float vb = block_sum(acc_b, s.red), vD = block_sum(acc_D, s.red);
    if (threadIdx.x == 0) {
      p.ddt_b_part[part] = vb;
      p.dDs_part[part] = vD;
    }
    __syncthreads();  // du of direction k is visible before direction k+1 adds to it
  }
}

// x_proj: x_dbl[b, c, l] = sum_d w[c, d] u[b, d, l] (+ bias[c]), u made from x as it is loaded.
// A block computes a kRows x kPositions tile of one batch, walking D in kChunk slices staged in smem
// (u slice kChunk x kPositions, w slice kRows x kChunk). Thread i owns position i % kPositions and
// kRows / kGroups rows: the u reads are consecutive per warp, the w reads broadcast.
struct ProjTraits {
  static constexpr int kNThreads = 256;
  static constexpr int kPositions = 64;
  static constexpr int kRows = 32;
  static constexpr int kChunk = 32;
  static constexpr int kGroups = kNThreads / kPositions;       // row groups
  static constexpr int kRowsPerThread = kRows / kGroups;
  static constexpr int kULoads = kChunk / kGroups;             // u elements staged per thread
  static constexpr int kWLoads = kRows * kChunk / kNThreads;   // w elements staged per thread
  static_assert(kNThreads % kPositions == 0 && kPositions % 32 == 0, "a warp covers 32 positions of one row group");
  static_assert(kRows % kGroups == 0 && kChunk % kGroups == 0 && (kRows * kChunk) % kNThreads == 0,
                "tiles split evenly over the threads");
  static dim3 grid(const ProjParams& p) {
    return dim3((p.seqlen + kPositions - 1) / kPositions, p.batch, (p.rows + kRows - 1) / kRows);
  }
};

template <typename T>
__global__ __launch_bounds__(ProjTraits::kNThreads) void proj_kernel(ProjParams p) {
  using PT = ProjTraits;
  __shared__ float us[PT::kChunk][PT::kPositions];
  __shared__ float ws[PT::kRows][PT::kChunk + 1];  // + 1: no bank conflicts on the row-wise fill
  const int b = blockIdx.y, c0 = blockIdx.z * PT::kRows;
  const int pos = threadIdx.x % PT::kPositions, group = threadIdx.x / PT::kPositions;
  const int l = blockIdx.x * PT::kPositions + pos;
  const bool in_range = l < p.seqlen;
  // The thread's position is fixed: its offset in x is computed once, not per channel.
  const int lc = in_range ? l : 0, h = lc / p.width, w = lc - h * p.width;
  const T* x = static_cast<const T*>(p.x) + int64_t(b) * p.x_batch_stride + h * p.x_h_stride + w * p.x_w_stride;
  float acc[PT::kRowsPerThread];
#pragma unroll
  for (int i = 0; i < PT::kRowsPerThread; ++i) acc[i] = 0.f;
  for (int d0 = 0; d0 < p.dim; d0 += PT::kChunk) {
#pragma unroll
    for (int i = 0; i < PT::kULoads; ++i) {
      const int dd = group + i * PT::kGroups, d = d0 + dd;
      us[dd][pos] = (in_range && d < p.dim)
                        ? css_act(static_cast<float>(x[d * p.x_dim_stride]) + shift_of(p, b, d), p.silu) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < PT::kWLoads; ++i) {
      const int e = threadIdx.x + i * PT::kNThreads, r = e / PT::kChunk, dd = e % PT::kChunk;
      ws[r][dd] = (c0 + r < p.rows && d0 + dd < p.dim) ? p.w[int64_t(c0 + r) * p.dim + d0 + dd] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int dd = 0; dd < PT::kChunk; ++dd) {
      const float u = us[dd][pos];
#pragma unroll
      for (int i = 0; i < PT::kRowsPerThread; ++i) acc[i] += ws[group * PT::kRowsPerThread + i][dd] * u;
    }
    __syncthreads();  // the slices are refilled next
  }
  if (!in_range) return;
#pragma unroll
  for (int i = 0; i < PT::kRowsPerThread; ++i) {
    const int c = c0 + group * PT::kRowsPerThread + i;
    if (c < p.rows) p.xdbl[(int64_t(b) * p.rows + c) * p.seqlen + l] = acc[i] + (p.w_bias ? p.w_bias[c] : 0.f);
  }
}

// The activation's backward, one block per (channel, batch) row: dx = act'(z) du, dshift = sum of dx
// (fixed-order block sum), and u = act(z) written for the caller's d(x_proj_weight) GEMM.
template <typename T>
__global__ __launch_bounds__(KT::kNThreads) void act_bwd_kernel(ActBwdParams p) {
  __shared__ float red[KT::kNWarps];
  const int d = blockIdx.x, b = blockIdx.y;
  const int64_t row = (int64_t(b) * p.dim + d) * p.seqlen;
  const float shift = shift_of(p, b, d);
  T* dx = static_cast<T*>(p.dx) + row;
  float acc = 0.f;
  for (int l = threadIdx.x; l < p.seqlen; l += KT::kNThreads) {
    const float z = load_x<T>(p, b, d, l) + shift;
    const float g = css_act_grad(z, p.silu) * p.du[row + l];
    dx[l] = static_cast<T>(g);
    p.u[row + l] = css_act(z, p.silu);
    acc += g;
  }
  if (p.dshift == nullptr) return;  // uniform over the block: no thread waits in block_sum alone
  const float s = block_sum(acc, red);
  if (threadIdx.x == 0) p.dshift[int64_t(b) * p.dim + d] = s;
}

}  // namespace

void fwd_cuda(FwdParams& p, at::ScalarType dtype) {
  const dim3 grid(p.dim, p.batch);
  auto stream = c10::cuda::getCurrentCUDAStream();
  MM_DISPATCH_FLOAT_TYPES(dtype, scalar_t, "cross_selective_scan_fwd_cuda: x", [&] {
    fwd_kernel<scalar_t><<<grid, KT::kNThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void proj_cuda(ProjParams& p, at::ScalarType dtype) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  MM_DISPATCH_FLOAT_TYPES(dtype, scalar_t, "cross_selective_scan_proj_cuda: x", [&] {
    proj_kernel<scalar_t><<<ProjTraits::grid(p), ProjTraits::kNThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void act_bwd_cuda(ActBwdParams& p, at::ScalarType dtype) {
  const dim3 grid(p.dim, p.batch);
  auto stream = c10::cuda::getCurrentCUDAStream();
  MM_DISPATCH_FLOAT_TYPES(dtype, scalar_t, "cross_selective_scan_act_bwd_cuda: x", [&] {
    act_bwd_kernel<scalar_t><<<grid, KT::kNThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bwd_cuda(BwdParams& p, at::ScalarType dtype) {
  const dim3 grid(p.dim, p.batch);
  auto stream = c10::cuda::getCurrentCUDAStream();
  MM_DISPATCH_FLOAT_TYPES(dtype, scalar_t, "cross_selective_scan_bwd_cuda: x", [&] {
    bwd_kernel<scalar_t><<<grid, KT::kNThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace css
