// Fused memory attention, CUDA forward and backward.
//
// Forward: one block per sample. Warps pool F~'s channel planes (a warp per channel, fixed-order
// lane sums then a shuffle tree), then every enabled network runs in the same block: the MLP rows
// (a warp per row), softmax (one thread: m is a handful of cells), readout + similarity sums (a
// thread per channel, block reduction in fixed order). One launch for pooling and both networks.
// Backward: kernel 1 (one block per sample) recomputes the networks from the saved fp32 p and
// writes dp and the per-sample vectors; kernel 2 (a thread per parameter-gradient element) sums them
// over the batch in order b = 0..B-1. No atomics: results are bitwise reproducible.
//
// Instantiations: forward x 3 F~ dtypes + backward kernel 1 + kernel 2 = 5 kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "common/dispatch.h"
#include "memory_attention/memory_attention.h"

namespace mattn {

struct KernelTraits {
  // 256 threads: 8 warps pool 8 channel planes at a time; a block per sample keeps B blocks resident.
  static constexpr int kNThreads = 256;
  static constexpr int kNWarps = kNThreads / 32;
  static constexpr int kReduceThreads = 256;
  static_assert(kNThreads % 32 == 0 && kNWarps <= 32, "whole warps, at most 32");
};
using KT = KernelTraits;

namespace {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide SimSums reduction in a fixed order; every thread gets the total. red: 3*kNWarps floats.
__device__ SimSums block_sum(SimSums s, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  s = {warp_sum(s.s0), warp_sum(s.s1), warp_sum(s.s2)};
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) {
    red[warp] = s.s0;
    red[KT::kNWarps + warp] = s.s1;
    red[2 * KT::kNWarps + warp] = s.s2;
  }
  __syncthreads();
  SimSums t{0.f, 0.f, 0.f};
  for (int w = 0; w < KT::kNWarps; ++w) t = sim_add(t, {red[w], red[KT::kNWarps + w], red[2 * KT::kNWarps + w]});
  return t;
}

// Shared memory of one block (floats): p, v, gv, dp (D each), pre, hid (Hd), h, a, da (m), red.
struct Smem {
  float *p, *v, *gv, *dp, *pre, *hid, *h, *a, *da, *red;
  __device__ Smem(float* s, int D, int Hd, int m) {
    p = s; v = p + D; gv = v + D; dp = gv + D; pre = dp + D; hid = pre + Hd; h = hid + Hd; a = h + m;
    da = a + m; red = da + m;
  }
};

// The largest hidden width and cell count over the networks: they size the shared scratch.
__host__ __device__ void max_net_sizes(const FwdParams& P, int& Hd, int& m) {
  Hd = 1;
  m = 1;
  for (int k = 0; k < P.n_nets; ++k) {
    Hd = P.net[k].hidden > Hd ? P.net[k].hidden : Hd;
    m = P.net[k].cells > m ? P.net[k].cells : m;
  }
}

size_t smem_bytes(const FwdParams& P) {
  int Hd, m;
  max_net_sizes(P, Hd, m);
  return sizeof(float) * (4 * size_t(P.dim) + 2 * Hd + 3 * m + 3 * KT::kNWarps);
}

// pre, hid, h, a, v of network k for the pooled p in smem; returns beta (sums in s), all threads.
__device__ float net_forward(const FwdParams& P, int k, Smem& sm, SimSums& s) {
  const NetParams& n = P.net[k];
  const int D = P.dim, Hd = n.hidden, m = n.cells;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int j = warp; j < Hd; j += KT::kNWarps) {
    const float* row = n.w1 + int64_t(j) * D;
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) acc += row[d] * sm.p[d];
    acc = warp_sum(acc);
    if (lane == 0) {
      sm.pre[j] = acc + (n.b1 ? n.b1[j] : 0.f);
      sm.hid[j] = gelu(sm.pre[j]);
    }
  }
  __syncthreads();
  for (int i = warp; i < m; i += KT::kNWarps) {
    const float* row = n.w2 + int64_t(i) * Hd;
    float acc = 0.f;
    for (int j = lane; j < Hd; j += 32) acc += row[j] * sm.hid[j];
    acc = warp_sum(acc);
    if (lane == 0) sm.h[i] = acc + (n.b2 ? n.b2[i] : 0.f);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float hmax = -INFINITY, z = 0.f;
    for (int i = 0; i < m; ++i) hmax = fmaxf(hmax, sm.h[i]);
    for (int i = 0; i < m; ++i) z += (sm.a[i] = expf(sm.h[i] - hmax));
    for (int i = 0; i < m; ++i) sm.a[i] /= z;
  }
  __syncthreads();
  s = {0.f, 0.f, 0.f};
  for (int d = threadIdx.x; d < D; d += KT::kNThreads) {
    float acc = 0.f;
    for (int i = 0; i < m; ++i) acc += sm.a[i] * n.memory[int64_t(i) * D + d];
    sm.v[d] = acc;
    sim_accumulate(P.similarity, acc, sm.p[d], s);
  }
  s = block_sum(s, sm.red);  // its barriers also publish v
  return sim_value(P.similarity, s, D);
}

template <typename T>
__global__ void __launch_bounds__(KT::kNThreads) fwd_kernel(const FwdParams P) {
  extern __shared__ float smem_raw[];
  int hd_max, m_max;
  max_net_sizes(P, hd_max, m_max);
  Smem sm(smem_raw, P.dim, hd_max, m_max);
  const int b = blockIdx.x, D = P.dim, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t W = P.width, L = int64_t(P.height) * W;
  const bool flat = P.f_h_stride == W * P.f_w_stride;  // the plane is one strided run
  const T* f = static_cast<const T*>(P.f) + b * P.f_batch_stride;
  for (int d = warp; d < D; d += KT::kNWarps) {
    const T* x = f + d * P.f_dim_stride;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};  // independent loads in flight
    int64_t l = lane;
    if (flat) {
      for (; l + 96 < L; l += 128)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] += static_cast<float>(x[(l + 32 * j) * P.f_w_stride]);
      for (; l < L; l += 32) acc[0] += static_cast<float>(x[l * P.f_w_stride]);
    } else {
      for (; l < L; l += 32) acc[0] += static_cast<float>(x[(l / W) * P.f_h_stride + (l % W) * P.f_w_stride]);
    }
    const float s = warp_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    if (lane == 0) {
      sm.p[d] = s / float(L);
      P.p[int64_t(b) * D + d] = s / float(L);
    }
  }
  __syncthreads();
  for (int k = 0; k < P.n_nets; ++k) {
    const NetParams& n = P.net[k];
    SimSums s;
    const float beta = net_forward(P, k, sm, s);
    T* w = static_cast<T*>(n.w) + int64_t(b) * D;
    T* v = static_cast<T*>(n.v) + int64_t(b) * D;
    for (int d = threadIdx.x; d < D; d += KT::kNThreads) {
      w[d] = static_cast<T>(beta * sm.v[d]);
      v[d] = static_cast<T>(sm.v[d]);
    }
    for (int i = threadIdx.x; i < n.cells; i += KT::kNThreads)
      static_cast<T*>(n.h)[int64_t(b) * n.cells + i] = static_cast<T>(sm.h[i]);
    __syncthreads();  // the next network overwrites pre, hid, h, a, v
  }
}

__global__ void __launch_bounds__(KT::kNThreads) bwd_sample_kernel(const BwdParams P) {
  extern __shared__ float smem_raw[];
  int hd_max, m_max;
  max_net_sizes(P, hd_max, m_max);
  Smem sm(smem_raw, P.dim, hd_max, m_max);
  const int64_t b = blockIdx.x;
  const int D = P.dim, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int d = threadIdx.x; d < D; d += KT::kNThreads) {
    sm.p[d] = P.p[b * D + d];
    sm.dp[d] = P.dp_in ? P.dp_in[b * D + d] : 0.f;
  }
  __syncthreads();
  for (int k = 0; k < P.n_nets; ++k) {
    const NetParams& n = P.net[k];
    const NetGrads& g = P.grad[k];
    const int Hd = n.hidden, m = n.cells;
    SimSums s;
    const float beta = net_forward(P, k, sm, s);
    const float* dw = g.dw ? g.dw + b * D : nullptr;
    const float* dv = g.dv ? g.dv + b * D : nullptr;
    SimSums t{0.f, 0.f, 0.f};
    if (dw)
      for (int d = threadIdx.x; d < D; d += KT::kNThreads) t.s0 += dw[d] * sm.v[d];
    const float dbeta = block_sum(t, sm.red).s0;
    for (int d = threadIdx.x; d < D; d += KT::kNThreads) {
      float sv, sp;
      sim_grad(P.similarity, sm.v[d], sm.p[d], s, beta, D, sv, sp);
      const float gv = (dv ? dv[d] : 0.f) + (dw ? beta * dw[d] : 0.f) + dbeta * sv;
      sm.gv[d] = gv;
      g.g_v[b * D + d] = gv;
      sm.dp[d] += dbeta * sp;
    }
    __syncthreads();
    for (int i = warp; i < m; i += KT::kNWarps) {
      const float* row = n.memory + int64_t(i) * D;
      float acc = 0.f;
      for (int d = lane; d < D; d += 32) acc += row[d] * sm.gv[d];
      acc = warp_sum(acc);
      if (lane == 0) sm.da[i] = acc;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float a_dot_da = 0.f;
      for (int i = 0; i < m; ++i) a_dot_da += sm.a[i] * sm.da[i];
      for (int i = 0; i < m; ++i) {
        sm.h[i] = softmax_grad(sm.a[i], sm.da[i], a_dot_da) + (g.dh ? g.dh[b * m + i] : 0.f);
        g.g_h[b * m + i] = sm.h[i];
        g.a[b * m + i] = sm.a[i];
      }
    }
    __syncthreads();  // sm.h now holds dL/dh
    for (int j = threadIdx.x; j < Hd; j += KT::kNThreads) {
      float acc = 0.f;
      for (int i = 0; i < m; ++i) acc += n.w2[int64_t(i) * Hd + j] * sm.h[i];
      sm.pre[j] = acc * gelu_grad(sm.pre[j]);  // dL/d pre
      g.g_pre[b * Hd + j] = sm.pre[j];
      g.hid[b * Hd + j] = sm.hid[j];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += KT::kNThreads) {
      float acc = 0.f;
      for (int j = 0; j < Hd; ++j) acc += n.w1[int64_t(j) * D + d] * sm.pre[j];
      sm.dp[d] += acc;
    }
    __syncthreads();  // the next network overwrites the scratch
  }
  for (int d = threadIdx.x; d < D; d += KT::kNThreads) P.dp[b * D + d] = sm.dp[d] * P.dp_scale;
}

// One thread per parameter-gradient element of every network (flattened one after the other).
__global__ void __launch_bounds__(KT::kReduceThreads) bwd_reduce_kernel(const BwdParams P, int64_t count0,
                                                                        int64_t total) {
  const int64_t e = int64_t(blockIdx.x) * KT::kReduceThreads + threadIdx.x;
  if (e >= total) return;
  if (e < count0) reduce_param_element(P, 0, e);
  else reduce_param_element(P, 1, e - count0);
}

void set_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  // Above the opt-in maximum (227 KB on H100) cudaFuncSetAttribute fails with a bare "invalid
  // argument"; say which sizes ask for the shared scratch instead.
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  MM_CHECK(bytes <= size_t(optin), "memory_attention (CUDA): the per-sample scratch (4*dim + 2*hidden + 3*cells floats) "
           "needs ", bytes, " bytes of shared memory, over this GPU's ", optin, " per block");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace

void fwd_cuda(const FwdParams& P, at::ScalarType dtype) {
  const size_t smem = smem_bytes(P);
  auto stream = c10::cuda::getCurrentCUDAStream();
  MM_DISPATCH_FLOAT_TYPES(dtype, scalar_t, "memory_attention_fwd_cuda: f_tilde", [&] {
    set_smem(reinterpret_cast<const void*>(fwd_kernel<scalar_t>), smem);
    fwd_kernel<scalar_t><<<P.batch, KT::kNThreads, smem, stream>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bwd_cuda(const BwdParams& P) {
  const size_t smem = smem_bytes(P);
  auto stream = c10::cuda::getCurrentCUDAStream();
  set_smem(reinterpret_cast<const void*>(bwd_sample_kernel), smem);
  bwd_sample_kernel<<<P.batch, KT::kNThreads, smem, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t count0 = P.n_nets > 0 ? net_param_count(P.net[0], P.dim) : 0;
  const int64_t total = count0 + (P.n_nets > 1 ? net_param_count(P.net[1], P.dim) : 0);
  if (total == 0) return;
  const int64_t blocks = (total + KT::kReduceThreads - 1) / KT::kReduceThreads;
  bwd_reduce_kernel<<<unsigned(blocks), KT::kReduceThreads, 0, stream>>>(P, count0, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mattn
