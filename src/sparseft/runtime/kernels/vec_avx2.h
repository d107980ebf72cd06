// bf16 and fp32 in AVX2 registers, for the kernel files that have an AVX2 path beside others (attention.cpp,
// activation.cpp). Each function carries its own target, so including this compiles anywhere; only code that has
// checked for AVX2 and FMA may call the vector ones.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace sparseft {

#define SPARSEFT_AVX2 __attribute__((target("avx2,fma")))

// 16 bf16 values, as two fp32 vectors: the even-indexed ones (shifted up from the low half of each 32-bit lane)
// and the odd-indexed ones (the high half, the low bits cleared). A bf16 value is the top half of its fp32 value,
// so neither rounds.
SPARSEFT_AVX2 inline void split_bf16(const uint16_t* p, __m256* even, __m256* odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// fp32 to bf16 bits in the low half of each lane, rounded as sparse.h's f32_to_bf16 (and torch): to nearest even,
// NaN stays NaN.
SPARSEFT_AVX2 inline __m256i bf16_bits(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
}

// The inverse of split_bf16: even- and odd-indexed fp32 values, rounded, stored as 16 bf16 values in order.
SPARSEFT_AVX2 inline void store_bf16(uint16_t* p, __m256 even, __m256 odd) {
  const __m256i bits = _mm256_or_si256(bf16_bits(even), _mm256_slli_epi32(bf16_bits(odd), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
}

// e^x with the algorithm and constants of SLEEF's expf_u10 (its xexpf), which torch's vectorized exp calls on CPUs
// with AVX2 or AVX-512: n = rint(x / ln 2), r = x - n ln 2 in two steps, a degree-7 polynomial in r by fused
// multiply-adds, times 2^n as two factors (so that n = -126... stays exact), 0 below -104 and infinity above 100.
// Done in this order, the result has torch's bits, so an op using it rounds as the torch ops it replaces.
constexpr float kExpLn2Hi = 0.693145751953125f, kExpLn2Lo = 1.428606765330187045e-06f;
constexpr float kExpInvLn2 = 1.442695040888963407359924681001892137426645954152985934135449406931f;
constexpr float kExpPoly[6] = {0.000198527617612853646278381f, 0.00139304355252534151077271f,
                               0.00833336077630519866943359f,  0.0416664853692054748535156f,
                               0.166666671633720397949219f,    0.5f};

SPARSEFT_AVX2 inline __m256 pow2i(__m256i n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(0x7f)), 23));
}

// N vectors at once, each step over all of them: one exp is a chain of some 20 dependent operations, and the
// core overlaps the chains of independent vectors only when they come in one stream.
template <int N>
SPARSEFT_AVX2 inline void exp8(__m256 (&x)[N]) {
  __m256i n[N];
  __m256 r[N], p[N];
  for (int k = 0; k < N; ++k) n[k] = _mm256_cvtps_epi32(_mm256_mul_ps(x[k], _mm256_set1_ps(kExpInvLn2)));
  for (int k = 0; k < N; ++k) {
    const __m256 nf = _mm256_cvtepi32_ps(n[k]);  // rounded to nearest even above
    r[k] = _mm256_fmadd_ps(nf, _mm256_set1_ps(-kExpLn2Lo), _mm256_fmadd_ps(nf, _mm256_set1_ps(-kExpLn2Hi), x[k]));
    p[k] = _mm256_set1_ps(kExpPoly[0]);
  }
  for (int i = 1; i < 6; ++i)
    for (int k = 0; k < N; ++k) p[k] = _mm256_fmadd_ps(p[k], r[k], _mm256_set1_ps(kExpPoly[i]));
  for (int k = 0; k < N; ++k) {
    p[k] = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(r[k], r[k]), p[k], r[k]));
    const __m256i half = _mm256_srai_epi32(n[k], 1);
    p[k] = _mm256_mul_ps(_mm256_mul_ps(p[k], pow2i(half)), pow2i(_mm256_sub_epi32(n[k], half)));
    p[k] = _mm256_andnot_ps(_mm256_cmp_ps(x[k], _mm256_set1_ps(-104.0f), _CMP_LT_OQ), p[k]);
    x[k] = _mm256_blendv_ps(p[k], _mm256_set1_ps(INFINITY), _mm256_cmp_ps(_mm256_set1_ps(100.0f), x[k], _CMP_LT_OQ));
  }
}

SPARSEFT_AVX2 inline __m256 exp8(__m256 x) {
  __m256 v[1] = {x};
  exp8(v);
  return v[0];
}

// exp8 one value at a time, with the same roundings (std::fma is exact, as the vector FMA), for the scalar kernels
// and the tails of rows.
inline float exp1(float x) {
  if (x < -104.0f) return 0.0f;
  if (100.0f < x) return INFINITY;
  if (std::isnan(x)) return x + x;  // quieted, as the arithmetic on it in exp8
  const int32_t n = static_cast<int32_t>(std::nearbyint(x * kExpInvLn2));  // to nearest even, as cvtps2dq
  const float nf = static_cast<float>(n);
  float r = std::fma(nf, -kExpLn2Hi, x);
  r = std::fma(nf, -kExpLn2Lo, r);
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = std::fma(p, r, kExpPoly[i]);
  p = 1.0f + std::fma(r * r, p, r);
  const int32_t half = n >> 1;
  return p * std::ldexp(1.0f, half) * std::ldexp(1.0f, n - half);
}

}  // namespace sparseft
