// fp32 to bf16 in AVX-512 registers, for the kernel files compiled for AVX-512 (the function carries its own target,
// so including it compiles anywhere; only AVX-512 code may call it).
#pragma once

#include <immintrin.h>

namespace sparseft {

// fp32 to bf16 bits (in the low half of each lane), rounded as f32_to_bf16 rounds: nearest even, NaN stays NaN.
// (vcvtneps2bf16 would also flush denormals to zero.)
__attribute__((target("avx512f"))) inline __m512i bf16_bits(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

}  // namespace sparseft
