// selective_scan backward, CUDA. See selective_scan_common.cuh for the block layout.
//
// Chunks are walked right to left. Each chunk's states are recomputed from the chunk-start
// state the forward saved; the state gradient g_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1} runs
// as the same block scan on reversed thread order. Weight grads: per-thread fp32 partials,
// block-reduced per chunk into shared memory, one atomicAdd per block at the end; variable
// dB/dC use fp32 atomicAdd (channels of a group share them).
#include "common/dispatch.h"
#include "selective_scan/selective_scan_common.cuh"

namespace memorymamba {

// Per-(n, chunk) weight-grad partials reduced in one pass: dA, constant dB, constant dC.
struct WeightGrads {
  float dA, dB, dC;
};

struct WeightGradsSum {
  __device__ __forceinline__ WeightGrads operator()(const WeightGrads& x, const WeightGrads& y) const {
    return WeightGrads{x.dA + y.dA, x.dB + y.dB, x.dC + y.dC};
  }
};

template <typename Ktraits>
__global__ __launch_bounds__(Ktraits::kNThreads) void selective_scan_bwd_kernel(SSBwdParams p) {
  using input_t = typename Ktraits::input_t;
  constexpr int kNItems = Ktraits::kNItems;
  constexpr int kNThreads = Ktraits::kNThreads;
  using BlockReduceW = cub::BlockReduce<WeightGrads, kNThreads>;
  using BlockReduceF = cub::BlockReduce<float, kNThreads>;
  __shared__ typename Ktraits::BlockScanT::TempStorage scan_storage;
  __shared__ typename BlockReduceW::TempStorage reduce_storage;
  __shared__ typename BlockReduceF::TempStorage reduce_f_storage;
  __shared__ float carry[kSelectiveScanMaxDState];  // exp(delta_{t1} A) * g_{t1}, t1 = next chunk start
  __shared__ WeightGrads w_sum[kSelectiveScanMaxDState];
  __shared__ float first_decay[kNThreads];           // exp(delta A) of each thread's first item
  __shared__ ScanPair rev_in[kNThreads], rev_out[kNThreads];

  const int64_t d = blockIdx.x, b = blockIdx.y;
  const int64_t L = p.seqlen;
  const int N = static_cast<int>(p.dstate);
  const int64_t g = d / (p.dim / p.n_groups);
  const int tid = threadIdx.x;
  const void* u = static_cast<const input_t*>(p.u_ptr) + b * p.u_batch_stride + d * p.u_dim_stride;
  const void* dl = static_cast<const input_t*>(p.delta_ptr) + b * p.delta_batch_stride +
                   d * p.delta_dim_stride;
  const void* z = p.has_z ? static_cast<const void*>(static_cast<const input_t*>(p.z_ptr) +
                                                     b * p.z_batch_stride + d * p.z_dim_stride)
                          : nullptr;
  const void* dout = static_cast<const input_t*>(p.dout_ptr) + b * p.dout_batch_stride +
                     d * p.dout_dim_stride;
  const input_t* Bv = static_cast<const input_t*>(p.B_ptr) + b * p.B_batch_stride + g * p.B_group_stride;
  const input_t* Cv = static_cast<const input_t*>(p.C_ptr) + b * p.C_batch_stride + g * p.C_group_stride;
  const float* Bc = static_cast<const float*>(p.B_ptr) + d * p.B_dim_stride;
  const float* Cc = static_cast<const float*>(p.C_ptr) + d * p.C_dim_stride;
  float* dBv = p.dB_ptr + (b * p.n_groups + g) * N * L;  // variable: (batch, G, N, L) contiguous
  float* dCv = p.dC_ptr + (b * p.n_groups + g) * N * L;
  input_t* du = static_cast<input_t*>(p.du_ptr) + b * p.du_batch_stride + d * p.du_dim_stride;
  input_t* ddelta = static_cast<input_t*>(p.ddelta_ptr) + b * p.ddelta_batch_stride +
                    d * p.ddelta_dim_stride;
  input_t* dz = p.has_z ? static_cast<input_t*>(p.dz_ptr) + b * p.dz_batch_stride + d * p.dz_dim_stride
                        : nullptr;
  const float* states = p.states_ptr + (b * p.dim + d) * p.n_chunks * N;
  const float D = p.has_D ? p.D_ptr[d * p.D_stride] : 0.f;
  const float bias = p.has_delta_bias ? p.delta_bias_ptr[d * p.delta_bias_stride] : 0.f;

  for (int n = tid; n < N; n += kNThreads) {
    carry[n] = 0.f;
    w_sum[n] = WeightGrads{0.f, 0.f, 0.f};
  }
  float dD_acc = 0.f, dbias_acc = 0.f;
  __syncthreads();

  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * Ktraits::kChunk + tid * kNItems;
    float u_v[kNItems], delta_v[kNItems], dy_v[kNItems], du_v[kNItems], dd_v[kNItems];
#pragma unroll
    for (int i = 0; i < kNItems; ++i) {
      const int64_t t = t0 + i;
      const bool valid = t < L;
      u_v[i] = valid ? load_f<input_t>(u, t) : 0.f;
      delta_v[i] = valid ? effective_delta(load_f<input_t>(dl, t), bias, p.delta_softplus) : 0.f;
      dy_v[i] = valid ? load_f<input_t>(dout, t) : 0.f;
      du_v[i] = 0.f;
      dd_v[i] = 0.f;
    }

    // Pass over n: recompute x_t (and, first, the pre-gate y when z gates the output), then the
    // reverse scan of g_t and the per-element gradients.
    for (int pass = z ? 0 : 1; pass < 2; ++pass) {
      float y_v[kNItems];
#pragma unroll
      for (int i = 0; i < kNItems; ++i) y_v[i] = D * u_v[i];
      for (int n = 0; n < N; ++n) {
        const float A = p.A_ptr[d * p.A_dim_stride + n * p.A_dstate_stride];
        const float B_const = p.is_variable_B ? 0.f : Bc[n * p.B_dstate_stride];
        const float C_const = p.is_variable_C ? 0.f : Cc[n * p.C_dstate_stride];
        const float x_start = c > 0 ? states[(c - 1) * N + n] : 0.f;
        float B_v[kNItems], C_v[kNItems];
        ScanPair items[kNItems];
        ScanPair agg = scan_identity();
#pragma unroll
        for (int i = 0; i < kNItems; ++i) {
          const int64_t t = t0 + i;
          const bool valid = t < L;
          B_v[i] = p.is_variable_B ? (valid ? static_cast<float>(Bv[n * p.B_dstate_stride + t]) : 0.f) : B_const;
          C_v[i] = p.is_variable_C ? (valid ? static_cast<float>(Cv[n * p.C_dstate_stride + t]) : 0.f) : C_const;
          items[i] = valid ? discretise(delta_v[i], A, B_v[i], u_v[i]) : scan_identity();
          agg = scan_combine(agg, items[i]);
        }
        ScanPair incoming;
        typename Ktraits::BlockScanT(scan_storage)
            .ExclusiveScan(agg, incoming, ScanPair{1.f, x_start}, ScanCombineOp());
        float x_prev[kNItems], x_cur[kNItems];
        float x = incoming.b;
#pragma unroll
        for (int i = 0; i < kNItems; ++i) {
          x_prev[i] = x;
          x = items[i].a * x + items[i].b;
          x_cur[i] = x;
        }
        if (pass == 0) {
#pragma unroll
          for (int i = 0; i < kNItems; ++i) y_v[i] += C_v[i] * x_cur[i];
          __syncthreads();  // scan_storage reuse
          continue;
        }

        // Reverse scan: element t maps g_{t+1} -> g_t = a'_t g_{t+1} + dy_t C_t with
        // a'_t = exp(delta_{t+1} A) inside the chunk; the chunk's last element takes a' = 1 and
        // the carry from the chunk to its right as the scan's seed.
        first_decay[tid] = items[0].a;
        const float seed = carry[n];
        __syncthreads();
        const float next_decay = tid + 1 < kNThreads ? first_decay[tid + 1] : 1.f;
        ScanPair rev[kNItems];
        ScanPair ragg = scan_identity();
#pragma unroll
        for (int i = kNItems - 1; i >= 0; --i) {
          rev[i] = ScanPair{i + 1 < kNItems ? items[i + 1].a : next_decay, dy_v[i] * C_v[i]};
          ragg = scan_combine(ragg, rev[i]);
        }
        rev_in[kNThreads - 1 - tid] = ragg;
        __syncthreads();
        ScanPair rincoming;
        typename Ktraits::BlockScanT(scan_storage)
            .ExclusiveScan(rev_in[tid], rincoming, ScanPair{1.f, seed}, ScanCombineOp());
        rev_out[tid] = rincoming;
        __syncthreads();
        float gstate = rev_out[kNThreads - 1 - tid].b;
        WeightGrads w{0.f, 0.f, 0.f};
#pragma unroll
        for (int i = kNItems - 1; i >= 0; --i) {
          gstate = rev[i].a * gstate + rev[i].b;
          const int64_t t = t0 + i;
          if (t < L) {
            const StepGrad sg = step_grad(gstate, x_prev[i], items[i].a, delta_v[i], A, B_v[i], u_v[i]);
            w.dA += sg.dA;
            dd_v[i] += sg.ddelta;
            du_v[i] += sg.du;
            const float dC = dy_v[i] * x_cur[i];
            if (p.is_variable_B) atomicAdd(dBv + n * L + t, sg.dB); else w.dB += sg.dB;
            if (p.is_variable_C) atomicAdd(dCv + n * L + t, dC); else w.dC += dC;
          }
        }
        if (tid == 0) carry[n] = items[0].a * gstate;  // read as next chunk's seed after barriers
        const WeightGrads wsum = BlockReduceW(reduce_storage).Reduce(w, WeightGradsSum());
        if (tid == 0) {
          w_sum[n].dA += wsum.dA;
          w_sum[n].dB += wsum.dB;
          w_sum[n].dC += wsum.dC;
        }
        __syncthreads();  // scan/reduce storage and first_decay reuse
      }
      if (pass == 0) {
#pragma unroll
        for (int i = 0; i < kNItems; ++i) {
          const int64_t t = t0 + i;
          if (t < L) {
            const float zt = load_f<input_t>(z, t);
            dz[t] = static_cast<input_t>(dy_v[i] * y_v[i] * silu_grad(zt));
            dy_v[i] *= silu(zt);
          }
        }
      }
    }

#pragma unroll
    for (int i = 0; i < kNItems; ++i) {
      const int64_t t = t0 + i;
      if (t < L) {
        dD_acc += dy_v[i] * u_v[i];
        float dd = dd_v[i];
        if (p.delta_softplus) dd *= softplus_grad(load_f<input_t>(dl, t) + bias);
        dbias_acc += dd;
        du[t] = static_cast<input_t>(du_v[i] + dy_v[i] * D);
        ddelta[t] = static_cast<input_t>(dd);
      }
    }
  }

  const float dD_sum = BlockReduceF(reduce_f_storage).Sum(dD_acc);
  __syncthreads();
  const float dbias_sum = BlockReduceF(reduce_f_storage).Sum(dbias_acc);
  if (tid == 0) {
    if (p.dD_ptr) atomicAdd(p.dD_ptr + d, dD_sum);
    if (p.ddelta_bias_ptr) atomicAdd(p.ddelta_bias_ptr + d, dbias_sum);
  }
  for (int n = tid; n < N; n += kNThreads) {
    atomicAdd(p.dA_ptr + d * N + n, w_sum[n].dA);
    if (!p.is_variable_B) atomicAdd(p.dB_ptr + d * N + n, w_sum[n].dB);
    if (!p.is_variable_C) atomicAdd(p.dC_ptr + d * N + n, w_sum[n].dC);
  }
}

template <typename input_t>
void selective_scan_bwd_launch(const SSBwdParams& p, cudaStream_t stream) {
  using Ktraits = SSKernelTraits<input_t>;
  const dim3 grid(static_cast<unsigned>(p.dim), static_cast<unsigned>(p.batch));
  selective_scan_bwd_kernel<Ktraits><<<grid, Ktraits::kNThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void selective_scan_bwd_cuda(const SSBwdParams& p, c10::ScalarType dtype, int device) {
  // batch or dim 0 is a valid empty call; a grid dimension of 0 is an invalid launch.
  if (p.batch == 0 || p.dim == 0) return;
  check_grid(p);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  MM_DISPATCH_FLOAT_TYPES(dtype, input_t, "selective_scan_bwd (CUDA): u",
                          [&] { selective_scan_bwd_launch<input_t>(p, stream); });
}

}  // namespace memorymamba
