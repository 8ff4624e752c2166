// selective_scan: input checks, the CPU kernels, device dispatch and the Python binding.
//
// The CPU kernels run the MM_HD arithmetic of common/ssm_math.h, the same functions the CUDA
// kernels run. Forward: one task per (batch, channel). Backward: tasks own a slice of channels
// of one (batch, group) so that variable dB/dC sums need no atomics, and recompute each
// chunk's states from the chunk-start states the forward saved.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "common/cpu_vec.h"
#include "common/dispatch.h"
#include "common/registry.h"
#include "common/ssm_math.h"
#include "selective_scan/selective_scan.h"

namespace memorymamba {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

void check_tensor(const at::Tensor& t, const char* name, const char* what,
                  at::IntArrayRef shape, at::ScalarType dtype, const at::Device& device,
                  bool last_contiguous) {
  MM_CHECK(t.sizes() == shape, name, " must have shape ", what, " = ", shape_str(shape),
           ", got ", shape_str(t.sizes()));
  MM_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
           t.scalar_type());
  MM_CHECK(t.device() == device, name, " must be on ", device, " like u, got ", t.device());
  MM_CHECK(!last_contiguous || t.size(-1) == 1 || t.stride(-1) == 1, name,
           " must be contiguous in its last dimension (stride 1), got stride ", t.stride(-1));
}

// Checks every input and fills the forward part of the params.
void fill_fwd(SSFwdParams& p, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
              const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
              const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
              bool delta_softplus, const at::Tensor& states) {
  MM_CHECK(u.dim() == 3, "u must have shape (batch, dim, L), got ", shape_str(u.sizes()));
  const auto dtype = u.scalar_type();
  MM_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
           "u must be float32, float16 or bfloat16, got ", dtype);
  const auto dev = u.device();
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  MM_CHECK(L >= 1, "u must have at least one position (L >= 1), got L = ", L);
  MM_CHECK(u.stride(-1) == 1 || L == 1,
           "u must be contiguous in its last dimension (stride 1), got stride ", u.stride(-1));
  check_tensor(delta, "delta", "(batch, dim, L)", {batch, dim, L}, dtype, dev, true);
  MM_CHECK(A.dim() == 2, "A must have shape (dim, N), got ", shape_str(A.sizes()));
  const int64_t N = A.size(1);
  MM_CHECK(N >= 1 && N <= kSelectiveScanMaxDState, "A must have 1 <= N <= ",
           kSelectiveScanMaxDState, " states (dim, N), got N = ", N);
  check_tensor(A, "A", "(dim, N)", {dim, N}, at::kFloat, dev, false);

  const bool var_B = B.dim() >= 3, var_C = C.dim() >= 3;
  int64_t G = 1;
  if (var_B) G = B.size(1);
  else if (var_C) G = C.size(1);
  MM_CHECK(G >= 1 && dim % G == 0, "the number of groups G of B/C must divide dim = ", dim,
           ", got G = ", G);
  auto check_bc = [&](const at::Tensor& t, const char* name, bool var) {
    if (var) {
      MM_CHECK(t.dim() == 4, name, " must have shape (batch, G, N, L) or (dim, N), got ",
               shape_str(t.sizes()));
      check_tensor(t, name, "(batch, G, N, L)", {batch, G, N, L}, dtype, dev, true);
    } else {
      MM_CHECK(t.dim() == 2, name, " must have shape (batch, G, N, L) or (dim, N), got ",
               shape_str(t.sizes()));
      check_tensor(t, name, "(dim, N)", {dim, N}, at::kFloat, dev, false);
    }
  };
  check_bc(B, "B", var_B);
  check_bc(C, "C", var_C);
  if (D) check_tensor(*D, "D", "(dim,)", {dim}, at::kFloat, dev, false);
  if (delta_bias) check_tensor(*delta_bias, "delta_bias", "(dim,)", {dim}, at::kFloat, dev, false);
  if (z) check_tensor(*z, "z", "(batch, dim, L)", {batch, dim, L}, dtype, dev, true);
  const int64_t n_chunks = (L + kSelectiveScanChunk - 1) / kSelectiveScanChunk;
  check_tensor(states, "states", "(batch, dim, n_chunks, N)", {batch, dim, n_chunks, N},
               at::kFloat, dev, false);
  MM_CHECK(states.is_contiguous(), "states must be contiguous");

  p.batch = batch; p.dim = dim; p.seqlen = L; p.dstate = N; p.n_groups = G;
  p.n_chunks = n_chunks;
  p.is_variable_B = var_B; p.is_variable_C = var_C;
  p.has_z = z.has_value(); p.has_D = D.has_value(); p.has_delta_bias = delta_bias.has_value();
  p.delta_softplus = delta_softplus;
  p.u_ptr = u.data_ptr(); p.delta_ptr = delta.data_ptr();
  p.A_ptr = A.data_ptr<float>(); p.B_ptr = B.data_ptr(); p.C_ptr = C.data_ptr();
  p.D_ptr = D ? D->data_ptr<float>() : nullptr;
  p.z_ptr = z ? z->data_ptr() : nullptr;
  p.delta_bias_ptr = delta_bias ? delta_bias->data_ptr<float>() : nullptr;
  p.states_ptr = states.data_ptr<float>();
  p.u_batch_stride = u.stride(0); p.u_dim_stride = u.stride(1);
  p.delta_batch_stride = delta.stride(0); p.delta_dim_stride = delta.stride(1);
  p.A_dim_stride = A.stride(0); p.A_dstate_stride = A.stride(1);
  if (var_B) {
    p.B_batch_stride = B.stride(0); p.B_group_stride = B.stride(1);
    p.B_dim_stride = 0; p.B_dstate_stride = B.stride(2);
  } else {
    p.B_batch_stride = 0; p.B_group_stride = 0;
    p.B_dim_stride = B.stride(0); p.B_dstate_stride = B.stride(1);
  }
  if (var_C) {
    p.C_batch_stride = C.stride(0); p.C_group_stride = C.stride(1);
    p.C_dim_stride = 0; p.C_dstate_stride = C.stride(2);
  } else {
    p.C_batch_stride = 0; p.C_group_stride = 0;
    p.C_dim_stride = C.stride(0); p.C_dstate_stride = C.stride(1);
  }
  p.D_stride = D ? D->stride(0) : 0;
  p.delta_bias_stride = delta_bias ? delta_bias->stride(0) : 0;
  p.z_batch_stride = z ? z->stride(0) : 0;
  p.z_dim_stride = z ? z->stride(1) : 0;
}

// ---------------------------------------------------------------- CPU kernels
//
// Each (batch, channel) row is walked chunk by chunk (kSelectiveScanChunk positions). Inside a
// chunk the element-wise work (softplus, exp, products, gradients) runs as loops over positions
// that the compiler vectorises, and only the recurrences x_t = a_t x_{t-1} + b_t (forward) and
// g_t = dy_t C_t + a_{t+1} g_{t+1} (backward) run serially, one FMA per position.

constexpr int64_t K = kSelectiveScanChunk;

#if defined(__GNUC__)
#define MM_CPU_INLINE inline __attribute__((always_inline))
#else
#define MM_CPU_INLINE inline
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#define MM_CPU_AVX2 1
#endif

bool cpu_has_avx2() {
#ifdef MM_CPU_AVX2
  return cpu_isa() != CpuIsa::kBaseline;
#else
  return false;
#endif
}

// `dst[k] = float(src[t0 + k])` for a chunk of a row.
template <typename T>
MM_CPU_INLINE void load_chunk(float* __restrict__ dst, const void* src, int64_t t0, int64_t len) {
  const T* s = static_cast<const T*>(src) + t0;
  for (int64_t k = 0; k < len; ++k) dst[k] = static_cast<float>(s[k]);
}

// B or C of state n for a chunk: the variable row, or the constant repeated.
template <typename T>
MM_CPU_INLINE void load_bc(float* __restrict__ dst, const void* base, bool var, int64_t n_stride,
                    int64_t n, int64_t t0, int64_t len) {
  if (var) {
    load_chunk<T>(dst, static_cast<const T*>(base) + n * n_stride, t0, len);
  } else {
    const float v = static_cast<const float*>(base)[n * n_stride];
    for (int64_t k = 0; k < len; ++k) dst[k] = v;
  }
}

// Per-channel view of the inputs: base pointers of one (batch, channel) row.
template <typename input_t>
struct Row {
  const void* u; const void* delta; const void* z;
  const void* B; const void* C;  // input_t if variable, float if constant
  float A[kSelectiveScanMaxDState];
  float D, bias;
  int64_t B_n, C_n;  // dstate strides
  bool var_B, var_C;

  Row(const SSFwdParams& p, int64_t b, int64_t d) {
    const int64_t g = d / (p.dim / p.n_groups);
    u = static_cast<const input_t*>(p.u_ptr) + b * p.u_batch_stride + d * p.u_dim_stride;
    delta = static_cast<const input_t*>(p.delta_ptr) + b * p.delta_batch_stride +
            d * p.delta_dim_stride;
    z = p.has_z ? static_cast<const input_t*>(p.z_ptr) + b * p.z_batch_stride + d * p.z_dim_stride
                : nullptr;
    var_B = p.is_variable_B; var_C = p.is_variable_C;
    B = var_B ? static_cast<const void*>(static_cast<const input_t*>(p.B_ptr) +
                                          b * p.B_batch_stride + g * p.B_group_stride)
              : static_cast<const void*>(static_cast<const float*>(p.B_ptr) + d * p.B_dim_stride);
    C = var_C ? static_cast<const void*>(static_cast<const input_t*>(p.C_ptr) +
                                          b * p.C_batch_stride + g * p.C_group_stride)
              : static_cast<const void*>(static_cast<const float*>(p.C_ptr) + d * p.C_dim_stride);
    B_n = p.B_dstate_stride; C_n = p.C_dstate_stride;
    for (int64_t n = 0; n < p.dstate; ++n) A[n] = p.A_ptr[d * p.A_dim_stride + n * p.A_dstate_stride];
    D = p.has_D ? p.D_ptr[d * p.D_stride] : 0.f;
    bias = p.has_delta_bias ? p.delta_bias_ptr[d * p.delta_bias_stride] : 0.f;
  }
  MM_CPU_INLINE void Bchunk(float* dst, int64_t n, int64_t t0, int64_t len) const {
    load_bc<input_t>(dst, B, var_B, B_n, n, t0, len);
  }
  MM_CPU_INLINE void Cchunk(float* dst, int64_t n, int64_t t0, int64_t len) const {
    load_bc<input_t>(dst, C, var_C, C_n, n, t0, len);
  }
  // Raw delta and effective delta (bias, softplus) of a chunk.
  MM_CPU_INLINE void delta_chunk(float* __restrict__ raw, float* __restrict__ dt, int64_t t0, int64_t len,
                   bool sp) const {
    load_chunk<input_t>(raw, delta, t0, len);
    const float bs = bias;
    for (int64_t k = 0; k < len; ++k) dt[k] = effective_delta(raw[k], bs, sp);
  }
};

// Scratch of one thread: chunk-sized float arrays (N of them for the per-state ones).
struct Scratch {
  std::vector<float> mem;
  float *uf, *raw, *dt, *y, *bf, *cf, *b, *dy, *dd, *dua, *g, *t1, *t2, *a, *bs, *xp;
  explicit Scratch(int64_t N) : mem(13 * K + 2 * N * K + N * (K + 1)) {
    float* p = mem.data();
    for (float** q : {&uf, &raw, &dt, &y, &bf, &cf, &b, &dy, &dd, &dua, &g, &t1, &t2}) { *q = p; p += K; }
    a = p; p += N * K;
    bs = p; p += N * K;  // backward: B of every state, loaded once per chunk
    xp = p;  // (N, K + 1): xp[n][k] = x_{t0+k-1}, so xp[n][k + 1] = x_{t0+k}
  }
};

template <typename input_t>
MM_CPU_INLINE void fwd_cpu_row(const SSFwdParams& p, int64_t b, int64_t d, Scratch& s) {
  const int64_t N = p.dstate, L = p.seqlen;
  const Row<input_t> r(p, b, d);
  input_t* out = static_cast<input_t*>(p.out_ptr) + b * p.out_batch_stride + d * p.out_dim_stride;
  float* states = p.states_ptr + (b * p.dim + d) * p.n_chunks * N;
  float x[kSelectiveScanMaxDState];
  for (int64_t n = 0; n < N; ++n) x[n] = 0.f;
  for (int64_t c = 0; c < p.n_chunks; ++c) {
    const int64_t t0 = c * K, len = std::min(K, L - t0);
    load_chunk<input_t>(s.uf, r.u, t0, len);
    r.delta_chunk(s.raw, s.dt, t0, len, p.delta_softplus);
    for (int64_t k = 0; k < len; ++k) s.y[k] = r.D * s.uf[k];
    for (int64_t n = 0; n < N; ++n) {
      r.Bchunk(s.bf, n, t0, len);
      r.Cchunk(s.cf, n, t0, len);
      const float A = r.A[n];
      for (int64_t k = 0; k < len; ++k) {
        const ScanPair e = discretise(s.dt[k], A, s.bf[k], s.uf[k]);
        s.a[k] = e.a;
        s.b[k] = e.b;
      }
      float xn = x[n];
      for (int64_t k = 0; k < len; ++k) {
        xn = s.a[k] * xn + s.b[k];
        s.y[k] += s.cf[k] * xn;
      }
      x[n] = xn;
      states[c * N + n] = xn;
    }
    if (r.z) {
      load_chunk<input_t>(s.t1, r.z, t0, len);
      for (int64_t k = 0; k < len; ++k) s.y[k] *= silu(s.t1[k]);
    }
    for (int64_t k = 0; k < len; ++k) out[t0 + k] = static_cast<input_t>(s.y[k]);
  }
}

// Rows [begin, end) of the forward, compiled for the baseline ISA and, on x86-64, again for
// AVX2 (picked at run time): twice the vector width on the exp/log loops.
template <typename input_t>
void fwd_cpu_rows(const SSFwdParams& p, int64_t begin, int64_t end) {
  Scratch s(p.dstate);
  for (int64_t i = begin; i < end; ++i) fwd_cpu_row<input_t>(p, i / p.dim, i % p.dim, s);
}
#ifdef MM_CPU_AVX2
template <typename input_t>
__attribute__((target("avx2,fma"))) void fwd_cpu_rows_avx2(const SSFwdParams& p, int64_t begin,
                                                          int64_t end) {
  Scratch s(p.dstate);
  for (int64_t i = begin; i < end; ++i) fwd_cpu_row<input_t>(p, i / p.dim, i % p.dim, s);
}
#endif

template <typename input_t>
void fwd_cpu_kernel(const SSFwdParams& p) {
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
    memorymamba::FlushDenormals ftz;
#ifdef MM_CPU_AVX2
    if (avx2) return fwd_cpu_rows_avx2<input_t>(p, begin, end);
#endif
    fwd_cpu_rows<input_t>(p, begin, end);
  });
}

// Backward of one (batch, channel) row. Variable dB/dC are added into `dB_row`/`dC_row` (fp32,
// (N, L) contiguous, shared by the channels of a group); the per-channel weight grads into
// w = [dA (N), constant dB (N), constant dC (N), dD, ddelta_bias].
template <typename input_t>
MM_CPU_INLINE void bwd_cpu_row(const SSBwdParams& p, int64_t b, int64_t d, float* dB_row, float* dC_row,
                 float* w, Scratch& s) {
  const int64_t N = p.dstate, L = p.seqlen;
  const Row<input_t> r(p, b, d);
  const void* dout = static_cast<const input_t*>(p.dout_ptr) + b * p.dout_batch_stride +
                     d * p.dout_dim_stride;
  input_t* du = static_cast<input_t*>(p.du_ptr) + b * p.du_batch_stride + d * p.du_dim_stride;
  input_t* ddelta = static_cast<input_t*>(p.ddelta_ptr) + b * p.ddelta_batch_stride +
                    d * p.ddelta_dim_stride;
  input_t* dz = p.has_z ? static_cast<input_t*>(p.dz_ptr) + b * p.dz_batch_stride +
                              d * p.dz_dim_stride
                        : nullptr;
  const float* states = p.states_ptr + (b * p.dim + d) * p.n_chunks * N;
  float carry[kSelectiveScanMaxDState];  // exp(delta_{t+1} A) * dL/dx_{t+1}
  for (int64_t n = 0; n < N; ++n) carry[n] = 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;
  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * K, len = std::min(K, L - t0);
    load_chunk<input_t>(s.uf, r.u, t0, len);
    r.delta_chunk(s.raw, s.dt, t0, len, p.delta_softplus);
    load_chunk<input_t>(s.dy, dout, t0, len);
    // Recompute the chunk's states from the saved chunk-start state (and y if z gates it).
    if (dz) {
      for (int64_t k = 0; k < len; ++k) s.y[k] = r.D * s.uf[k];
    }
    for (int64_t n = 0; n < N; ++n) {
      float* a = s.a + n * K;
      float* xp = s.xp + n * (K + 1);
      float* bf = s.bs + n * K;
      r.Bchunk(bf, n, t0, len);
      const float A = r.A[n];
      for (int64_t k = 0; k < len; ++k) {
        const ScanPair e = discretise(s.dt[k], A, bf[k], s.uf[k]);
        a[k] = e.a;
        s.b[k] = e.b;
      }
      float xn = c > 0 ? states[(c - 1) * N + n] : 0.f;
      xp[0] = xn;
      for (int64_t k = 0; k < len; ++k) {
        xn = a[k] * xn + s.b[k];
        xp[k + 1] = xn;
      }
      if (dz) {
        r.Cchunk(s.cf, n, t0, len);
        for (int64_t k = 0; k < len; ++k) s.y[k] += s.cf[k] * xp[k + 1];
      }
    }
    if (dz) {
      load_chunk<input_t>(s.t1, r.z, t0, len);
      for (int64_t k = 0; k < len; ++k) {
        const float zk = s.t1[k];
        s.t2[k] = s.dy[k] * s.y[k] * silu_grad(zk);
        s.dy[k] *= silu(zk);
      }
      for (int64_t k = 0; k < len; ++k) dz[t0 + k] = static_cast<input_t>(s.t2[k]);
    }
    for (int64_t k = 0; k < len; ++k) { s.dd[k] = 0.f; s.dua[k] = 0.f; }
    for (int64_t n = 0; n < N; ++n) {
      const float* a = s.a + n * K;
      const float* xp = s.xp + n * (K + 1);
      const float* bf = s.bs + n * K;
      r.Cchunk(s.cf, n, t0, len);
      float cn = carry[n];
      for (int64_t k = len - 1; k >= 0; --k) {
        const float gk = cn + s.dy[k] * s.cf[k];
        s.g[k] = gk;
        cn = a[k] * gk;
      }
      carry[n] = cn;
      const float A = r.A[n];
      float dA = 0.f, dBs = 0.f, dCs = 0.f;
#pragma omp simd reduction(+ : dA, dBs, dCs)
      for (int64_t k = 0; k < len; ++k) {
        const StepGrad sg = step_grad(s.g[k], xp[k], a[k], s.dt[k], A, bf[k], s.uf[k]);
        const float dC = s.dy[k] * xp[k + 1];
        dA += sg.dA;
        s.dd[k] += sg.ddelta;
        s.dua[k] += sg.du;
        s.t1[k] = sg.dB;
        s.t2[k] = dC;
        dBs += sg.dB;
        dCs += dC;
      }
      w[n] += dA;
      if (r.var_B) {
        float* dst = dB_row + n * L + t0;
        for (int64_t k = 0; k < len; ++k) dst[k] += s.t1[k];
      } else {
        w[N + n] += dBs;
      }
      if (r.var_C) {
        float* dst = dC_row + n * L + t0;
        for (int64_t k = 0; k < len; ++k) dst[k] += s.t2[k];
      } else {
        w[2 * N + n] += dCs;
      }
    }
    const float D = r.D, bs = r.bias;
    const bool sp = p.delta_softplus;
#pragma omp simd reduction(+ : dD_acc, dbias_acc)
    for (int64_t k = 0; k < len; ++k) {
      const float dd = sp ? s.dd[k] * softplus_grad(s.raw[k] + bs) : s.dd[k];
      s.dd[k] = dd;
      dbias_acc += dd;
      dD_acc += s.dy[k] * s.uf[k];
      s.dua[k] += s.dy[k] * D;
    }
    for (int64_t k = 0; k < len; ++k) {
      du[t0 + k] = static_cast<input_t>(s.dua[k]);
      ddelta[t0 + k] = static_cast<input_t>(s.dd[k]);
    }
  }
  w[3 * N] += dD_acc;
  w[3 * N + 1] += dbias_acc;
}

// How the backward's tasks map to rows and where they write their partial sums.
struct BwdTasks {
  int64_t S;  // channel slices per (batch, group)
  float* dB_base;
  float* dC_base;
  float* w;  // (batch, dim, 3N + 2) weight-grad partials
};

template <typename input_t>
MM_CPU_INLINE void bwd_cpu_tasks_impl(const SSBwdParams& p, const BwdTasks& t, int64_t begin,
                                      int64_t end) {
  const int64_t N = p.dstate, L = p.seqlen, G = p.n_groups, dpg = p.dim / G, S = t.S;
  const bool var_BC = p.is_variable_B || p.is_variable_C;
  Scratch s(N);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t sl = task % S, bg = task / S, g = bg % G, b = bg / G;
    const int64_t d0 = g * dpg + sl * dpg / S, d1 = g * dpg + (sl + 1) * dpg / S;
    const int64_t row_off = (((S > 1 && var_BC ? sl * p.batch : 0) + b) * G + g) * N * L;
    for (int64_t d = d0; d < d1; ++d) {
      bwd_cpu_row<input_t>(p, b, d, p.is_variable_B ? t.dB_base + row_off : nullptr,
                           p.is_variable_C ? t.dC_base + row_off : nullptr,
                           t.w + (b * p.dim + d) * (3 * N + 2), s);
    }
  }
}

template <typename input_t>
void bwd_cpu_tasks(const SSBwdParams& p, const BwdTasks& t, int64_t begin, int64_t end) {
  bwd_cpu_tasks_impl<input_t>(p, t, begin, end);
}
#ifdef MM_CPU_AVX2
template <typename input_t>
__attribute__((target("avx2,fma"))) void bwd_cpu_tasks_avx2(const SSBwdParams& p,
                                                           const BwdTasks& t, int64_t begin,
                                                           int64_t end) {
  bwd_cpu_tasks_impl<input_t>(p, t, begin, end);
}
#endif

template <typename input_t>
void bwd_cpu_kernel(const SSBwdParams& p) {
  const int64_t N = p.dstate, L = p.seqlen, G = p.n_groups, dpg = p.dim / G;
  const bool var_BC = p.is_variable_B || p.is_variable_C;
  // Tasks own a slice of one (batch, group)'s channels, so variable dB/dC rows have one writer.
  // With few (batch, group) pairs the channels are cut into S slices that sum variable dB/dC in
  // their own fp32 scratch (capped at ~256 MB) to keep every thread busy.
  const int64_t target = 4 * at::get_num_threads();
  int64_t S = var_BC ? (p.batch * G >= target ? 1 : (target + p.batch * G - 1) / (p.batch * G))
                     : dpg;
  if (var_BC) {
    const int64_t per_slice = p.batch * G * N * L * 4 * 2;
    S = std::max<int64_t>(1, std::min<int64_t>(S, (int64_t(256) << 20) / per_slice));
  }
  S = std::min(S, dpg);
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor dB_part, dC_part;
  float* dB_base = p.dB_ptr;
  float* dC_base = p.dC_ptr;
  if (S > 1 && var_BC) {
    if (p.is_variable_B) { dB_part = at::zeros({S, p.batch, G, N, L}, fopt); dB_base = dB_part.data_ptr<float>(); }
    if (p.is_variable_C) { dC_part = at::zeros({S, p.batch, G, N, L}, fopt); dC_base = dC_part.data_ptr<float>(); }
  }
  // Per (batch, channel) weight-grad partials, summed over batch at the end (deterministic).
  at::Tensor wpart = at::zeros({p.batch, p.dim, 3 * N + 2}, fopt);
  float* w = wpart.data_ptr<float>();
  const BwdTasks t{S, dB_base, dC_base, w};
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, p.batch * G * S, 1, [&](int64_t begin, int64_t end) {
    memorymamba::FlushDenormals ftz;
#ifdef MM_CPU_AVX2
    if (avx2) return bwd_cpu_tasks_avx2<input_t>(p, t, begin, end);
#endif
    bwd_cpu_tasks<input_t>(p, t, begin, end);
  });
  const auto wsum = wpart.sum(0);  // (dim, 3N + 2)
  at::from_blob(p.dA_ptr, {p.dim, N}, fopt).add_(wsum.narrow(1, 0, N));
  if (!p.is_variable_B) at::from_blob(p.dB_ptr, {p.dim, N}, fopt).add_(wsum.narrow(1, N, N));
  if (!p.is_variable_C) at::from_blob(p.dC_ptr, {p.dim, N}, fopt).add_(wsum.narrow(1, 2 * N, N));
  if (p.dD_ptr) at::from_blob(p.dD_ptr, {p.dim}, fopt).add_(wsum.select(1, 3 * N));
  if (p.ddelta_bias_ptr) at::from_blob(p.ddelta_bias_ptr, {p.dim}, fopt).add_(wsum.select(1, 3 * N + 1));
  if (dB_part.defined()) at::from_blob(p.dB_ptr, {p.batch, G, N, L}, fopt).add_(dB_part.sum(0));
  if (dC_part.defined()) at::from_blob(p.dC_ptr, {p.batch, G, N, L}, fopt).add_(dC_part.sum(0));
}


// ---------------------------------------------------------------- entry points

void selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                        const c10::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        const at::Tensor& out, const at::Tensor& states) {
  SSFwdParams p{};
  fill_fwd(p, u, delta, A, B, C, D, z, delta_bias, delta_softplus, states);
  check_tensor(out, "out", "(batch, dim, L)", u.sizes(), u.scalar_type(), u.device(), true);
  p.out_ptr = out.data_ptr();
  p.out_batch_stride = out.stride(0); p.out_dim_stride = out.stride(1);
  if (u.is_cuda()) {
#ifdef MEMORYMAMBA_WITH_CUDA
    selective_scan_fwd_cuda(p, u.scalar_type(), u.get_device());
    return;
#else
    TORCH_CHECK(false, "selective_scan: memorymamba._C was built without CUDA kernels");
#endif
  }
  MM_CHECK(u.is_cpu(), "u must be a CPU or CUDA tensor, got ", u.device());
  MM_DISPATCH_FLOAT_TYPES(u.scalar_type(), input_t, "selective_scan_fwd: u", [&] {
    fwd_cpu_kernel<input_t>(p);
  });
}

void selective_scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                        const c10::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        const at::Tensor& states, const at::Tensor& dout, const at::Tensor& du,
                        const at::Tensor& ddelta, const at::Tensor& dA, const at::Tensor& dB,
                        const at::Tensor& dC, const c10::optional<at::Tensor>& dD,
                        const c10::optional<at::Tensor>& ddelta_bias,
                        const c10::optional<at::Tensor>& dz) {
  SSBwdParams p{};
  fill_fwd(p, u, delta, A, B, C, D, z, delta_bias, delta_softplus, states);
  const auto dtype = u.scalar_type();
  const auto dev = u.device();
  const auto seq = u.sizes();
  check_tensor(dout, "dout", "(batch, dim, L)", seq, dtype, dev, true);
  check_tensor(du, "du", "(batch, dim, L)", seq, dtype, dev, true);
  check_tensor(ddelta, "ddelta", "(batch, dim, L)", seq, dtype, dev, true);
  check_tensor(dA, "dA", "(dim, N)", A.sizes(), at::kFloat, dev, false);
  MM_CHECK(dA.is_contiguous(), "dA must be contiguous");
  auto check_dbc = [&](const at::Tensor& g, const at::Tensor& x, const char* name, bool var) {
    check_tensor(g, name, var ? "(batch, G, N, L) float32" : "(dim, N) float32", x.sizes(),
                 at::kFloat, dev, false);
    MM_CHECK(g.is_contiguous(), name, " must be contiguous");
  };
  check_dbc(dB, B, "dB", p.is_variable_B);
  check_dbc(dC, C, "dC", p.is_variable_C);
  MM_CHECK(dD.has_value() == D.has_value(), "dD must be given exactly when D is");
  MM_CHECK(ddelta_bias.has_value() == delta_bias.has_value(),
           "ddelta_bias must be given exactly when delta_bias is");
  MM_CHECK(dz.has_value() == z.has_value(), "dz must be given exactly when z is");
  if (dD) {
    check_tensor(*dD, "dD", "(dim,)", {p.dim}, at::kFloat, dev, false);
    MM_CHECK(dD->is_contiguous(), "dD must be contiguous");
  }
  if (ddelta_bias) {
    check_tensor(*ddelta_bias, "ddelta_bias", "(dim,)", {p.dim}, at::kFloat, dev, false);
    MM_CHECK(ddelta_bias->is_contiguous(), "ddelta_bias must be contiguous");
  }
  if (dz) check_tensor(*dz, "dz", "(batch, dim, L)", seq, dtype, dev, true);
  p.dout_ptr = dout.data_ptr(); p.du_ptr = du.data_ptr(); p.ddelta_ptr = ddelta.data_ptr();
  p.dA_ptr = dA.data_ptr<float>(); p.dB_ptr = dB.data_ptr<float>(); p.dC_ptr = dC.data_ptr<float>();
  p.dD_ptr = dD ? dD->data_ptr<float>() : nullptr;
  p.ddelta_bias_ptr = ddelta_bias ? ddelta_bias->data_ptr<float>() : nullptr;
  p.dz_ptr = dz ? dz->data_ptr() : nullptr;
  p.dout_batch_stride = dout.stride(0); p.dout_dim_stride = dout.stride(1);
  p.du_batch_stride = du.stride(0); p.du_dim_stride = du.stride(1);
  p.ddelta_batch_stride = ddelta.stride(0); p.ddelta_dim_stride = ddelta.stride(1);
  p.dz_batch_stride = dz ? dz->stride(0) : 0; p.dz_dim_stride = dz ? dz->stride(1) : 0;
  if (u.is_cuda()) {
#ifdef MEMORYMAMBA_WITH_CUDA
    selective_scan_bwd_cuda(p, dtype, u.get_device());
    return;
#else
    TORCH_CHECK(false, "selective_scan: memorymamba._C was built without CUDA kernels");
#endif
  }
  MM_CHECK(u.is_cpu(), "u must be a CPU or CUDA tensor, got ", u.device());
  MM_DISPATCH_FLOAT_TYPES(dtype, input_t, "selective_scan_bwd: u", [&] {
    bwd_cpu_kernel<input_t>(p);
  });
}

}  // namespace
}  // namespace memorymamba

void bind_selective_scan(pybind11::module_& m) {
  using namespace pybind11::literals;
  m.attr("selective_scan_chunk_size") = memorymamba::kSelectiveScanChunk;
  m.attr("selective_scan_max_dstate") = memorymamba::kSelectiveScanMaxDState;
  m.def("selective_scan_fwd", &memorymamba::selective_scan_fwd,
        "Selective scan forward into `out` (batch, dim, L) and chunk-end `states` "
        "(batch, dim, n_chunks, N) float32.",
        "u"_a, "delta"_a, "A"_a, "B"_a, "C"_a, "D"_a, "z"_a, "delta_bias"_a, "delta_softplus"_a,
        "out"_a, "states"_a);
  m.def("selective_scan_bwd", &memorymamba::selective_scan_bwd,
        "Selective scan backward; float32 grads (dA, dB, dC, dD, ddelta_bias) must be zero-filled.",
        "u"_a, "delta"_a, "A"_a, "B"_a, "C"_a, "D"_a, "z"_a, "delta_bias"_a, "delta_softplus"_a,
        "states"_a, "dout"_a, "du"_a, "ddelta"_a, "dA"_a, "dB"_a, "dC"_a, "dD"_a,
        "ddelta_bias"_a, "dz"_a);
}
