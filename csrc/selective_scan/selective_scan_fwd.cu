// selective_scan forward, CUDA. See selective_scan_common.cuh for the block layout.
#include "common/dispatch.h"
#include "selective_scan/selective_scan_common.cuh"

namespace memorymamba {

template <typename Ktraits>
__global__ __launch_bounds__(Ktraits::kNThreads) void selective_scan_fwd_kernel(SSFwdParams p) {
  using input_t = typename Ktraits::input_t;
  constexpr int kNItems = Ktraits::kNItems;
  constexpr int kNThreads = Ktraits::kNThreads;
  __shared__ typename Ktraits::BlockScanT::TempStorage scan_storage;
  __shared__ float running[kSelectiveScanMaxDState];  // state at the end of the previous chunk

  const int64_t d = blockIdx.x, b = blockIdx.y;
  const int64_t L = p.seqlen;
  const int N = static_cast<int>(p.dstate);
  const int64_t g = d / (p.dim / p.n_groups);
  const void* u = static_cast<const input_t*>(p.u_ptr) + b * p.u_batch_stride + d * p.u_dim_stride;
  const void* dl = static_cast<const input_t*>(p.delta_ptr) + b * p.delta_batch_stride +
                   d * p.delta_dim_stride;
  const void* z = p.has_z ? static_cast<const void*>(static_cast<const input_t*>(p.z_ptr) +
                                                     b * p.z_batch_stride + d * p.z_dim_stride)
                          : nullptr;
  const input_t* Bv = static_cast<const input_t*>(p.B_ptr) + b * p.B_batch_stride + g * p.B_group_stride;
  const input_t* Cv = static_cast<const input_t*>(p.C_ptr) + b * p.C_batch_stride + g * p.C_group_stride;
  const float* Bc = static_cast<const float*>(p.B_ptr) + d * p.B_dim_stride;
  const float* Cc = static_cast<const float*>(p.C_ptr) + d * p.C_dim_stride;
  input_t* out = static_cast<input_t*>(p.out_ptr) + b * p.out_batch_stride + d * p.out_dim_stride;
  float* states = p.states_ptr + (b * p.dim + d) * p.n_chunks * N;
  const float D = p.has_D ? p.D_ptr[d * p.D_stride] : 0.f;
  const float bias = p.has_delta_bias ? p.delta_bias_ptr[d * p.delta_bias_stride] : 0.f;

  for (int n = threadIdx.x; n < N; n += kNThreads) running[n] = 0.f;
  __syncthreads();

  for (int64_t c = 0; c < p.n_chunks; ++c) {
    const int64_t t0 = c * Ktraits::kChunk + threadIdx.x * kNItems;
    float u_v[kNItems], delta_v[kNItems], y_v[kNItems];
#pragma unroll
    for (int i = 0; i < kNItems; ++i) {
      const int64_t t = t0 + i;
      const bool valid = t < L;
      u_v[i] = valid ? load_f<input_t>(u, t) : 0.f;
      delta_v[i] = valid ? effective_delta(load_f<input_t>(dl, t), bias, p.delta_softplus) : 0.f;
      y_v[i] = D * u_v[i];
    }
    for (int n = 0; n < N; ++n) {
      const float A = p.A_ptr[d * p.A_dim_stride + n * p.A_dstate_stride];
      const float B_const = p.is_variable_B ? 0.f : Bc[n * p.B_dstate_stride];
      const float C_const = p.is_variable_C ? 0.f : Cc[n * p.C_dstate_stride];
      ScanPair items[kNItems];
      ScanPair agg = scan_identity();
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        const int64_t t = t0 + i;
        if (t < L) {
          const float B = p.is_variable_B ? static_cast<float>(Bv[n * p.B_dstate_stride + t]) : B_const;
          items[i] = discretise(delta_v[i], A, B, u_v[i]);
        } else {
          items[i] = scan_identity();  // padding leaves the state unchanged
        }
        agg = scan_combine(agg, items[i]);
      }
      ScanPair incoming;
      typename Ktraits::BlockScanT(scan_storage)
          .ExclusiveScan(agg, incoming, ScanPair{1.f, running[n]}, ScanCombineOp());
      float x = incoming.b;
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        const int64_t t = t0 + i;
        x = items[i].a * x + items[i].b;
        if (t < L) {
          const float C = p.is_variable_C ? static_cast<float>(Cv[n * p.C_dstate_stride + t]) : C_const;
          y_v[i] += C * x;
        }
      }
      // Every thread has read running[n] before the scan's barriers; the last thread's final
      // state is the chunk-end state (its padded items are identities).
      if (threadIdx.x == kNThreads - 1) {
        running[n] = x;
        states[c * N + n] = x;
      }
      __syncthreads();  // scan_storage is reused by the next n
    }
#pragma unroll
    for (int i = 0; i < kNItems; ++i) {
      const int64_t t = t0 + i;
      if (t < L) {
        float y = y_v[i];
        if (z) y *= silu(load_f<input_t>(z, t));
        out[t] = static_cast<input_t>(y);
      }
    }
  }
}

template <typename input_t>
void selective_scan_fwd_launch(const SSFwdParams& p, cudaStream_t stream) {
  using Ktraits = SSKernelTraits<input_t>;
  const dim3 grid(static_cast<unsigned>(p.dim), static_cast<unsigned>(p.batch));
  selective_scan_fwd_kernel<Ktraits><<<grid, Ktraits::kNThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void selective_scan_fwd_cuda(const SSFwdParams& p, c10::ScalarType dtype, int device) {
  // batch or dim 0 is a valid empty call; a grid dimension of 0 is an invalid launch.
  if (p.batch == 0 || p.dim == 0) return;
  check_grid(p);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  MM_DISPATCH_FLOAT_TYPES(dtype, input_t, "selective_scan_fwd (CUDA): u",
                          [&] { selective_scan_fwd_launch<input_t>(p, stream); });
}

}  // namespace memorymamba
