// Fused cross-direction selective scan, CUDA forward and backward.
//
// A block runs kChannels channels of one batch row, one warp per channel, through the four
// directions in turn. A direction's sequence is cut into segments of kSegment = 32 * kNItems time
// steps; lane i owns kNItems consecutive steps. Per segment the block first stages the x_dbl rows at
// the segment's positions in shared memory: every channel of the block reads the same rows, so the
// direction's scattered gathers (a column walk for directions 1 and 3) are paid once per block, not
// once per channel. Each warp then scans its channel: a lane folds its steps into one affine map
// (css_combine), a shuffle scan across the warp gives every lane its starting state, and the last
// lane carries the state into the next segment. No block barrier sits inside a scan; delta is made
// in registers from the staged rank-R rows.
// The merged y (and, in backward, du) is accumulated in an fp32 row owned by the channel's warp,
// plain read-add-write in direction order 0..3 (the segment barriers order the directions).
//
// Backward recomputes everything: pass 1 stores each segment's starting states (seg_states), then
// pass 2 runs the segments in reverse with a forward warp scan (states h) and a reverse one (state
// grads). d(x_dbl) sums over channels: the block sums its warps' terms in shared memory in a fixed
// order, the dt part as dt_w^T ddt from ddt staged there, and adds one value per block with an fp32
// atomic, or (deterministic mode) writes one partial row per channel group that the caller sums.
// Parameter grads: per-(b, k, d) warp reductions in a fixed order, written as partials.
//
// u = act(x + shift) (ActParams) is made from x wherever a kernel loads it: the scans, the x_proj
// GEMM (proj_kernel) and the activation's backward (act_bwd_kernel); the silu flag and the shift
// pointer are runtime values, uniform over the grid, so they cost no instantiations.
// Instantiations: (forward, backward, proj, act_bwd) x 3 input dtypes = 12 kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "cross_selective_scan/cross_selective_scan.h"
#include "common/dispatch.h"

namespace css {

struct KernelTraits {
  static constexpr int kChannels = 8;                // warps per block, one channel each
  static constexpr int kNThreads = 32 * kChannels;
  static constexpr int kNItems = 8;                  // consecutive steps per lane
  static constexpr int kSegment = 32 * kNItems;
  // Staged rows hold step j of lane i at j * kSlotStride + i: a warp's reads of one j hit 32 banks.
  static constexpr int kSlotStride = 33;
  static constexpr int kSlots = kNItems * kSlotStride;
  static_assert(kSegment == kNThreads, "staging and the d(x_dbl) sums give each thread one position");
};

int cuda_segment_len() { return KernelTraits::kSegment; }
int cuda_block_channels() { return KernelTraits::kChannels; }

namespace {

using KT = KernelTraits;

__device__ __forceinline__ int slot_of(int i) { return (i % KT::kNItems) * KT::kSlotStride + i / KT::kNItems; }

// Shared memory of the scan kernels, in floats: staged x_dbl rows (C x kSlots), in backward the
// per-warp terms summed over channels (2 x kChannels x kSlots), and per-warp parameters and carries.
struct Smem {
  int xs, red, w, A, carry, acc_w, acc_A, total;
  __host__ __device__ Smem(int R, int N, bool bwd) {
    const int C = R + 2 * N;
    xs = 0;
    red = xs + C * KT::kSlots;
    w = red + (bwd ? 2 * KT::kChannels * KT::kSlots : 0);
    A = w + KT::kChannels * R;
    carry = A + KT::kChannels * N;
    acc_w = carry + KT::kChannels * N;
    acc_A = acc_w + (bwd ? KT::kChannels * R : 0);
    total = acc_A + (bwd ? KT::kChannels * N : 0);
  }
};

// Exclusive scan of affine maps over a warp's lanes in lane order (kReverse: from lane 31 down):
// the composition of the maps of the lanes before this one (identity for the first).
template <bool kReverse>
__device__ Affine warp_exclusive_scan(Affine v) {
  const int lane = threadIdx.x % 32;
  Affine inc = v;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float pa = kReverse ? __shfl_down_sync(0xffffffffu, inc.a, off) : __shfl_up_sync(0xffffffffu, inc.a, off);
    const float pb = kReverse ? __shfl_down_sync(0xffffffffu, inc.b, off) : __shfl_up_sync(0xffffffffu, inc.b, off);
    if (kReverse ? (lane + off < 32) : (lane >= off)) inc = css_combine({pa, pb}, inc);
  }
  const float ea = kReverse ? __shfl_down_sync(0xffffffffu, inc.a, 1) : __shfl_up_sync(0xffffffffu, inc.a, 1);
  const float eb = kReverse ? __shfl_down_sync(0xffffffffu, inc.b, 1) : __shfl_up_sync(0xffffffffu, inc.b, 1);
  return (lane == (kReverse ? 31 : 0)) ? Affine{1.f, 0.f} : Affine{ea, eb};
}

// Fixed-order warp sum (deterministic); result valid in every lane.
__device__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ float shift_of(const ActParams& p, int b, int d) {
  return p.shift ? p.shift[int64_t(b) * p.dim + d] : 0.f;
}

// x at (h, w) of the (b, d) row, as fp32 (any strides).
template <typename T>
__device__ float load_x(const ActParams& p, int b, int d, int h, int w) {
  const T* x = static_cast<const T*>(p.x);
  return static_cast<float>(x[b * p.x_batch_stride + d * p.x_dim_stride + h * p.x_h_stride + w * p.x_w_stride]);
}

// (h, w) of direction k's step t, advanced one step at a time (no division per step).
struct Walk {
  int h, w;
  __device__ Walk(int k, int t, int H, int W) {
    const int l = int(css_spatial_index(k, t, H, W));
    h = l / W;
    w = l - h * W;
  }
  __device__ void next(int k, int H, int W) {
    if (k == 0) { if (++w == W) { w = 0; ++h; } }
    else if (k == 1) { if (++h == H) { h = 0; ++w; } }
    else if (k == 2) { if (--w < 0) { w = W - 1; --h; } }
    else { if (--h < 0) { h = H - 1; --w; } }
  }
};

// Rows [0, rows) of direction k's x_dbl at the segment's positions into xs (0 past the end); returns
// the spatial index of this thread's position (-1 past the end).
__device__ int stage_rows(const FwdParams& p, int k, int t0, const float* xd, int rows, float* xs) {
  const int t = t0 + threadIdx.x, L = p.seqlen;
  const int l = t < L ? int(css_spatial_index(k, t, p.height, p.width)) : -1;
  const int slot = slot_of(threadIdx.x);
  for (int c = 0; c < rows; ++c) xs[c * KT::kSlots + slot] = l >= 0 ? xd[int64_t(c) * L + l] : 0.f;
  return l;
}

// Direction k's parameters of the warp's channel into its smem slices; zeroes its state carries.
__device__ void load_channel(const FwdParams& p, int k, int d, float* w, float* A, float* carry) {
  const int lane = threadIdx.x % 32;
  const int64_t kd = int64_t(k) * p.dim + d;
  __syncwarp();  // the last direction's reads (and lane 31's carry write) are done
  for (int i = lane; i < p.dt_rank; i += 32) w[i] = p.dt_w[kd * p.dt_rank + i];
  for (int i = lane; i < p.dstate; i += 32) {
    A[i] = -expf(p.A_logs[kd * p.dstate + i]);
    carry[i] = 0.f;
  }
  __syncwarp();
}

// Per-step inputs of the lane's kNItems steps of a segment: spatial index (-1 past the end), u,
// delta and the softplus slope d delta / d dt_raw.
struct LaneSteps {
  int l[KT::kNItems];
  float u[KT::kNItems], delta[KT::kNItems], slope[KT::kNItems];
};

template <typename T>
__device__ void load_lane_steps(const FwdParams& p, int b, int d, int k, int t0, float bias, float shift,
                                const float* w, const float* xs, LaneSteps& s) {
  const int lane = threadIdx.x % 32, R = p.dt_rank;
  const int first = t0 + lane * KT::kNItems;
  Walk pos(k, first < p.seqlen ? first : 0, p.height, p.width);
#pragma unroll
  for (int j = 0; j < KT::kNItems; ++j) {
    const int slot = j * KT::kSlotStride + lane;
    if (first + j < p.seqlen) {
      s.l[j] = pos.h * p.width + pos.w;
      s.u[j] = css_act(load_x<T>(p, b, d, pos.h, pos.w) + shift, p.silu);
      float dt = bias;
      for (int r = 0; r < R; ++r) dt += w[r] * xs[r * KT::kSlots + slot];
      s.delta[j] = css_delta(dt, p.delta_softplus, s.slope[j]);
    } else {
      s.l[j] = -1; s.u[j] = 0.f; s.delta[j] = 0.f; s.slope[j] = 0.f;
    }
    pos.next(k, p.height, p.width);
  }
}

// One state n over the lane's steps: the steps' affine maps (identity past the end) and the state
// entering the lane's first step, from the state entering the segment (`carry`).
__device__ float lane_states_in(const LaneSteps& s, float A, const float* Bs, float carry, Affine (&step)[KT::kNItems]) {
  const int lane = threadIdx.x % 32;
  Affine agg{1.f, 0.f};
#pragma unroll
  for (int j = 0; j < KT::kNItems; ++j) {
    step[j] = s.l[j] >= 0 ? Affine{css_decay(s.delta[j], A), css_input(s.delta[j], Bs[j * KT::kSlotStride + lane], s.u[j])}
                          : Affine{1.f, 0.f};
    agg = css_combine(agg, step[j]);
  }
  const Affine before = warp_exclusive_scan<false>(agg);
  return before.a * carry + before.b;
}

template <typename T>
__global__ __launch_bounds__(KT::kNThreads) void fwd_kernel(FwdParams p) {
  extern __shared__ float smem[];
  const int R = p.dt_rank, N = p.dstate, C = R + 2 * N, L = p.seqlen;
  const Smem m(R, N, false);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.y, d = blockIdx.x * KT::kChannels + warp;
  const bool active = d < p.dim;  // warp-uniform; idle warps still join the block barriers
  float *xs = smem + m.xs, *w = smem + m.w + warp * R, *A = smem + m.A + warp * N;
  float* carry = smem + m.carry + warp * N;
  const float shift = active ? shift_of(p, b, d) : 0.f;
  float* y = static_cast<float*>(p.y) + (int64_t(b) * p.dim + d) * L;
  for (int k = 0; k < kDirections; ++k) {
    const int64_t kd = int64_t(k) * p.dim + d;
    float bias = 0.f, Dk = 0.f;
    if (active) {
      load_channel(p, k, d, w, A, carry);
      bias = p.dt_b[kd];
      Dk = p.Ds[kd];
    }
    const float* xd = p.xdbl + (int64_t(b) * kDirections + k) * C * L;
    for (int t0 = 0; t0 < L; t0 += KT::kSegment) {
      __syncthreads();  // the last segment's reads of xs are done (and its y writes visible)
      stage_rows(p, k, t0, xd, C, xs);
      __syncthreads();
      if (!active) continue;
      LaneSteps s;
      load_lane_steps<T>(p, b, d, k, t0, bias, shift, w, xs, s);
      float yv[KT::kNItems];
#pragma unroll
      for (int j = 0; j < KT::kNItems; ++j) yv[j] = Dk * s.u[j];
      for (int n = 0; n < N; ++n) {
        const float* Cs = xs + (R + N + n) * KT::kSlots;
        Affine step[KT::kNItems];
        float h = lane_states_in(s, A[n], xs + (R + n) * KT::kSlots, carry[n], step);
#pragma unroll
        for (int j = 0; j < KT::kNItems; ++j) {
          h = step[j].a * h + step[j].b;
          yv[j] += Cs[j * KT::kSlotStride + lane] * h;
        }
        __syncwarp();  // every lane has read carry[n]
        if (lane == 31) carry[n] = h;  // the state after the segment's last step
      }
#pragma unroll
      for (int j = 0; j < KT::kNItems; ++j)
        if (s.l[j] >= 0) y[s.l[j]] = k == 0 ? yv[j] : y[s.l[j]] + yv[j];
    }
  }
}

template <typename T>
__global__ __launch_bounds__(KT::kNThreads, 2) void bwd_kernel(BwdParams p) {  // 2 blocks per SM: <= 128 registers
  extern __shared__ float smem[];
  const int R = p.dt_rank, N = p.dstate, C = R + 2 * N, L = p.seqlen;
  const int nseg = (L + KT::kSegment - 1) / KT::kSegment;
  const Smem m(R, N, true);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int grp = blockIdx.x, b = blockIdx.y, d = grp * KT::kChannels + warp;
  const int n_active = min(KT::kChannels, p.dim - grp * KT::kChannels);
  const bool active = warp < n_active;  // warp-uniform; idle warps still join the block barriers
  float *xs = smem + m.xs, *red = smem + m.red, *w_all = smem + m.w;
  float *w = w_all + warp * R, *A = smem + m.A + warp * N, *carry = smem + m.carry + warp * N;
  float *acc_w = smem + m.acc_w + warp * R, *acc_A = smem + m.acc_A + warp * N;
  float* my_red_b = red + warp * KT::kSlots;                      // this warp's dB terms
  float* my_red_c = red + (KT::kChannels + warp) * KT::kSlots;    // ... and dC terms (ddt reuses dB's)
  const float shift = active ? shift_of(p, b, d) : 0.f;
  const int64_t row = (int64_t(b) * p.dim + d) * L;
  for (int k = 0; k < kDirections; ++k) {
    const int64_t kd = int64_t(k) * p.dim + d;
    const int64_t part = (int64_t(b) * kDirections + k) * p.dim + d;
    float bias = 0.f, Dk = 0.f;
    float* states = p.seg_states + ((int64_t(b) * p.dim + d) * kDirections + k) * int64_t(nseg) * N;
    __syncthreads();  // the last direction's d(x_dbl) sums have read every warp's dt weights
    if (active) {
      load_channel(p, k, d, w, A, carry);
      bias = p.dt_b[kd];
      Dk = p.Ds[kd];
    }
    const float* xd = p.xdbl + (int64_t(b) * kDirections + k) * C * L;
    // Out: an atomic sum into (B, K, C, L), or this group's partial rows of (B, K, G, C, L).
    const int64_t groups = gridDim.x;
    float* dxd = p.dxdbl_part ? p.dxdbl_part + ((int64_t(b) * kDirections + k) * groups + grp) * C * L
                              : p.dxdbl + (int64_t(b) * kDirections + k) * C * L;

    // Pass 1: the state entering every segment.
    for (int seg = 0; seg < nseg; ++seg) {
      __syncthreads();
      stage_rows(p, k, seg * KT::kSegment, xd, R + N, xs);
      __syncthreads();
      if (!active) continue;
      LaneSteps s;
      load_lane_steps<T>(p, b, d, k, seg * KT::kSegment, bias, shift, w, xs, s);
      for (int n = 0; n < N; ++n) {
        Affine step[KT::kNItems];
        const float c = carry[n];
        float h = lane_states_in(s, A[n], xs + (R + n) * KT::kSlots, c, step);
#pragma unroll
        for (int j = 0; j < KT::kNItems; ++j) h = step[j].a * h + step[j].b;
        __syncwarp();  // every lane has read carry[n]
        if (lane == 0) states[int64_t(seg) * N + n] = c;
        if (lane == 31) carry[n] = h;
      }
    }
    // Pass 2 keeps the reverse carries (the gradient reaching the state before a segment) in `carry`.
    if (active) {
      __syncwarp();  // lane 31's last carry write of pass 1 is done
      for (int i = lane; i < N; i += 32) { carry[i] = 0.f; acc_A[i] = 0.f; }
      for (int i = lane; i < R; i += 32) acc_w[i] = 0.f;
    }
    float acc_b = 0.f, acc_D = 0.f;  // per lane; reduced at the end
    for (int seg = nseg - 1; seg >= 0; --seg) {
      const int t0 = seg * KT::kSegment;
      __syncthreads();  // the last segment's reads of xs and red are done
      const int my_l = stage_rows(p, k, t0, xd, C, xs);
      __syncthreads();
      LaneSteps s;
      float g[KT::kNItems], du[KT::kNItems], ddelta[KT::kNItems];
      if (active) {
        load_lane_steps<T>(p, b, d, k, t0, bias, shift, w, xs, s);
#pragma unroll
        for (int j = 0; j < KT::kNItems; ++j) {
          g[j] = s.l[j] >= 0 ? p.dy[row + s.l[j]] : 0.f;
          du[j] = g[j] * Dk;
          ddelta[j] = 0.f;
          acc_D += g[j] * s.u[j];
        }
      }
      for (int n = 0; n < N; ++n) {
        if (active) {
          const float* Bs = xs + (R + n) * KT::kSlots;
          const float* Cs = xs + (R + N + n) * KT::kSlots;
          Affine step[KT::kNItems];
          float h[KT::kNItems];
          const float h_in = lane_states_in(s, A[n], Bs, states[int64_t(seg) * N + n], step);
          float hh = h_in;
#pragma unroll
          for (int j = 0; j < KT::kNItems; ++j) {
            hh = step[j].a * hh + step[j].b;
            h[j] = hh;
          }
          // Reverse: e_t = a_t (c_t + e_{t+1}) with c_t = C_t g_t (0 past the end: staged C is 0) is the
          // gradient reaching h_{t-1} through step t.
          Affine ragg{1.f, 0.f};
#pragma unroll
          for (int j = KT::kNItems - 1; j >= 0; --j)
            ragg = css_combine(ragg, {step[j].a, step[j].a * Cs[j * KT::kSlotStride + lane] * g[j]});
          const Affine after = warp_exclusive_scan<true>(ragg);
          const float e_in = carry[n];
          float e = after.a * e_in + after.b, dA = 0.f;
#pragma unroll
          for (int j = KT::kNItems - 1; j >= 0; --j) {
            const float dh = Cs[j * KT::kSlotStride + lane] * g[j] + e;
            e = step[j].a * dh;
            const int slot = j * KT::kSlotStride + lane;
            float dB = 0.f, dC = 0.f;
            if (s.l[j] >= 0) {
              const float h_prev = j > 0 ? h[j - 1] : h_in;
              dB = css_step_bwd(dh, h_prev, step[j].a, s.delta[j], A[n], Bs[slot], s.u[j], ddelta[j], du[j], dA);
              dC = g[j] * h[j];
            }
            my_red_b[slot] = dB;
            my_red_c[slot] = dC;
          }
          dA = warp_sum(dA);
          __syncwarp();  // every lane has read carry[n]
          if (lane == 0) {
            carry[n] = e;
            acc_A[n] += dA;
          }
        }
        __syncthreads();
        if (my_l >= 0) {  // dB and dC summed over the block's channels in warp order
          const int slot = slot_of(threadIdx.x);
          float sb = 0.f, sc = 0.f;
          for (int v = 0; v < n_active; ++v) {
            sb += red[v * KT::kSlots + slot];
            sc += red[(KT::kChannels + v) * KT::kSlots + slot];
          }
          float* ob = dxd + int64_t(R + n) * L + my_l;
          float* oc = dxd + int64_t(R + N + n) * L + my_l;
          if (p.dxdbl_part) { *ob = sb; *oc = sc; } else { atomicAdd(ob, sb); atomicAdd(oc, sc); }
        }
        __syncthreads();  // red is rewritten next
      }
      if (active) {
        float* du_row = p.du + row;
#pragma unroll
        for (int j = 0; j < KT::kNItems; ++j) {
          const float ddt = ddelta[j] * s.slope[j];  // 0 past the end
          acc_b += ddt;
          my_red_b[j * KT::kSlotStride + lane] = ddt;
          if (s.l[j] >= 0) du_row[s.l[j]] = k == 0 ? du[j] : du_row[s.l[j]] + du[j];
        }
        for (int r = 0; r < R; ++r) {  // d dt_w = sum_t ddt_t dts_t, one warp sum per row and segment
          float v = 0.f;
#pragma unroll
          for (int j = 0; j < KT::kNItems; ++j) v += my_red_b[j * KT::kSlotStride + lane] * xs[r * KT::kSlots + j * KT::kSlotStride + lane];
          v = warp_sum(v);
          if (lane == 0) acc_w[r] += v;
        }
      }
      __syncthreads();
      if (my_l >= 0) {  // d dts = dt_w^T ddt over the block's channels, in warp order
        const int slot = slot_of(threadIdx.x);
        for (int r = 0; r < R; ++r) {
          float v = 0.f;
          for (int c = 0; c < n_active; ++c) v += w_all[c * R + r] * red[c * KT::kSlots + slot];
          float* o = dxd + int64_t(r) * L + my_l;
          if (p.dxdbl_part) *o = v; else atomicAdd(o, v);
        }
      }
    }
    if (active) {
      acc_b = warp_sum(acc_b);
      acc_D = warp_sum(acc_D);
      __syncwarp();
      for (int i = lane; i < R; i += 32) p.ddt_w_part[part * R + i] = acc_w[i];
      for (int i = lane; i < N; i += 32) p.dA_logs_part[part * N + i] = acc_A[i] * A[i];
      if (lane == 0) {
        p.ddt_b_part[part] = acc_b;
        p.dDs_part[part] = acc_D;
      }
    }
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
struct ActTraits {
  static constexpr int kNThreads = 128;
  static constexpr int kNWarps = kNThreads / 32;
};

template <typename T>
__global__ __launch_bounds__(ActTraits::kNThreads) void act_bwd_kernel(ActBwdParams p) {
  __shared__ float red[ActTraits::kNWarps];
  const int d = blockIdx.x, b = blockIdx.y;
  const int64_t row = (int64_t(b) * p.dim + d) * p.seqlen;
  const float shift = shift_of(p, b, d);
  T* dx = static_cast<T*>(p.dx) + row;
  float acc = 0.f;
  for (int l = threadIdx.x; l < p.seqlen; l += ActTraits::kNThreads) {
    const int h = l / p.width;
    const float z = load_x<T>(p, b, d, h, l - h * p.width) + shift;
    const float g = css_act_grad(z, p.silu) * p.du[row + l];
    dx[l] = static_cast<T>(g);
    p.u[row + l] = css_act(z, p.silu);
    acc += g;
  }
  if (p.dshift == nullptr) return;  // uniform over the block: no thread waits at the barrier alone
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int v = 0; v < ActTraits::kNWarps; ++v) s += red[v];
    p.dshift[int64_t(b) * p.dim + d] = s;
  }
}

// Dynamic shared memory of a scan kernel, opting in above the 48 KB default (large dt_rank/d_state).
template <typename Kernel>
size_t scan_smem_bytes(Kernel kernel, int R, int N, bool bwd) {
  const size_t bytes = size_t(Smem(R, N, bwd).total) * sizeof(float);
  if (bytes > 48 * 1024) {
    int dev = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    MM_CHECK(bytes <= size_t(optin), "cross_selective_scan: dt_rank ", R, " and d_state ", N, " need ", bytes,
             " bytes of shared memory per block, more than this GPU's ", optin);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  }
  return bytes;
}

dim3 scan_grid(const FwdParams& p) {
  MM_CHECK(p.batch <= 65535, "cross_selective_scan: batch must be <= 65535 on CUDA, got ", p.batch);
  return dim3((p.dim + KT::kChannels - 1) / KT::kChannels, p.batch);
}

}  // namespace

void fwd_cuda(FwdParams& p, at::ScalarType dtype) {
  if (p.batch == 0 || p.dim == 0) return;
  const dim3 grid = scan_grid(p);
  auto stream = c10::cuda::getCurrentCUDAStream();
  MM_DISPATCH_FLOAT_TYPES(dtype, scalar_t, "cross_selective_scan_fwd_cuda: x", [&] {
    const size_t smem = scan_smem_bytes(fwd_kernel<scalar_t>, p.dt_rank, p.dstate, false);
    fwd_kernel<scalar_t><<<grid, KT::kNThreads, smem, stream>>>(p);
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
    act_bwd_kernel<scalar_t><<<grid, ActTraits::kNThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bwd_cuda(BwdParams& p, at::ScalarType dtype) {
  if (p.batch == 0 || p.dim == 0) return;
  const dim3 grid = scan_grid(p);
  auto stream = c10::cuda::getCurrentCUDAStream();
  MM_DISPATCH_FLOAT_TYPES(dtype, scalar_t, "cross_selective_scan_bwd_cuda: x", [&] {
    const size_t smem = scan_smem_bytes(bwd_kernel<scalar_t>, p.dt_rank, p.dstate, true);
    bwd_kernel<scalar_t><<<grid, KT::kNThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace css
