// AVX2 kernels, for x86-64 CPUs without AVX-512. AVX2 has no expand instruction: each mask byte (8 columns)
// selects a precomputed permutation that moves the packed values to their columns, and a lane mask zeroes
// the rest. Values are widened to 32-bit lanes: fp32 FMA for bf16 weights, exact int32 products for int8
// weights (signed activations, so no zero-point correction is needed here).
#include <immintrin.h>

#include "sparse.h"

#pragma GCC target("avx2,fma,popcnt,bmi,bmi2")

namespace sparseft {
namespace {

constexpr int kMaxBatchTile = 4;

struct Tables {
  alignas(32) int32_t index[256][8];  // lane l takes packed value number popcount(bits below l)
  alignas(32) int32_t keep[256][8];   // all ones where bit l is set
  Tables() {
    for (int bits = 0; bits < 256; ++bits) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool set = (bits >> lane) & 1;
        index[bits][lane] = set ? next : 0;
        keep[bits][lane] = set ? -1 : 0;
        next += set ? 1 : 0;
      }
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

inline __m256i expand8(uint8_t bits, __m256i wide, const Tables& t) {
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.index[bits]));
  const __m256i keep = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.keep[bits]));
  return _mm256_and_si256(_mm256_permutevar8x32_epi32(wide, idx), keep);
}

inline __m256i bf16x8_to_f32_bits(const uint16_t* p) {
  return _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
}

inline __m256i int8x8_to_i32(const int8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int64_t hsum_epi32(__m256i v) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t s = 0;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  return s;
}

template <bool INT8, int NB>
void tile(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r, int64_t b0) {
  const Tables& t = tables();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(w.mask + r * w.words);
  const int64_t groups = (w.cols + 7) / 8;
  __m256 accf[NB];
  __m256i acci[NB];
  for (int j = 0; j < NB; ++j) {
    accf[j] = _mm256_setzero_ps();
    acci[j] = _mm256_setzero_si256();
  }
  if constexpr (INT8) {
    const int8_t* p = static_cast<const int8_t*>(w.values) + w.row_start[r];
    const int8_t* x = static_cast<const int8_t*>(a.data) + b0 * a.stride;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256i wv = expand8(m[g], int8x8_to_i32(p), t);
      p += _mm_popcnt_u32(m[g]);
      for (int j = 0; j < NB; ++j)
        acci[j] = _mm256_add_epi32(acci[j], _mm256_mullo_epi32(wv, int8x8_to_i32(x + j * a.stride + g * 8)));
    }
    for (int j = 0; j < NB; ++j)
      store(o, b0 + j, r, static_cast<float>(hsum_epi32(acci[j])) * a.scale[b0 + j] * w.scale[r]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(w.values) + w.row_start[r];
    const uint16_t* x = static_cast<const uint16_t*>(a.data) + b0 * a.stride;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 wv = _mm256_castsi256_ps(expand8(m[g], bf16x8_to_f32_bits(p), t));
      p += _mm_popcnt_u32(m[g]);
      for (int j = 0; j < NB; ++j)
        accf[j] = _mm256_fmadd_ps(wv, _mm256_castsi256_ps(bf16x8_to_f32_bits(x + j * a.stride + g * 8)), accf[j]);
    }
    for (int j = 0; j < NB; ++j) store(o, b0 + j, r, hsum_ps(accf[j]));
  }
}

template <bool INT8>
void rows(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b0 = 0; b0 < a.batch; b0 += kMaxBatchTile) {
      const int64_t nb = a.batch - b0 < kMaxBatchTile ? a.batch - b0 : kMaxBatchTile;
      switch (nb) {
        case 1: tile<INT8, 1>(w, a, o, r, b0); break;
        case 2: tile<INT8, 2>(w, a, o, r, b0); break;
        case 3: tile<INT8, 3>(w, a, o, r, b0); break;
        default: tile<INT8, 4>(w, a, o, r, b0); break;
      }
    }
  }
}

}  // namespace

void bf16_avx2(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
               const Shared*) {
  rows<false>(w, a, o, r0, r1);
}

void int8_avx2(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
               const Shared*) {
  rows<true>(w, a, o, r0, r1);
}

}  // namespace sparseft
