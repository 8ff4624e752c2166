// Parameters of the selective_scan kernels (CPU and CUDA), filled and checked on the host
// by selective_scan.cpp. Strides are in elements, not bytes; the last (L) dimension of every
// sequence tensor is contiguous.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

namespace memorymamba {

// Largest state size: the kernels keep the running state of every n on chip.
constexpr int kSelectiveScanMaxDState = 64;
// Sequence positions per chunk; the forward saves the state at every chunk end and the
// backward recomputes each chunk from it. CUDA: kNThreads * kNItems = 128 * 4.
constexpr int kSelectiveScanChunk = 512;

struct SSFwdParams {
  int64_t batch, dim, seqlen, dstate, n_groups, n_chunks;
  bool is_variable_B, is_variable_C, has_z, has_D, has_delta_bias, delta_softplus;

  // Input dtype: u, delta, z, variable B/C, out. fp32: A, D, delta_bias, constant B/C, states.
  const void* __restrict__ u_ptr;
  const void* __restrict__ delta_ptr;
  const float* __restrict__ A_ptr;
  const void* __restrict__ B_ptr;
  const void* __restrict__ C_ptr;
  const float* __restrict__ D_ptr;
  const void* __restrict__ z_ptr;
  const float* __restrict__ delta_bias_ptr;
  void* __restrict__ out_ptr;
  float* __restrict__ states_ptr;  // (batch, dim, n_chunks, dstate), contiguous

  int64_t u_batch_stride, u_dim_stride;
  int64_t delta_batch_stride, delta_dim_stride;
  int64_t A_dim_stride, A_dstate_stride;
  // Variable: (batch, group, dstate, L); constant: (dim, dstate) with batch/group strides 0
  // and dim stride set (the kernels read it per channel).
  int64_t B_batch_stride, B_group_stride, B_dim_stride, B_dstate_stride;
  int64_t C_batch_stride, C_group_stride, C_dim_stride, C_dstate_stride;
  int64_t D_stride, delta_bias_stride;
  int64_t z_batch_stride, z_dim_stride;
  int64_t out_batch_stride, out_dim_stride;
};

// Gradient outputs: du, ddelta, dz in the input dtype; the rest fp32, zero-filled by the caller
// (kernels accumulate into them). Variable dB/dC: (batch, group, dstate, L) contiguous;
// constant: (dim, dstate) contiguous.
struct SSBwdParams : SSFwdParams {
  const void* __restrict__ dout_ptr;
  void* __restrict__ du_ptr;
  void* __restrict__ ddelta_ptr;
  float* __restrict__ dA_ptr;  // (dim, dstate) contiguous
  float* __restrict__ dB_ptr;
  float* __restrict__ dC_ptr;
  float* __restrict__ dD_ptr;           // (dim,) or null
  float* __restrict__ ddelta_bias_ptr;  // (dim,) or null
  void* __restrict__ dz_ptr;

  int64_t dout_batch_stride, dout_dim_stride;
  int64_t du_batch_stride, du_dim_stride;
  int64_t ddelta_batch_stride, ddelta_dim_stride;
  int64_t dz_batch_stride, dz_dim_stride;
};

#ifdef MEMORYMAMBA_WITH_CUDA
// Defined in selective_scan_{fwd,bwd}.cu: dispatch on dtype, guard `device`, launch on the
// current stream, check the launch.
void selective_scan_fwd_cuda(const SSFwdParams& params, c10::ScalarType dtype, int device);
void selective_scan_bwd_cuda(const SSBwdParams& params, c10::ScalarType dtype, int device);
#endif

}  // namespace memorymamba
