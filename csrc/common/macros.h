// Shared compile-time helpers for every op in csrc/.
#pragma once

// Arithmetic shared by the CUDA and CPU builds is written once as MM_HD functions.
#if defined(__CUDACC__)
#define MM_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced inline so that loops calling MM_HD functions stay vectorisable.
#define MM_HD inline __attribute__((always_inline))
#else
#define MM_HD inline
#endif

// Error with a message that names the argument and the rule.
#define MM_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
