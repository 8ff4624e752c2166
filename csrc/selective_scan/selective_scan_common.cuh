// Shared pieces of the selective_scan CUDA kernels: launch geometry and block-scan types.
//
// Geometry: one block of kNThreads per (channel, batch); the sequence is walked in chunks of
// kNThreads * kNItems positions, each thread owning kNItems consecutive positions. Inside a
// chunk every thread folds its items into one ScanPair, a cub::BlockScan (exclusive, seeded
// with the state carried from the previous chunk) gives each thread its incoming state, and
// the thread replays its items sequentially. The backward does the same right to left.
//
// Template instantiations: input dtype {fp32, fp16, bf16} only = 3 forward + 3 backward
// kernels per arch. Every flag (variable B/C, z, D, delta_bias, softplus, tail chunk) is a
// block-uniform runtime branch: each costs a few instructions per element next to the exps,
// and compiling them out would multiply the kernel count by 2^6.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common/ssm_math.h"
#include "selective_scan/selective_scan.h"

namespace memorymamba {

template <typename input_t_>
struct SSKernelTraits {
  using input_t = input_t_;
  static constexpr int kNThreads = 128;
  static constexpr int kNItems = 4;
  static constexpr int kChunk = kNThreads * kNItems;
  static_assert(kChunk == kSelectiveScanChunk,
                "the CUDA chunk must match kSelectiveScanChunk: the saved states are per chunk");
  static_assert(kNThreads % 32 == 0, "kNThreads must be a whole number of warps");
  using BlockScanT = cub::BlockScan<ScanPair, kNThreads, cub::BLOCK_SCAN_WARP_SCANS>;
};

struct ScanCombineOp {
  __device__ __forceinline__ ScanPair operator()(const ScanPair& earlier,
                                                 const ScanPair& later) const {
    return scan_combine(earlier, later);
  }
};

template <typename T>
__device__ __forceinline__ float load_f(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}

inline void check_grid(const SSFwdParams& p) {
  MM_CHECK(p.batch <= 65535, "selective_scan (CUDA): batch must be <= 65535, got ", p.batch);
  MM_CHECK(p.dim <= 2147483647, "selective_scan (CUDA): dim must be < 2^31, got ", p.dim);
}

}  // namespace memorymamba
