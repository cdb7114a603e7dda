// y [R, out] = x [R, in] @ w [out, in]^T (* scale [out]) for a few input rows, on x86-64 with AVX2 and FMA.
// w may also be a stack [G, out, in], the matrix chosen by an index operand (scale stays [out]): a scanned layer
// stack reads its layer's weights in place, where a slice of the stack would first be copied by XLA's CPU backend.
//
// Why: XLA's CPU matmul packs the whole weight matrix for 2..16 rows, so a verification forward over K tree
// nodes costs ~2.5 one-row steps although both read the same weight bytes. Here each stored weight row is read
// once, as one sequential stream, and meets up to 8 input rows held in L1 (int8 rows widened on the fly); the
// output rows are split over the kernels' own threads (cpu_workers.h). Each output is summed in the same order for
// every R and every feature tiling, so a row's result does not depend on how many rows share the call.
// The reference is jaxspec.ops.small_rows_matmul.small_rows_matmul_reference.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <functional>

#include "cpu_simd.h"
#include "cpu_workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// R input rows times one weight row over the features [begin, end), a multiple of 8 long: 8-lane partial sums
// carried in acc, so that a row split into feature tiles sums in the same order as an untiled one. Each step
// prefetches the same features of the next weight row, which is what the loop reads next (a prefetch past the
// last row does not fault).
template <int R, typename W>
inline void Span(const float* x, int64_t in, const W* w, int64_t begin, int64_t end, __m256* acc) {
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = acc[r];
  for (int64_t i = begin; i < end; i += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(w + in + i), _MM_HINT_T0);
    const __m256 wv = Load8(w + i);
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * in + i), wv, a[r]);
  }
  for (int r = 0; r < R; ++r) acc[r] = a[r];
}

template <typename W>
void SpanRows(int64_t rows, const float* x, int64_t in, const W* w, int64_t begin, int64_t end, __m256* acc) {
  for (int64_t r = 0; r < rows; r += 8) {
    const float* xr = x + r * in;
    switch (std::min<int64_t>(rows - r, 8)) {
      case 8: Span<8>(xr, in, w, begin, end, acc + r); break;
      case 7: Span<7>(xr, in, w, begin, end, acc + r); break;
      case 6: Span<6>(xr, in, w, begin, end, acc + r); break;
      case 5: Span<5>(xr, in, w, begin, end, acc + r); break;
      case 4: Span<4>(xr, in, w, begin, end, acc + r); break;
      case 3: Span<3>(xr, in, w, begin, end, acc + r); break;
      case 2: Span<2>(xr, in, w, begin, end, acc + r); break;
      default: Span<1>(xr, in, w, begin, end, acc + r); break;
    }
  }
}

constexpr int64_t kChunk = 64;  // output rows per task
constexpr int64_t kGroup = 16;  // input rows per pass (their sums live in acc)
constexpr int64_t kTileBytes = 20 << 10;  // the input rows' share of a 32 KB L1, per feature tile

// Output rows [lo, hi) for all input rows. One weight row at a time meets up to 8 input rows: the weights are
// read as one sequential stream. When the input rows do not fit in L1 (e.g. 8 rows of 1536 features), the
// features are cut into tiles that do, and each tile passes over all the chunk's weight rows.
template <typename W>
void Rows(const float* x, int64_t rows, const W* w, const float* scale, int64_t in, int64_t out, int64_t lo,
          int64_t hi, float* y) {
  alignas(32) __m256 acc[kChunk * kGroup];
  const int64_t body = in - in % 8;
  for (int64_t g = 0; g < rows; g += kGroup) {
    const int64_t n = std::min(kGroup, rows - g);
    const float* xg = x + g * in;
    // Equal tiles, each a multiple of 8 features, as few as fit: a short last tile would cost a pass of its own.
    const int64_t tiles = std::max<int64_t>(1, (n * body * 4 + kTileBytes - 1) / kTileBytes);
    const int64_t tile = std::max<int64_t>(8, (body / 8 + tiles - 1) / tiles * 8);
    for (int64_t k = 0; k < (hi - lo) * n; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t t = 0; t < body; t += tile)
      for (int64_t o = lo; o < hi; ++o) SpanRows(n, xg, in, w + o * in, t, std::min(body, t + tile), acc + (o - lo) * n);
    for (int64_t o = lo; o < hi; ++o)
      for (int64_t r = 0; r < n; ++r) {
        float sum = jaxspec::HorizontalSum(acc[(o - lo) * n + r]);
        for (int64_t i = body; i < in; ++i) sum += xg[r * in + i] * static_cast<float>(w[o * in + i]);
        y[(g + r) * out + o] = scale != nullptr ? sum * scale[o] : sum;
      }
  }
}

template <typename W>
void Run(const float* x, int64_t rows, const W* w, const float* scale, int64_t in, int64_t out, float* y) {
  const std::function<void(int64_t)> body = [&](int64_t c) {
    Rows(x, rows, w, scale, in, out, c * kChunk, std::min(out, (c + 1) * kChunk), y);
  };
  jaxspec::Workers::Get().Run((out + kChunk - 1) / kChunk, body);
}

ffi::Error SmallRowsMatmul(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::S32> index, ffi::ResultBuffer<ffi::F32> y, bool scaled) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const size_t rank = wd.size();
  if (xd.size() != 2 || (rank != 2 && rank != 3) || xd[1] != wd[rank - 1])
    return ffi::Error::InvalidArgument("small_rows_matmul: expected x [rows, in] and w [out, in] or [G, out, in]");
  const int64_t rows = xd[0], in = xd[1], out = wd[rank - 2];
  const int64_t stacked = rank == 3 ? wd[0] : 1;
  const int64_t g = rank == 3 ? index.typed_data()[0] : 0;
  if (g < 0 || g >= stacked)
    return ffi::Error::InvalidArgument("small_rows_matmul: stack index out of range");
  const int64_t offset = g * out * in;
  const float* s = scaled ? scale.typed_data() : nullptr;
  if (w.element_type() == ffi::F32)
    Run(x.typed_data(), rows, w.typed_data<float>() + offset, s, in, out, y->typed_data());
  else if (w.element_type() == ffi::S8)
    Run(x.typed_data(), rows, w.typed_data<int8_t>() + offset, s, in, out, y->typed_data());
  else
    return ffi::Error::InvalidArgument("small_rows_matmul: weights must be float32 or int8");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxspecSmallRowsMatmul, SmallRowsMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("scaled"));
