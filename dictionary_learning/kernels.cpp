// CPU kernels for grads.sparse_grads (loaded by kernels.py; grads.py has the same math in torch ops).
// Each fuses passes that torch would make separately over the same memory; every output element is
// summed in a fixed order whatever the thread count, so results are deterministic.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <optional>
#include <tuple>
#include <vector>

using at::Tensor;

#define SAE_CHECK(cond, ...) TORCH_CHECK(cond, "sae kernels: ", __VA_ARGS__)

// fn(begin, end) over [0, n) in chunks of `grain`, handed out to torch's threads as they come free
// (OpenMP dynamic schedule): on a shared CPU a descheduled thread does not hold up the others, as
// with a static split. The first exception is re-thrown after the loop.
template <class Fn>
static void parallel_chunks(int64_t n, int64_t grain, const Fn& fn) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int threads = int(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(chunks, 1)));
  std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (chunks > 1 && !at::in_parallel_region())
  for (int64_t c = 0; c < chunks; ++c) {
    try {
      fn(c * grain, std::min(n, (c + 1) * grain));
    } catch (...) {
#pragma omp critical(sae_kernels_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

static void check_f32(const Tensor& t, const char* name, int64_t ndim) {
  SAE_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == ndim,
            name, " must be a contiguous fp32 CPU tensor with ", ndim, " dims");
}

// Prefetch distance in bag, in pairs (8 and more measured slower: too many cache lines in flight).
// idx: contiguous int32 [n]; offsets: contiguous [N + 1] of T, 0 = offsets[0] <= ... <= offsets[N] = n.
static void check_pairs(const Tensor& idx, int64_t n, const char* name) {
  SAE_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kInt && idx.is_contiguous() && idx.dim() == 1 &&
                idx.size(0) == n,
            name, " must be a contiguous int32 CPU tensor [", n, "]");
}

template <class T>
static const T* check_offsets(const Tensor& offsets, int64_t N, int64_t n, const char* name) {
  SAE_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == c10::CppTypeToScalarType<T>::value &&
                offsets.is_contiguous() && offsets.dim() == 1 && offsets.size(0) == N + 1,
            name, " must be a contiguous ", sizeof(T) == 4 ? "int32" : "int64", " CPU tensor [", N + 1, "]");
  const T* O = offsets.data_ptr<T>();
  SAE_CHECK(O[0] == 0 && O[N] == n, name, " must run from 0 to the number of pairs, ", n);
  for (int64_t i = 0; i < N; ++i) SAE_CHECK(O[i] <= O[i + 1], name, " must not decrease");
  return O;
}

constexpr int64_t AHEAD = 4;

// a · b over d floats: four independent chains of 16-wide partial sums (no single FMA dependency
// chain), added as vectors, then across the 16 lanes.
static inline float dot(const float* a, const float* b, int64_t d) {
  int64_t k0 = 0;
#if defined(__AVX512F__)
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (; k0 + 64 <= d; k0 += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k0), _mm512_loadu_ps(b + k0), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k0 + 16), _mm512_loadu_ps(b + k0 + 16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k0 + 32), _mm512_loadu_ps(b + k0 + 32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k0 + 48), _mm512_loadu_ps(b + k0 + 48), s3);
  }
  for (; k0 + 16 <= d; k0 += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k0), _mm512_loadu_ps(b + k0), s0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#else
  float acc[16] = {};
  for (; k0 + 16 <= d; k0 += 16) {
#pragma omp simd
    for (int k = 0; k < 16; ++k) acc[k] += a[k0 + k] * b[k0 + k];
  }
  float s = 0.f;
  for (int k = 0; k < 16; ++k) s += acc[k];
#endif
  for (; k0 < d; ++k0) s += a[k0] * b[k0];
  return s;
}

static inline void prefetch_row(const float* row, int64_t d) {
  const char* c = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < d * int64_t(sizeof(float)); off += 64) __builtin_prefetch(c + off);
}

// out[0:d] = init (or 0) + Σ_{p in [p0, p1)} w[p] · src[idx[p]] (rows of src [·, d]), summed in pair
// order. Pairs with w = 0 are added too, as embedding_bag does: 0 · a NaN or inf row is NaN, and must
// reach the loss. Four rows are added per pass over out (out stays in L1, its loads and stores shared
// by four rows), and the row AHEAD pairs on is prefetched: the rows are scattered over src.
static inline void bag(const float* src, int64_t d, const int32_t* idx, const float* w, int64_t p0, int64_t p1,
                       const float* init, float* out) {
  if (init)
    std::copy(init, init + d, out);
  else
    std::fill(out, out + d, 0.f);
  for (int64_t p = p0; p < std::min(p1, p0 + AHEAD); ++p) prefetch_row(src + int64_t(idx[p]) * d, d);
  const float* r[4];
  float c[4];
  int n = 0;
  for (int64_t p = p0; p < p1; ++p) {
    if (p + AHEAD < p1) prefetch_row(src + int64_t(idx[p + AHEAD]) * d, d);
    r[n] = src + int64_t(idx[p]) * d;
    c[n] = w[p];
    if (++n < 4) continue;
    n = 0;
    const float *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
    const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) out[k] = (((out[k] + c0 * r0[k]) + c1 * r1[k]) + c2 * r2[k]) + c3 * r3[k];
  }
  for (int i = 0; i < n; ++i) {
    const float *ri = r[i], ci = c[i];
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) out[k] += ci * ri[k];
  }
}

// Bit k set where a[k] > b[k], k < 16 (false for NaN).
static inline uint32_t gt_mask16(const float* a, const float* b) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(a), _mm512_loadu_ps(b), _CMP_GT_OQ);
#elif defined(__AVX__)
  const auto lo = _mm256_cmp_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b), _CMP_GT_OQ);
  const auto hi = _mm256_cmp_ps(_mm256_loadu_ps(a + 8), _mm256_loadu_ps(b + 8), _CMP_GT_OQ);
  return uint32_t(_mm256_movemask_ps(lo)) | uint32_t(_mm256_movemask_ps(hi)) << 8;
#else
  uint32_t mask = 0;
  for (int k = 0; k < 16; ++k) mask |= uint32_t(a[k] > b[k]) << k;
  return mask;
#endif
}

// Pairs (b, j) of xW [B, m] with xW[b, j] > lo[j] (and < hi[j] if hi is given), in row-major order:
// (rows int32, cols int32, values xW[b, j], n). n = -1 (and empty tensors) as soon as more than
// max_count are found (max_count < 0: no limit). One pass over xW, in blocks of rows per thread that
// keep only the columns; rows and values are filled in when the blocks are joined.
std::tuple<Tensor, Tensor, Tensor, int64_t> candidates(const Tensor& xW, const Tensor& lo,
                                                       const std::optional<Tensor>& hi, int64_t max_count) {
  check_f32(xW, "xW", 2);
  check_f32(lo, "lo", 1);
  const int64_t B = xW.size(0), m = xW.size(1);
  SAE_CHECK(lo.size(0) == m && (!hi || (check_f32(*hi, "hi", 1), hi->size(0) == m)), "lo/hi must be [m]");
  SAE_CHECK(B < (int64_t(1) << 31) && m < (int64_t(1) << 31), "xW has more than 2^31 rows or columns");
  const float *X = xW.data_ptr<float>(), *L = lo.data_ptr<float>(), *H = hi ? hi->data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(m, 1));  // ~256 KB of xW
  const int64_t n_blocks = (B + grain - 1) / grain;
  std::vector<std::vector<int32_t>> cols(n_blocks);
  std::vector<int64_t> per_row(B, 0);
  std::atomic<int64_t> found{0};
  parallel_chunks(n_blocks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      if (max_count >= 0 && found.load(std::memory_order_relaxed) > max_count) return;
      auto& cc = cols[c];
      for (int64_t b = c * grain; b < std::min(B, (c + 1) * grain); ++b) {
        const float* row = X + b * m;
        const size_t before = cc.size();
        int64_t j0 = 0;
        for (; j0 + 16 <= m; j0 += 16) {  // 16 compares -> a bit mask; most masks are 0
          uint32_t mask = gt_mask16(row + j0, L + j0);
          if (H && mask) mask &= gt_mask16(H + j0, row + j0);
          for (; mask; mask &= mask - 1) cc.push_back(int32_t(j0 + __builtin_ctz(mask)));
        }
        for (int64_t j = j0; j < m; ++j)
          if (row[j] > L[j] && (!H || row[j] < H[j])) cc.push_back(int32_t(j));
        per_row[b] = int64_t(cc.size() - before);
      }
      found.fetch_add(int64_t(cc.size()), std::memory_order_relaxed);
    }
  });
  const auto i32 = xW.options().dtype(at::kInt);
  if (max_count >= 0 && found.load() > max_count)
    return {at::empty({0}, i32), at::empty({0}, i32), at::empty({0}, xW.options()), -1};
  std::vector<int64_t> start(n_blocks + 1, 0);
  for (int64_t c = 0; c < n_blocks; ++c) start[c + 1] = start[c] + int64_t(cols[c].size());
  const int64_t n = start[n_blocks];
  Tensor r = at::empty({n}, i32), k = at::empty({n}, i32), v = at::empty({n}, xW.options());
  int32_t *pr = r.data_ptr<int32_t>(), *pk = k.data_ptr<int32_t>();
  float* pv = v.data_ptr<float>();
  parallel_chunks(n_blocks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t p = start[c];
      std::copy(cols[c].begin(), cols[c].end(), pk + p);
      std::vector<int32_t>().swap(cols[c]);
      for (int64_t b = c * grain; b < std::min(B, (c + 1) * grain); ++b)
        for (const int64_t end = p + per_row[b]; p < end; ++p) {
          pr[p] = int32_t(b);
          pv[p] = X[b * m + pk[p]];
        }
    }
  });
  return {r, k, v, n};
}

// Weighted bags into out [N, d] (overwritten): out[i] = Σ_{p in offsets[i]..offsets[i+1]} w[p] · src[idx[p]],
// summed in pair order (embedding_bag's sums, with no temporary and no copy).
void bags(const Tensor& offsets, const Tensor& idx, const Tensor& w, const Tensor& src, Tensor out) {
  check_f32(w, "w", 1);
  check_f32(src, "src", 2);
  check_f32(out, "out", 2);
  const int64_t N = out.size(0), d = out.size(1), n = w.size(0), rows = src.size(0);
  SAE_CHECK(src.size(1) == d, "src and out must have the same row length");
  check_pairs(idx, n, "idx");
  const int32_t* O = check_offsets<int32_t>(offsets, N, n, "offsets");
  const int32_t* I = idx.data_ptr<int32_t>();
  const float *W = w.data_ptr<float>(), *S = src.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  parallel_chunks(N, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t p = O[i]; p < O[i + 1]; ++p) SAE_CHECK(I[p] >= 0 && I[p] < rows, "row index out of range");
      bag(S, d, I, W, O[i], O[i + 1], nullptr, out_p + i * d);
    }
  });
}

// The pairs re-ordered by latent, stably (a counting sort): cols int32 [n] in [0, m), values a list
// of [n] tensors of 4-byte elements -> (offsets int32 [m + 1], the values permuted).
std::tuple<Tensor, std::vector<Tensor>> by_latent(const Tensor& cols, int64_t m, const std::vector<Tensor>& values) {
  const int64_t n = cols.size(0);
  check_pairs(cols, n, "cols");
  SAE_CHECK(n < (int64_t(1) << 31), "more than 2^31 pairs");
  const int32_t* K = cols.data_ptr<int32_t>();
  Tensor offsets = at::zeros({m + 1}, cols.options());
  int32_t* O = offsets.data_ptr<int32_t>();
  for (int64_t p = 0; p < n; ++p) {
    SAE_CHECK(K[p] >= 0 && K[p] < m, "latent index out of range");
    ++O[K[p] + 1];
  }
  for (int64_t j = 0; j < m; ++j) O[j + 1] += O[j];
  std::vector<Tensor> out;
  std::vector<int32_t> next(m);
  for (const auto& t : values) {
    SAE_CHECK(t.is_contiguous() && t.dim() == 1 && t.size(0) == n && t.element_size() == 4 && t.device().is_cpu(),
              "values must be contiguous 4-byte [n] CPU tensors");
    Tensor o = at::empty_like(t);
    const int32_t* src = static_cast<const int32_t*>(t.data_ptr());
    int32_t* dst = static_cast<int32_t*>(o.data_ptr());
    std::copy(O, O + m, next.begin());
    for (int64_t p = 0; p < n; ++p) dst[next[K[p]]++] = src[p];
    out.push_back(o);
  }
  return {offsets, out};
}

// Per token b (pairs t_offsets[b]..t_offsets[b+1], latents cols, feature values f):
//   x_hat[b] = b_dec + Σ_p f[p] W_dec[cols[p]],  err[b] = x_hat[b] − x[b],
//   g_f[p] = scale · (err[b] · W_dec[cols[p]])   (∂L/∂f with ∂L/∂x̂ = scale · err)
// x_hat and err are written into the given [B, d] tensors; returns g_f [n]. The W_dec rows of a token
// are read twice in a row, the second time from cache.
Tensor decode_grad(const Tensor& t_offsets, const Tensor& cols, const Tensor& f, const Tensor& W_dec,
                   const Tensor& b_dec, const Tensor& x, double scale, Tensor x_hat, Tensor err) {
  check_f32(f, "f", 1);
  check_f32(W_dec, "W_dec", 2);
  check_f32(b_dec, "b_dec", 1);
  check_f32(x, "x", 2);
  check_f32(x_hat, "x_hat", 2);
  check_f32(err, "err", 2);
  const int64_t B = x.size(0), d = x.size(1), n = f.size(0), m = W_dec.size(0);
  SAE_CHECK(W_dec.size(1) == d && b_dec.size(0) == d && x_hat.sizes() == x.sizes() && err.sizes() == x.sizes(),
            "W_dec [m, d], b_dec [d], x_hat and err [B, d] must match x [B, d]");
  check_pairs(cols, n, "cols");
  const int64_t* T = check_offsets<int64_t>(t_offsets, B, n, "t_offsets");
  const int32_t* K = cols.data_ptr<int32_t>();
  const float *F = f.data_ptr<float>(), *W = W_dec.data_ptr<float>(), *bd = b_dec.data_ptr<float>(),
              *X = x.data_ptr<float>();
  float *XH = x_hat.data_ptr<float>(), *E = err.data_ptr<float>();
  Tensor g_f = at::empty({n}, f.options());
  float* G = g_f.data_ptr<float>();
  const float s = float(scale);
  parallel_chunks(B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t p = T[b]; p < T[b + 1]; ++p) SAE_CHECK(K[p] >= 0 && K[p] < m, "latent index out of range");
      float* acc = XH + b * d;
      bag(W, d, K, F, T[b], T[b + 1], bd, acc);
      float* e = E + b * d;
      const float* xb = X + b * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) e[k] = acc[k] - xb[k];
      for (int64_t p = T[b]; p < T[b + 1]; ++p) G[p] = s * dot(e, W + int64_t(K[p]) * d, d);
    }
  });
  return g_f;
}

// Unit-norm decoder rows (the decoder's rows are kept on the unit sphere):
//   remove_parallel: grad[j] −= (grad[j] · W[j]) W[j]   (the component that would change ‖W[j]‖)
//   normalize_rows:  W[j] /= ‖W[j]‖
// one row at a time, in place: the row is read from memory once and again from L1.
void remove_parallel(Tensor grad, const Tensor& W) {
  check_f32(grad, "grad", 2);
  check_f32(W, "W", 2);
  SAE_CHECK(grad.sizes() == W.sizes(), "grad and W must have the same shape");
  const int64_t m = W.size(0), d = W.size(1);
  float* G = grad.data_ptr<float>();
  const float* P = W.data_ptr<float>();
  parallel_chunks(m, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float *g = G + j * d;
      const float* w = P + j * d;
      const float c = dot(g, w, d);
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) g[k] -= c * w[k];
    }
  });
}

void normalize_rows(Tensor W) {
  check_f32(W, "W", 2);
  const int64_t m = W.size(0), d = W.size(1);
  float* P = W.data_ptr<float>();
  parallel_chunks(m, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float* w = P + j * d;
      const float inv = 1.f / std::sqrt(dot(w, w, d));
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) w[k] *= inv;
    }
  });
}

// Schemas here, CPU implementations below: the dispatcher then treats the (a!) arguments as in-place
// writes (version counters, no silent in-place writes to tensors that need grad).
TORCH_LIBRARY(sae_kernels, lib) {
  lib.def("candidates(Tensor xW, Tensor lo, Tensor? hi, int max_count) -> (Tensor, Tensor, Tensor, int)");
  lib.def("decode_grad(Tensor t_offsets, Tensor cols, Tensor f, Tensor W_dec, Tensor b_dec, Tensor x, "
          "float scale, Tensor(a!) x_hat, Tensor(b!) err) -> Tensor");
  lib.def("bags(Tensor offsets, Tensor idx, Tensor w, Tensor src, Tensor(a!) out) -> ()");
  lib.def("remove_parallel(Tensor(a!) grad, Tensor W) -> ()");
  lib.def("normalize_rows(Tensor(a!) W) -> ()");
  lib.def("by_latent(Tensor cols, int m, Tensor[] values) -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(sae_kernels, CPU, lib) {
  lib.impl("candidates", &candidates);
  lib.impl("decode_grad", &decode_grad);
  lib.impl("bags", &bags);
  lib.impl("remove_parallel", &remove_parallel);
  lib.impl("normalize_rows", &normalize_rows);
  lib.impl("by_latent", &by_latent);
}
