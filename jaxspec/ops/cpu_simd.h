// Vector helpers shared by the CPU kernels (AVX2).
#ifndef JAXSPEC_OPS_CPU_SIMD_H_
#define JAXSPEC_OPS_CPU_SIMD_H_

#include <immintrin.h>

namespace jaxspec {

// The sum of a vector's eight lanes.
inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace jaxspec

#endif  // JAXSPEC_OPS_CPU_SIMD_H_
