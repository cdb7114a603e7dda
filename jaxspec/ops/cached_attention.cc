// Attention of K new nodes over a KV cache, and over a block of tree nodes, on x86-64 with AVX2 and FMA:
// out[b, h, i] = softmax_j(q[b, h, i] . key_j * scale) value_j over the columns node i sees: cache columns
// j <= last[b, i] (and j > positions[b, i] - window with a window), then tree nodes j with tree_visible[b, i, j].
// A chain extend that wrote its nodes into the cache first has last = its positions and no tree block; a tree
// forward has last = length - 1 and its nodes as the tree block (ancestors visible).
//
// Why: in XLA's CPU program this is ~10 small ops per layer (a transposed copy of the keys, two reductions, the
// mask, the softmax), ~4.6 ms of a 30 ms SmolLM2 decode step although the cache is ~9 MB. Here each query row
// reads only its visible keys and values (not the padded tail), once, in one pass of scores, one of softmax
// weights and one of weighted values. A row's result depends on its own query, position, cache and tree block
// only, so it is the same whichever other rows share the call.
// The caches may also be a stack [G, B, Hkv, L, D] of a scanned layer stack's caches, the layer chosen by an
// index operand, read where it lies (a slice would be a copy per layer and step).
// The references are pallas_kernels.tree_attention's cached_chain_attention and tree_attention_reference
// (see jaxspec.ops.cached_attention).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <vector>

#include "cpu_simd.h"
#include "cpu_workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Dot(const float* a, const float* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = jaxspec::HorizontalSum(acc);
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// scores[j] = q . keys[j] * scale for n consecutive keys [n, d]. Four keys at a time: four independent chains of
// FMAs, where one key's chain would wait on each FMA's latency. Each score is summed in Dot's order.
void Scores(const float* q, const float* keys, int64_t n, int64_t d, float scale, float* scores) {
  const int64_t body = d - d % 8;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k0 = keys + j * d;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < body; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d + i), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * d + i), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * d + i), a3);
    }
    float sums[4] = {jaxspec::HorizontalSum(a0), jaxspec::HorizontalSum(a1), jaxspec::HorizontalSum(a2), jaxspec::HorizontalSum(a3)};
    for (int r = 0; r < 4; ++r) {
      for (int64_t i = body; i < d; ++i) sums[r] += q[i] * k0[r * d + i];
      scores[j + r] = sums[r] * scale;
    }
  }
  for (; j < n; ++j) scores[j] = Dot(q, keys + j * d, d) * scale;
}

// exp(x) for 8 lanes, x <= 0 (a score less the row's peak): x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// degree-6 Taylor polynomial (relative error ~2e-7, about float32's own), times 2^n built in the exponent bits.
// Lanes below -87 (weights under ~1e-38, as XLA's exp flushes them too) give 0. One pass over eight weights
// instead of eight calls of std::exp.
inline __m256 Exp8(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.0f);
  const __m256 tiny = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: r stays exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// weights[j] = exp(weights[j] - peak) for j < n; returns their sum (in 8 lane partial sums, then the tail).
float ExpShifted(float* weights, int64_t n, float peak) {
  const __m256 pv = _mm256_set1_ps(peak);
  __m256 sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 w = Exp8(_mm256_sub_ps(_mm256_loadu_ps(weights + j), pv));
    _mm256_storeu_ps(weights + j, w);
    sum = _mm256_add_ps(sum, w);
  }
  float total = jaxspec::HorizontalSum(sum);
  for (; j < n; ++j) {
    weights[j] = std::exp(weights[j] - peak);
    total += weights[j];
  }
  return total;
}

// out[0, d) += p * v[0, d)
inline void AddScaled(float p, const float* v, int64_t d, float* out) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
  for (; i < d; ++i) out[i] += p * v[i];
}

// out[0, d) += sum_j weights[j] * values[j] over n consecutive values [n, d], in order of j. The features go in
// slices of 64 whose sums stay in eight registers over all j (a sum kept in memory would wait on its own store).
void AddWeightedSum(const float* weights, const float* values, int64_t n, int64_t d, float* out) {
  const int64_t body = d - d % 8;
  for (int64_t f = 0; f < body; f += 64) {
    const int64_t lanes = std::min<int64_t>(8, (body - f) / 8);
    __m256 acc[8];
    for (int64_t r = 0; r < lanes; ++r) acc[r] = _mm256_loadu_ps(out + f + 8 * r);
    for (int64_t j = 0; j < n; ++j) {
      const __m256 w = _mm256_set1_ps(weights[j]);
      const float* v = values + j * d + f;
      for (int64_t r = 0; r < lanes; ++r) acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * r), acc[r]);
    }
    for (int64_t r = 0; r < lanes; ++r) _mm256_storeu_ps(out + f + 8 * r, acc[r]);
  }
  for (int64_t i = body; i < d; ++i)
    for (int64_t j = 0; j < n; ++j) out[i] += weights[j] * values[j * d + i];
}

// One query row: the cache columns [lo, hi] of one KV head (k, v: [L, d]) and the tree nodes j < t with
// visible[j] (kt, vt: [t, d]). No visible column at all (a position before the cache or past its window) weighs
// every cache and tree column equally, as the reference's masked softmax does.
void Row(const float* q, const float* k, const float* v, int64_t cache_len, int64_t lo, int64_t hi,
         const float* kt, const float* vt, int64_t t, const bool* visible, int64_t d, float scale,
         std::vector<float>& weights, float* out) {
  std::fill(out, out + d, 0.0f);
  const int64_t n_cache = std::max<int64_t>(0, hi - lo + 1);
  weights.assign(n_cache + t, 0.0f);
  Scores(q, k + lo * d, n_cache, d, scale, weights.data());
  float peak = -INFINITY;
  for (int64_t j = 0; j < n_cache; ++j) peak = std::max(peak, weights[j]);
  for (int64_t j = 0; j < t; ++j)
    if (visible[j]) {
      weights[n_cache + j] = Dot(q, kt + j * d, d) * scale;
      peak = std::max(peak, weights[n_cache + j]);
    }
  if (peak == -INFINITY) {
    for (int64_t j = 0; j < cache_len; ++j) AddScaled(1.0f, v + j * d, d, out);
    for (int64_t j = 0; j < t; ++j) AddScaled(1.0f, vt + j * d, d, out);
    for (int64_t i = 0; i < d; ++i) out[i] /= static_cast<float>(cache_len + t);
    return;
  }
  float total = ExpShifted(weights.data(), n_cache, peak);
  for (int64_t j = 0; j < t; ++j) {
    weights[n_cache + j] = visible[j] ? std::exp(weights[n_cache + j] - peak) : 0.0f;
    total += weights[n_cache + j];
  }
  AddWeightedSum(weights.data(), v + lo * d, n_cache, d, out);
  for (int64_t j = 0; j < t; ++j)
    if (visible[j]) AddScaled(weights[n_cache + j], vt + j * d, d, out);
  const float inverse = 1.0f / total;
  for (int64_t i = 0; i < d; ++i) out[i] *= inverse;
}

// Query rows (batch x heads x nodes) from which a call runs on the helper threads too. A one-token step of one
// batch row (SmolLM2: 9 rows, ~40 us) stays on the calling thread: a helper woken for it would then spin for a
// while beside XLA's own threads, which run the step's products.
constexpr int64_t kThreadedRows = 32;

bool SameDims(ffi::Span<const int64_t> a, std::initializer_list<int64_t> b) {
  return a.size() == b.size() && std::equal(b.begin(), b.end(), a.begin());
}

ffi::Error CachedAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::S32> last, ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::F32> k_tree,
                           ffi::Buffer<ffi::F32> v_tree, ffi::Buffer<ffi::PRED> tree_visible,
                           ffi::Buffer<ffi::S32> index, ffi::ResultBuffer<ffi::F32> out, float scale,
                           int64_t window) {
  const auto qd = q.dimensions();
  const auto full = k.dimensions();
  const auto td = k_tree.dimensions();
  const bool stack = full.size() == 5;
  if (full.size() != 4 && !stack)
    return ffi::Error::InvalidArgument("cached_attention: caches must be [B, Hkv, L, D] or [G, B, Hkv, L, D]");
  const ffi::Span<const int64_t> kd(full.begin() + (stack ? 1 : 0), 4);
  if (qd.size() != 4 || td.size() != 4 || kd[1] == 0 || qd[1] % kd[1] != 0)
    return ffi::Error::InvalidArgument("cached_attention: expected q [B, H, K, D], caches [B, Hkv, L, D] and tree "
                                       "keys [B, Hkv, T, D], H a multiple of Hkv");
  const int64_t batch = qd[0], heads = qd[1], nodes = qd[2], d = qd[3];
  const int64_t kv_heads = kd[1], cache_len = kd[2], t = td[2], group = heads / kv_heads;
  const int64_t stacked = stack ? full[0] : 1;
  const int64_t g = stack ? index.typed_data()[0] : 0;
  if (g < 0 || g >= stacked) return ffi::Error::InvalidArgument("cached_attention: stack index out of range");
  const auto vd = v.dimensions();
  if (vd.size() != full.size() || !std::equal(full.begin(), full.end(), vd.begin()) ||
      !SameDims(kd, {batch, kv_heads, cache_len, d}) || !SameDims(td, {batch, kv_heads, t, d}) || !SameDims(v_tree.dimensions(), {batch, kv_heads, t, d}) ||
      !SameDims(last.dimensions(), {batch, nodes}) || !SameDims(positions.dimensions(), {batch, nodes}) ||
      !SameDims(tree_visible.dimensions(), {batch, nodes, t}))
    return ffi::Error::InvalidArgument("cached_attention: operand shapes do not agree");
  const float* k_base = k.typed_data() + g * batch * kv_heads * cache_len * d;
  const float* v_base = v.typed_data() + g * batch * kv_heads * cache_len * d;
  const float* qp = q.typed_data();
  const int32_t* lastp = last.typed_data();
  const int32_t* pos = positions.typed_data();
  const bool* visible = tree_visible.typed_data();
  float* op = out->typed_data();
  // One chunk per (batch row, query head): all its nodes.
  const std::function<void(int64_t)> body = [&](int64_t chunk) {
    thread_local std::vector<float> weights;
    const int64_t b = chunk / heads, h = chunk % heads;
    const int64_t kv = b * kv_heads + h / group;
    const float* kc = k_base + kv * cache_len * d;
    const float* vc = v_base + kv * cache_len * d;
    const float* kt = k_tree.typed_data() + kv * t * d;
    const float* vt = v_tree.typed_data() + kv * t * d;
    for (int64_t i = 0; i < nodes; ++i) {
      const int64_t node = b * nodes + i;
      const int64_t hi = std::min<int64_t>(lastp[node], cache_len - 1);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos[node] - window + 1) : 0;
      Row(qp + (chunk * nodes + i) * d, kc, vc, cache_len, lo, hi, kt, vt, t, visible + node * t, d, scale, weights,
          op + (chunk * nodes + i) * d);
    }
  };
  const int64_t chunks = batch * heads;
  if (chunks * nodes < kThreadedRows) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
  } else {
    jaxspec::Workers::Get().Run(chunks, body);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxspecCachedAttention, CachedAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window"));
