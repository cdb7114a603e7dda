// y [R, out] = x [R, in] @ w [out, in]^T (* scale [out]) for a few input rows, on x86-64 with AVX2 and FMA.
//
// Why: XLA's CPU matmul packs the whole weight matrix for 2..16 rows, so a verification forward over K tree
// nodes costs ~2.5 one-row steps although both read the same weight bytes. Here each stored weight row is read
// once for all input rows (blocks of 2 output rows x 4 input rows in registers; int8 rows widened on the fly),
// and the output rows are split over XLA's intra-op thread pool. Each output is summed in the same order for
// every R, so a row's result does not depend on how many rows share the call.
// The reference is jaxspec.ops.small_rows_matmul.small_rows_matmul_reference.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// O weight rows x R input rows: 8-lane partial sums over the input features, then a horizontal sum; features
// past the last multiple of 8 are added one by one.
template <int O, int R, typename W>
void Block(const float* x, const W* w, int64_t in, int64_t out, float* y) {
  __m256 acc[R][O];
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < O; ++o) acc[r][o] = _mm256_setzero_ps();
  const int64_t body = in - in % 8;
  for (int64_t i = 0; i < body; i += 8) {
    __m256 wv[O];
    for (int o = 0; o < O; ++o) wv[o] = Load8(w + o * in + i);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * in + i);
      for (int o = 0; o < O; ++o) acc[r][o] = _mm256_fmadd_ps(xv, wv[o], acc[r][o]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < O; ++o) {
      float sum = HorizontalSum(acc[r][o]);
      for (int64_t i = body; i < in; ++i) sum += x[r * in + i] * static_cast<float>(w[o * in + i]);
      y[r * out + o] = sum;
    }
}

// Output rows [lo, hi) for all input rows.
template <typename W>
void Rows(const float* x, int64_t rows, const W* w, const float* scale, int64_t in, int64_t out, int64_t lo,
          int64_t hi, float* y) {
  int64_t o = lo;
  for (; o + 2 <= hi; o += 2) {
    const W* wo = w + o * in;
    for (int64_t r = 0; r < rows;) {
      const float* xr = x + r * in;
      float* yr = y + r * out + o;
      switch (std::min<int64_t>(rows - r, 4)) {
        case 4: Block<2, 4>(xr, wo, in, out, yr); r += 4; break;
        case 3: Block<2, 3>(xr, wo, in, out, yr); r += 3; break;
        case 2: Block<2, 2>(xr, wo, in, out, yr); r += 2; break;
        default: Block<2, 1>(xr, wo, in, out, yr); r += 1; break;
      }
    }
  }
  for (; o < hi; ++o)  // an odd last row
    for (int64_t r = 0; r < rows; ++r) Block<1, 1>(x + r * in, w + o * in, in, out, y + r * out + o);
  if (scale != nullptr)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = lo; j < hi; ++j) y[r * out + j] *= scale[j];
}

// Splits the output rows into chunks that the calling thread and the pool's threads take from one counter.
// The caller waits only for chunks that were taken, so a task the pool starts late finds none and returns.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename W>
void Run(ffi::ThreadPool& pool, const float* x, int64_t rows, const W* w, const float* scale, int64_t in,
         int64_t out, float* y) {
  constexpr int64_t kChunk = 64;  // even, so each chunk's rows pair up
  const int64_t chunks = (out + kChunk - 1) / kChunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  auto work = std::make_shared<Work>();
  auto drain = [=]() {
    for (int64_t c; (c = work->next.fetch_add(1)) < chunks;) {
      Rows(x, rows, w, scale, in, out, c * kChunk, std::min(out, (c + 1) * kChunk), y);
      if (work->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(work->mu);
        work->cv.notify_all();
      }
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(drain)(drain));  // a copy per task
  drain();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == chunks; });
}

ffi::Error SmallRowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                           ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, bool scaled) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("small_rows_matmul: expected x [rows, in] and w [out, in]");
  const int64_t rows = xd[0], in = xd[1], out = wd[0];
  const float* s = scaled ? scale.typed_data() : nullptr;
  if (w.element_type() == ffi::F32)
    Run(pool, x.typed_data(), rows, w.typed_data<float>(), s, in, out, y->typed_data());
  else if (w.element_type() == ffi::S8)
    Run(pool, x.typed_data(), rows, w.typed_data<int8_t>(), s, in, out, y->typed_data());
  else
    return ffi::Error::InvalidArgument("small_rows_matmul: weights must be float32 or int8");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxspecSmallRowsMatmul, SmallRowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("scaled"));
