// Fused memory attention: input checks, the CPU kernels, and the Python bindings.
//
// CPU: one task per sample (at::parallel_for over the batch) pools F~ and runs every enabled network
// with the MM_HD arithmetic of memory_attention.h; backward kernel 2 runs one task per range of
// parameter elements, each summing over the batch in order. Every sum has a fixed order, so results
// are bitwise identical for any thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "common/cpu_vec.h"
#include "common/registry.h"
#include "common/dispatch.h"
#include "memory_attention/memory_attention.h"

#ifdef MEMORYMAMBA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace mattn {

#ifdef MEMORYMAMBA_WITH_CUDA
// Defined in memory_attention_cuda.cu.
void fwd_cuda(const FwdParams& p, at::ScalarType dtype);
void bwd_cuda(const BwdParams& p);
#endif

namespace {

// Scratch of one CPU task (one sample at a time).
struct Scratch {
  std::vector<float> pre, hid, h, a, v, gv, da;
  Scratch(int D, int hd, int m) : pre(hd), hid(hd), h(m), a(m), v(D), gv(D), da(m) {}
};

// v = a @ M, cells outer so the inner loop runs along contiguous rows of M (each v[d] still sums
// over the cells in order).
MM_CPU_VEC void readout(const float* __restrict__ a, const float* __restrict__ M, int m, int D,
                        float* __restrict__ v) {
  for (int d = 0; d < D; ++d) v[d] = 0.f;
  for (int i = 0; i < m; ++i)
    for (int d = 0; d < D; ++d) v[d] += a[i] * M[int64_t(i) * D + d];
}

// dst[:] = sum_b x[b*xs] * y[b*ys + :] over n columns, b = 0..B-1 in order for every element (the
// order of batch_dot, which the GPU runs per element), vectorised along the columns.
MM_CPU_VEC void batch_outer_row(const float* __restrict__ x, int64_t xs, const float* __restrict__ y, int64_t ys,
                                int B, int n, float* __restrict__ dst) {
  for (int d = 0; d < n; ++d) dst[d] = 0.f;
  for (int b = 0; b < B; ++b) {
    const float xb = x[b * xs];
    const float* __restrict__ yb = y + b * ys;
    for (int d = 0; d < n; ++d) dst[d] += xb * yb[d];
  }
}

// pre, hid, h, a, v of network k for the pooled p of one sample; returns beta, sums in `s`.
float net_forward(const FwdParams& P, int k, const float* p, Scratch& t, SimSums& s) {
  const NetParams& n = P.net[k];
  const int D = P.dim, Hd = n.hidden, m = n.cells;
  // Dot products in a fixed order that vectorises (a plain float sum is left scalar by the compiler).
  for (int j = 0; j < Hd; ++j) {
    t.pre[j] = memorymamba::mm_dot(n.w1 + int64_t(j) * D, p, D) + (n.b1 ? n.b1[j] : 0.f);
    t.hid[j] = gelu(t.pre[j]);
  }
  float hmax = -INFINITY;
  for (int i = 0; i < m; ++i) {
    t.h[i] = memorymamba::mm_dot(n.w2 + int64_t(i) * Hd, t.hid.data(), Hd) + (n.b2 ? n.b2[i] : 0.f);
    hmax = fmaxf(hmax, t.h[i]);
  }
  float z = 0.f;
  for (int i = 0; i < m; ++i) z += (t.a[i] = expf(t.h[i] - hmax));
  for (int i = 0; i < m; ++i) t.a[i] /= z;
  readout(t.a.data(), n.memory, m, D, t.v.data());
  s = {0.f, 0.f, 0.f};
  for (int d = 0; d < D; ++d) sim_accumulate(P.similarity, t.v[d], p[d], s);
  return sim_value(P.similarity, s, D);
}

// Mean of one (H, W) plane; 8 interleaved partial sums on contiguous rows so the loop vectorises.
template <typename T>
float pool_plane(const T* x, const FwdParams& P) {
  const int64_t H = P.height, W = P.width, hs = P.f_h_stride, ws = P.f_w_stride;
  float total = 0.f;
  if (ws == 1 && hs == W) {
    const int64_t L = H * W;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t l = 0;
    for (; l + 8 <= L; l += 8)
      for (int j = 0; j < 8; ++j) acc[j] += static_cast<float>(x[l + j]);
    for (; l < L; ++l) total += static_cast<float>(x[l]);
    for (int j = 0; j < 8; ++j) total += acc[j];
  } else {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) total += static_cast<float>(x[h * hs + w * ws]);
  }
  return total / float(H * W);
}

int max_hidden(const FwdParams& P) {
  int v = 1;
  for (int k = 0; k < P.n_nets; ++k) v = std::max(v, P.net[k].hidden);
  return v;
}

int max_cells(const FwdParams& P) {
  int v = 1;
  for (int k = 0; k < P.n_nets; ++k) v = std::max(v, P.net[k].cells);
  return v;
}

template <typename T>
void fwd_cpu(const FwdParams& P) {
  const int D = P.dim;
  at::parallel_for(0, P.batch, 1, [&](int64_t b0, int64_t b1) {
    memorymamba::FlushDenormals ftz;
    Scratch t(D, max_hidden(P), max_cells(P));
    for (int64_t b = b0; b < b1; ++b) {
      const T* f = static_cast<const T*>(P.f) + b * P.f_batch_stride;
      float* p = P.p + b * D;
      for (int d = 0; d < D; ++d) p[d] = pool_plane(f + d * P.f_dim_stride, P);
      for (int k = 0; k < P.n_nets; ++k) {
        const NetParams& n = P.net[k];
        SimSums s;
        const float beta = net_forward(P, k, p, t, s);
        T* w = static_cast<T*>(n.w) + b * D;
        T* v = static_cast<T*>(n.v) + b * D;
        T* h = static_cast<T*>(n.h) + b * n.cells;
        for (int d = 0; d < D; ++d) {
          w[d] = static_cast<T>(beta * t.v[d]);
          v[d] = static_cast<T>(t.v[d]);
        }
        for (int i = 0; i < n.cells; ++i) h[i] = static_cast<T>(t.h[i]);
      }
    }
  });
}

void bwd_cpu(const BwdParams& P) {
  const int D = P.dim;
  at::parallel_for(0, P.batch, 1, [&](int64_t b0, int64_t b1) {
    memorymamba::FlushDenormals ftz;
    Scratch t(D, max_hidden(P), max_cells(P));
    std::vector<float> dp(D);
    for (int64_t b = b0; b < b1; ++b) {
      const float* p = P.p + b * D;
      for (int d = 0; d < D; ++d) dp[d] = P.dp_in ? P.dp_in[b * D + d] : 0.f;
      for (int k = 0; k < P.n_nets; ++k) {
        const NetParams& n = P.net[k];
        const NetGrads& g = P.grad[k];
        const int Hd = n.hidden, m = n.cells;
        SimSums s;
        const float beta = net_forward(P, k, p, t, s);
        const float* dw = g.dw ? g.dw + b * D : nullptr;
        const float* dv = g.dv ? g.dv + b * D : nullptr;
        float dbeta = 0.f;
        if (dw) dbeta = memorymamba::mm_dot(dw, t.v.data(), D);
        float* gv = g.g_v + b * D;
        for (int d = 0; d < D; ++d) {
          float sv, sp;
          sim_grad(P.similarity, t.v[d], p[d], s, beta, D, sv, sp);
          gv[d] = (dv ? dv[d] : 0.f) + (dw ? beta * dw[d] : 0.f) + dbeta * sv;
          dp[d] += dbeta * sp;
        }
        float a_dot_da = 0.f;
        for (int i = 0; i < m; ++i) {
          t.da[i] = memorymamba::mm_dot(n.memory + int64_t(i) * D, gv, D);
          a_dot_da += t.a[i] * t.da[i];
        }
        float* gh = g.g_h + b * m;
        for (int i = 0; i < m; ++i) {
          gh[i] = softmax_grad(t.a[i], t.da[i], a_dot_da) + (g.dh ? g.dh[b * m + i] : 0.f);
          g.a[b * m + i] = t.a[i];
        }
        float* gpre = g.g_pre + b * Hd;
        for (int j = 0; j < Hd; ++j) {
          float acc = 0.f;
          for (int i = 0; i < m; ++i) acc += n.w2[int64_t(i) * Hd + j] * gh[i];
          gpre[j] = acc * gelu_grad(t.pre[j]);
          g.hid[b * Hd + j] = t.hid[j];
        }
        for (int j = 0; j < Hd; ++j) {
          const float* row = n.w1 + int64_t(j) * D;
          for (int d = 0; d < D; ++d) dp[d] += row[d] * gpre[j];
        }
      }
      for (int d = 0; d < D; ++d) P.dp[b * D + d] = dp[d] * P.dp_scale;
    }
  });
  for (int k = 0; k < P.n_nets; ++k) {
    const NetParams& n = P.net[k];
    const NetGrads& g = P.grad[k];
    const int Hd = n.hidden, m = n.cells;
    // The two D-wide matrices row by row (vectorised along D); the small middle part
    // (db1, dw2, db2) element by element as on the GPU. Every element sums b = 0..B-1 in order.
    at::parallel_for(0, Hd + m, 1, [&](int64_t r0, int64_t r1) {
      memorymamba::FlushDenormals ftz;
      for (int64_t r = r0; r < r1; ++r) {
        if (r < Hd)
          batch_outer_row(g.g_pre + r, Hd, P.p, D, P.batch, D, g.dw1 + r * D);
        else
          batch_outer_row(g.a + (r - Hd), m, g.g_v, D, P.batch, D, g.dmemory + (r - Hd) * D);
      }
    });
    const int64_t mid0 = int64_t(Hd) * D, mid1 = mid0 + Hd + int64_t(m) * Hd + m;
    at::parallel_for(mid0, mid1, 256, [&](int64_t e0, int64_t e1) {
      memorymamba::FlushDenormals ftz;
      for (int64_t e = e0; e < e1; ++e) reduce_param_element(P, k, e);
    });
  }
}

// ---- checks ------------------------------------------------------------------------------------

std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// An fp32 contiguous tensor of the given shape on `dev`; `rule` spells the shape in words.
void check_f32(const at::Tensor& t, const std::string& name, std::vector<int64_t> shape, at::Device dev,
               const char* rule) {
  MM_CHECK(t.defined(), name, " is required");
  MM_CHECK(t.sizes() == at::IntArrayRef(shape), name, " must have shape ", rule, " = ", shape_str(shape),
           ", got ", shape_str(t.sizes()));
  MM_CHECK(t.device() == dev, name, " must be on ", dev, " (f_tilde's device), got ", t.device());
  MM_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  MM_CHECK(t.is_contiguous(), name, " must be contiguous");
}

const float* opt_f32(const c10::optional<at::Tensor>& t, const std::string& name, std::vector<int64_t> shape,
                     at::Device dev, const char* rule) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_f32(*t, name, std::move(shape), dev, rule);
  return t->data_ptr<float>();
}

const at::Tensor& need(const std::vector<c10::optional<at::Tensor>>& v, size_t i, const std::string& name) {
  MM_CHECK(v[i].has_value() && v[i]->defined(), name, " is required");
  return *v[i];
}

// Parameters of network k from its argument list [w1, b1, w2, b2, memory, ...].
void fill_net(NetParams& n, const std::vector<c10::optional<at::Tensor>>& a, const std::string& tag, int64_t D,
              at::Device dev) {
  const at::Tensor& w1 = need(a, 0, tag + ".w1");
  MM_CHECK(w1.dim() == 2 && w1.size(0) >= 1, tag, ".w1 must have shape (hidden, dim) with hidden >= 1, got ",
           shape_str(w1.sizes()));
  const int64_t Hd = w1.size(0);
  const at::Tensor& w2 = need(a, 2, tag + ".w2");
  MM_CHECK(w2.dim() == 2 && w2.size(0) >= 1, tag, ".w2 must have shape (cells, hidden) with cells >= 1, got ",
           shape_str(w2.sizes()));
  const int64_t m = w2.size(0);
  check_f32(w1, tag + ".w1", {Hd, D}, dev, "(hidden, dim)");
  check_f32(w2, tag + ".w2", {m, Hd}, dev, "(cells, hidden)");
  check_f32(need(a, 4, tag + ".memory"), tag + ".memory", {m, D}, dev, "(cells, dim)");
  n.w1 = w1.data_ptr<float>();
  n.b1 = opt_f32(a[1], tag + ".b1", {Hd}, dev, "(hidden,)");
  n.w2 = w2.data_ptr<float>();
  n.b2 = opt_f32(a[3], tag + ".b2", {m}, dev, "(cells,)");
  n.memory = a[4]->data_ptr<float>();
  n.hidden = int(Hd);
  n.cells = int(m);
}

void fill_common(FwdParams& P, int64_t B, int64_t D, int similarity, size_t n_nets) {
  MM_CHECK(similarity >= kCosine && similarity <= kL2, "similarity must be 0 (cosine), 1 (l1) or 2 (l2), got ",
           similarity);
  MM_CHECK(n_nets <= size_t(kMaxNets), "at most ", kMaxNets, " memory networks, got ", n_nets);
  MM_CHECK(B <= INT32_MAX && D <= INT32_MAX, "batch and dim must fit in int32");
  P.batch = int(B);
  P.dim = int(D);
  P.similarity = similarity;
  P.n_nets = int(n_nets);
}

constexpr const char* kNetNames[kMaxNets] = {"nets[0]", "nets[1]"};

// f: F~ (B, D, H, W) fp32/fp16/bf16, any strides. p: (B, D) fp32 out. nets: per network
// [w1, b1 | None, w2, b2 | None, memory, w, h, v] with w, v (B, D), h (B, cells) outputs in f's dtype.
void fwd(const at::Tensor& f, at::Tensor& p, int64_t similarity,
         const std::vector<std::vector<c10::optional<at::Tensor>>>& nets) {
  MM_CHECK(f.dim() == 4, "f_tilde must have shape (batch, dim, height, width), got ", shape_str(f.sizes()));
  const int64_t B = f.size(0), D = f.size(1), H = f.size(2), W = f.size(3);
  MM_CHECK(B >= 1 && D >= 1 && H >= 1 && W >= 1, "f_tilde must have no empty dimension, got ", shape_str(f.sizes()));
  const auto dev = f.device();
  FwdParams P{};
  fill_common(P, B, D, int(similarity), nets.size());
  MM_CHECK(H * W <= INT32_MAX, "height*width must fit in int32, got ", H * W);
  P.height = int(H);
  P.width = int(W);
  P.f_batch_stride = f.stride(0); P.f_dim_stride = f.stride(1);
  P.f_h_stride = f.stride(2); P.f_w_stride = f.stride(3);
  P.f = f.data_ptr();
  check_f32(p, "p", {B, D}, dev, "(batch, dim)");
  P.p = p.data_ptr<float>();
  for (size_t k = 0; k < nets.size(); ++k) {
    const std::string tag = kNetNames[k];
    MM_CHECK(nets[k].size() == 8, tag, " must be [w1, b1, w2, b2, memory, w, h, v], got ", nets[k].size(), " items");
    NetParams& n = P.net[k];
    fill_net(n, nets[k], tag, D, dev);
    const std::vector<int64_t> bd{B, D}, bm{B, n.cells};
    const char* names[3] = {".w", ".h", ".v"};
    void* outs[3];
    for (int o = 0; o < 3; ++o) {
      const at::Tensor& t = need(nets[k], 5 + o, tag + names[o]);
      const auto& shape = o == 1 ? bm : bd;
      MM_CHECK(t.sizes() == at::IntArrayRef(shape), tag, names[o], " must have shape ", shape_str(shape), ", got ",
               shape_str(t.sizes()));
      MM_CHECK(t.scalar_type() == f.scalar_type() && t.is_contiguous() && t.device() == dev, tag, names[o],
               " must be contiguous with f_tilde's dtype ", f.scalar_type(), " and device");
      outs[o] = t.data_ptr();
    }
    n.w = outs[0];
    n.h = outs[1];
    n.v = outs[2];
  }
  if (f.is_cuda()) {
#ifdef MEMORYMAMBA_WITH_CUDA
    c10::cuda::CUDAGuard guard(dev);
    fwd_cuda(P, f.scalar_type());
    return;
#else
    MM_CHECK(false, "memorymamba._C was built without CUDA kernels; f_tilde is on ", dev);
#endif
  }
  MM_DISPATCH_FLOAT_TYPES(f.scalar_type(), scalar_t, "memory_attention_fwd: f_tilde", [&] { fwd_cpu<scalar_t>(P); });
}

// p: saved fp32 pooled features (B, D); dp_in: grad of the returned p or None; dp: (B, D) fp32 out,
// total dL/dp times dp_scale. nets: per network [w1, b1, w2, b2, memory, dw, dh, dv, dw1, db1, dw2,
// db2, dmemory]: incoming grads dw, dh, dv fp32 or None; parameter grads fp32 outputs (db1/db2 None
// when the network has no bias).
void bwd(const at::Tensor& p, const c10::optional<at::Tensor>& dp_in, at::Tensor& dp, double dp_scale,
         int64_t similarity, const std::vector<std::vector<c10::optional<at::Tensor>>>& nets) {
  MM_CHECK(p.dim() == 2, "p must have shape (batch, dim), got ", shape_str(p.sizes()));
  const int64_t B = p.size(0), D = p.size(1);
  const auto dev = p.device();
  BwdParams P{};
  fill_common(P, B, D, int(similarity), nets.size());
  check_f32(p, "p", {B, D}, dev, "(batch, dim)");
  P.p = p.data_ptr<float>();
  P.dp_in = opt_f32(dp_in, "dp_in", {B, D}, dev, "(batch, dim)");
  check_f32(dp, "dp", {B, D}, dev, "(batch, dim)");
  P.dp = dp.data_ptr<float>();
  P.dp_scale = float(dp_scale);
  std::vector<at::Tensor> scratch;
  for (size_t k = 0; k < nets.size(); ++k) {
    const std::string tag = kNetNames[k];
    const auto& a = nets[k];
    MM_CHECK(a.size() == 13, tag, " must be [w1, b1, w2, b2, memory, dw, dh, dv, dw1, db1, dw2, db2, dmemory], got ",
             a.size(), " items");
    NetParams& n = P.net[k];
    fill_net(n, a, tag, D, dev);
    const int64_t Hd = n.hidden, m = n.cells;
    NetGrads& g = P.grad[k];
    g.dw = opt_f32(a[5], tag + ".dw", {B, D}, dev, "(batch, dim)");
    g.dh = opt_f32(a[6], tag + ".dh", {B, m}, dev, "(batch, cells)");
    g.dv = opt_f32(a[7], tag + ".dv", {B, D}, dev, "(batch, dim)");
    check_f32(need(a, 8, tag + ".dw1"), tag + ".dw1", {Hd, D}, dev, "(hidden, dim)");
    check_f32(need(a, 10, tag + ".dw2"), tag + ".dw2", {m, Hd}, dev, "(cells, hidden)");
    check_f32(need(a, 12, tag + ".dmemory"), tag + ".dmemory", {m, D}, dev, "(cells, dim)");
    g.dw1 = a[8]->data_ptr<float>();
    g.dw2 = a[10]->data_ptr<float>();
    g.dmemory = a[12]->data_ptr<float>();
    g.db1 = const_cast<float*>(opt_f32(a[9], tag + ".db1", {Hd}, dev, "(hidden,)"));
    g.db2 = const_cast<float*>(opt_f32(a[11], tag + ".db2", {m}, dev, "(cells,)"));
    MM_CHECK((g.db1 != nullptr) == (n.b1 != nullptr), tag, ".db1 must be given exactly when b1 is");
    MM_CHECK((g.db2 != nullptr) == (n.b2 != nullptr), tag, ".db2 must be given exactly when b2 is");
    // Per-sample vectors of kernel 1, reduced over the batch by kernel 2.
    at::Tensor buf = at::empty({B * (2 * Hd + 2 * m + D)}, p.options());
    scratch.push_back(buf);
    float* s = buf.data_ptr<float>();
    g.g_pre = s; s += B * Hd;
    g.hid = s; s += B * Hd;
    g.g_h = s; s += B * m;
    g.a = s; s += B * m;
    g.g_v = s;
  }
  if (p.is_cuda()) {
#ifdef MEMORYMAMBA_WITH_CUDA
    c10::cuda::CUDAGuard guard(dev);
    bwd_cuda(P);
    return;
#else
    MM_CHECK(false, "memorymamba._C was built without CUDA kernels; p is on ", dev);
#endif
  }
  bwd_cpu(P);
}

}  // namespace
}  // namespace mattn

void bind_memory_attention(pybind11::module_& m) {
  m.def("memory_attention_fwd", &mattn::fwd, "fused pooling + memory attention, forward");
  m.def("memory_attention_bwd", &mattn::bwd, "fused pooling + memory attention, backward");
  m.attr("mattn_max_nets") = mattn::kMaxNets;
}
