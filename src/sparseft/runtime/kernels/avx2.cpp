// AVX2 kernels, for x86-64 CPUs without AVX-512. AVX2 has no expand instruction: `vpshufb` does it, with each
// mask byte (8 columns) selecting a precomputed 8-lane shuffle from a table, whose index 0x80 zeroes the lanes of
// clear bits. The values stay as narrow as they are stored, so one shuffle expands 32 int8 or 16 bf16 columns,
// and the expanded weights are reused from registers across the batch rows of a tile.
// - int8: exact integer dot products, 32 columns per step, with the `vpsignb` trick: |w| (unsigned) times x with
//   w's sign (signed) through `vpmaddubsw`, whose pair sums stay below 2 * 128 * 127 < 2^15 (activations lie in
//   [-127, 127]), so it never saturates; `vpmaddwd` by ones widens them to 32 bits.
// - bf16: 16 columns per step, each 32-bit lane holding two bf16 values: the low one shifted left by 16 and the
//   high one masked are fp32, so the weights need no widening shuffle; the activations are split the same way
//   once per call; fp32 FMAs.
// - int4: each row's nibbles are first unpacked into int8 bytes in a small buffer that stays in L1, then
//   multiplied as int8, with integer sums per group of columns that are scaled and summed in fp32 per group.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "sparse.h"

#pragma GCC target("avx2,fma,popcnt,bmi,bmi2")

namespace sparseft {
namespace {

// Batch rows a tile multiplies with one expansion of the weights: beyond these the accumulators spill out of the
// 16 registers (int8), or a bf16 row's FMAs go through one sum each, one after another.
constexpr int kMaxBatchTileInt8 = 8, kMaxBatchTileBf16 = 4, kMaxBatchTileInt4 = 4;

struct Tables {
  alignas(64) uint64_t bytes[256];        // int8: lane l takes byte popcount(bits below l), or 0x80 (zero)
  alignas(64) uint64_t bytes_high[256];   // the same plus 8: for the second 8 bytes of a 16-byte lane
  alignas(64) uint8_t words[256][16];     // bf16: lane l takes 16-bit value popcount(bits below l), or zero
  Tables() {
    for (int bits = 0; bits < 256; ++bits) {
      uint64_t low = 0, high = 0;
      int next = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool set = (bits >> lane) & 1;
        low |= uint64_t{set ? static_cast<uint8_t>(next) : uint8_t{0x80}} << (8 * lane);
        high |= uint64_t{set ? static_cast<uint8_t>(next + 8) : uint8_t{0x80}} << (8 * lane);
        words[bits][2 * lane] = set ? static_cast<uint8_t>(2 * next) : 0x80;
        words[bits][2 * lane + 1] = set ? static_cast<uint8_t>(2 * next + 1) : 0x80;
        next += set ? 1 : 0;
      }
      bytes[bits] = low;
      bytes_high[bits] = high;
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

// The helpers of the inner loops are always inlined: out of line (as GCC chose for the larger int4 tiles), each
// 32 columns paid for a call and the spills around it.
#define SPARSEFT_INLINE __attribute__((always_inline)) inline

// Two 8-byte loads as one 16-byte vector.
SPARSEFT_INLINE __m128i load_pair(const void* low, const void* high) {
  const __m128i v = _mm_loadl_epi64(static_cast<const __m128i*>(low));
  return _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(v), static_cast<const double*>(high)));
}

SPARSEFT_INLINE __m256i join(__m128i low, __m128i high) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(low), high, 1);
}

// The 32 int8 weights of mask bits `m`, packed from `p`. vpshufb works within 16-byte lanes, so each lane's two
// mask bytes take their values from two 8-byte loads, the second at 8 in the lane (the `bytes_high` table).
SPARSEFT_INLINE __m256i expand32(uint32_t m, const int8_t* p, const Tables& t) {
  const int o1 = _mm_popcnt_u32(m & 0xff), o2 = _mm_popcnt_u32(m & 0xffff), o3 = _mm_popcnt_u32(m & 0xffffff);
  const __m256i values = join(load_pair(p, p + o1), load_pair(p + o2, p + o3));
  const __m256i shuffle = join(load_pair(&t.bytes[m & 0xff], &t.bytes_high[(m >> 8) & 0xff]),
                               load_pair(&t.bytes[(m >> 16) & 0xff], &t.bytes_high[m >> 24]));
  return _mm256_shuffle_epi8(values, shuffle);
}

// The 16 bf16 weights of mask bits `m` (16 of them), packed from `p`: one mask byte per 16-byte lane.
SPARSEFT_INLINE __m256i expand16(uint32_t m, const uint16_t* p, const Tables& t) {
  const __m256i values = join(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)),
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + _mm_popcnt_u32(m & 0xff))));
  const __m256i shuffle = join(_mm_load_si128(reinterpret_cast<const __m128i*>(t.words[m & 0xff])),
                               _mm_load_si128(reinterpret_cast<const __m128i*>(t.words[(m >> 8) & 0xff])));
  return _mm256_shuffle_epi8(values, shuffle);
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

// Row r times batch rows [b0, b0 + NB) of the activations `xs` (a.stride elements a row). Activations are zero
// past cols and mask words are zero past cols, so every word is worked whole.
template <int NB>
void int8_tile(const SparseMatrix& w, const Activations& a, const void* xs, const Output& o, int64_t r,
               int64_t b0) {
  const Tables& t = tables();
  const uint64_t* mask = w.mask + r * w.words;
  const int8_t* p = static_cast<const int8_t*>(w.values) + w.row_start[r];
  const int8_t* x = static_cast<const int8_t*>(xs) + b0 * a.stride;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[NB];
  for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < w.words; ++k, x += 64) {
    for (int half = 0; half < 2; ++half) {
      const uint32_t m = static_cast<uint32_t>(mask[k] >> (32 * half));
      const __m256i wv = expand32(m, p, t);
      const __m256i magnitude = _mm256_abs_epi8(wv);
      p += _mm_popcnt_u32(m);
      for (int j = 0; j < NB; ++j) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j * a.stride + 32 * half));
        const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, wv));
        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    store(o, b0 + j, r, static_cast<float>(hsum_epi32(acc[j])) * a.scale[b0 + j] * w.scale[r]);
}

// The int4 values of row r as sign-extended int8 in `out` (cols + 96 bytes): 16 bytes of nibbles at a time,
// the low and high nibbles interleaved back into their order. Returns where the row's first value lies (a row
// that starts at a high nibble starts at out + 1). Reads at most 16 bytes past the row, within the padding.
const int8_t* unpack_nibbles(const SparseMatrix& w, int64_t r, int8_t* out) {
  const int64_t start = w.row_start[r], count = w.row_start[r + 1] - start + (start & 1);
  const uint8_t* in = static_cast<const uint8_t*>(w.values) + start / 2;
  const __m128i low_bits = _mm_set1_epi8(0x0f);
  const __m256i eight = _mm256_set1_epi8(8);
  for (int64_t i = 0; i < count; i += 32) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i / 2));
    const __m128i low = _mm_and_si128(v, low_bits), high = _mm_and_si128(_mm_srli_epi16(v, 4), low_bits);
    const __m256i bytes = join(_mm_unpacklo_epi8(low, high), _mm_unpackhi_epi8(low, high));
    // (v ^ 8) - 8 sign-extends a 4-bit two's complement value held in a byte
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_sub_epi8(_mm256_xor_si256(bytes, eight), eight));
  }
  return out + (start & 1);
}

// One chunk of 32 columns (mask bits `m`, values from `p`) of a row times NB batch rows of `x` into `acc`.
template <int NB>
SPARSEFT_INLINE void int8_chunk(uint32_t m, const int8_t*& p, const int8_t* x, int64_t stride, const Tables& t,
                                __m256i* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i wv = expand32(m, p, t);
  const __m256i magnitude = _mm256_abs_epi8(wv);
  p += _mm_popcnt_u32(m);
  for (int j = 0; j < NB; ++j) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j * stride));
    const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, wv));
    acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(pairs, ones));
  }
}

// Group g's scale of row r in all 8 lanes: a bf16 scale is broadcast as 16 bits and shifted into place.
template <bool BF16>
inline __m256 broadcast_scale(const SparseMatrix& w, int64_t r, int64_t g) {
  const int64_t i = r * w.groups + g;
  if constexpr (BF16) {
    const __m256i h = _mm256_set1_epi16(static_cast<short>(static_cast<const uint16_t*>(w.group_scale)[i]));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  } else {
    return _mm256_broadcast_ss(static_cast<const float*>(w.group_scale) + i);
  }
}

// Row r (its values unpacked at `p`) times batch rows [b0, b0 + NB): as int8_tile, a group at a time. PG is the
// chunks of 32 columns per group (1, 2 or 4, unrolled), or 0 for any multiple of 32 columns.
template <int NB, int PG, bool BF16>
void int4_tile(const SparseMatrix& w, const Activations& a, const int8_t* p, const Output& o, int64_t r,
               int64_t b0) {
  const Tables& t = tables();
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(w.mask + r * w.words);  // little-endian: low half first
  const int8_t* x = static_cast<const int8_t*>(a.data) + b0 * a.stride;
  const int64_t chunks = 2 * w.words, per_group = PG ? PG : w.group_size / 32;
  __m256 sum[NB];
  for (int j = 0; j < NB; ++j) sum[j] = _mm256_setzero_ps();
  // chunks past the last group lie past cols: their mask bits are clear
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t c0 = g * per_group, c1 = c0 + per_group < chunks ? c0 + per_group : chunks;
    __m256i acc[NB];
    for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_si256();
    if (PG && c1 - c0 == PG) {
      for (int i = 0; i < PG; ++i) int8_chunk<NB>(mask[c0 + i], p, x + 32 * (c0 + i), a.stride, t, acc);
    } else {
      for (int64_t c = c0; c < c1; ++c) int8_chunk<NB>(mask[c], p, x + 32 * c, a.stride, t, acc);
    }
    const __m256 scale = broadcast_scale<BF16>(w, r, g);
    for (int j = 0; j < NB; ++j) sum[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[j]), scale, sum[j]);
  }
  for (int j = 0; j < NB; ++j) store(o, b0 + j, r, hsum_ps(sum[j]) * a.scale[b0 + j]);
}

template <int NB, bool BF16>
void int4_tile(const SparseMatrix& w, const Activations& a, const int8_t* p, const Output& o, int64_t r,
               int64_t b0) {
  switch (w.group_size) {
    case 32: int4_tile<NB, 1, BF16>(w, a, p, o, r, b0); break;
    case 64: int4_tile<NB, 2, BF16>(w, a, p, o, r, b0); break;
    case 128: int4_tile<NB, 4, BF16>(w, a, p, o, r, b0); break;
    default: int4_tile<NB, 0, BF16>(w, a, p, o, r, b0); break;
  }
}

template <int NB>
void int4_tile(const SparseMatrix& w, const Activations& a, const int8_t* p, const Output& o, int64_t r,
               int64_t b0) {
  if (w.group_scale_bf16)
    int4_tile<NB, true>(w, a, p, o, r, b0);
  else
    int4_tile<NB, false>(w, a, p, o, r, b0);
}

// The bf16 tile reads the activations split into fp32 (`split_bf16`) and keeps C = 2 independent sums per batch
// row whatever the tile's size, so a row's result does not depend on the rows batched with it (a server's greedy
// request gives the same text alone or batched). More sums per row hid more FMA latency at batch 1 only.
template <int NB>
void bf16_tile(const SparseMatrix& w, const Activations& a, const void* xs, const Output& o, int64_t r,
               int64_t b0) {
  constexpr int C = 2;
  const Tables& t = tables();
  const uint64_t* mask = w.mask + r * w.words;
  const uint16_t* p = static_cast<const uint16_t*>(w.values) + w.row_start[r];
  const float* x = static_cast<const float*>(xs) + b0 * a.stride;
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 acc[NB][C];
  for (int j = 0; j < NB; ++j)
    for (int c = 0; c < C; ++c) acc[j][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < w.words; ++k, x += 64) {
    for (int s = 0; s < 4; ++s) {
      const uint32_t m = static_cast<uint32_t>(mask[k] >> (16 * s)) & 0xffff;
      const __m256i wv = expand16(m, p, t);
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
      p += _mm_popcnt_u32(m);
      for (int j = 0; j < NB; ++j) {
        const float* xj = x + j * a.stride + 16 * s;
        __m256& e = acc[j][(2 * s) % C];
        e = _mm256_fmadd_ps(even, _mm256_load_ps(xj), e);
        __m256& d = acc[j][(2 * s + 1) % C];
        d = _mm256_fmadd_ps(odd, _mm256_load_ps(xj + 8), d);
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    for (int c = 1; c < C; ++c) acc[j][0] = _mm256_add_ps(acc[j][0], acc[j][c]);
    store(o, b0 + j, r, hsum_ps(acc[j][0]));
  }
}

// The bf16 activations as fp32, in the order the tiles multiply them: per 16 columns, the 8 in the low halves of
// the 32-bit lanes (shifted left by 16), then the 8 in the high halves (masked). Once per call, not per row.
const float* split_bf16(const Activations& a) {
  thread_local std::vector<float> buffer;
  buffer.resize(static_cast<size_t>(a.batch * a.stride + 8));
  float* split = buffer.data();
  split += (8 - reinterpret_cast<uintptr_t>(split) / 4 % 8) % 8;  // 32-byte aligned
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t b = 0; b < a.batch; ++b) {
    const uint16_t* x = static_cast<const uint16_t*>(a.data) + b * a.stride;
    for (int64_t c = 0; c < a.stride; c += 16) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + c));
      _mm256_store_si256(reinterpret_cast<__m256i*>(split + b * a.stride + c), _mm256_slli_epi32(v, 16));
      _mm256_store_si256(reinterpret_cast<__m256i*>(split + b * a.stride + c + 8), _mm256_and_si256(v, high));
    }
  }
  return split;
}

template <bool INT8, int NB>
void tile(const SparseMatrix& w, const Activations& a, const void* xs, const Output& o, int64_t r, int64_t b0) {
  if constexpr (INT8)
    int8_tile<NB>(w, a, xs, o, r, b0);
  else
    bf16_tile<NB>(w, a, xs, o, r, b0);
}

// The batch goes in tiles as even as possible (12 rows: 6 + 6, not 8 + 4).
template <bool INT8>
void rows(const SparseMatrix& w, const Activations& a, const void* xs, const Output& o, int64_t r0, int64_t r1) {
  constexpr int64_t most = INT8 ? kMaxBatchTileInt8 : kMaxBatchTileBf16;
  const int64_t tiles = (a.batch + most - 1) / most;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t i = 0, b0 = 0; i < tiles; ++i) {
      const int64_t nb = (a.batch - b0) / (tiles - i) + ((a.batch - b0) % (tiles - i) != 0);
      switch (nb) {
        case 1: tile<INT8, 1>(w, a, xs, o, r, b0); break;
        case 2: tile<INT8, 2>(w, a, xs, o, r, b0); break;
        case 3: tile<INT8, 3>(w, a, xs, o, r, b0); break;
        case 4: tile<INT8, 4>(w, a, xs, o, r, b0); break;
        case 5: tile<INT8, 5>(w, a, xs, o, r, b0); break;
        case 6: tile<INT8, 6>(w, a, xs, o, r, b0); break;
        case 7: tile<INT8, 7>(w, a, xs, o, r, b0); break;
        default: tile<INT8, 8>(w, a, xs, o, r, b0); break;
      }
      b0 += nb;
    }
  }
}

// Each row is unpacked one row ahead, into the other of two buffers: read back at once, its bytes would still sit
// in the store buffer, and loads that straddle stores wait for them to commit.
void int4_rows(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  thread_local std::vector<int8_t> buffer;
  const int64_t size = w.words * 64 + 96;
  buffer.resize(static_cast<size_t>(2 * size));
  const int64_t tiles = (a.batch + kMaxBatchTileInt4 - 1) / kMaxBatchTileInt4;
  const int8_t* next = r0 < r1 ? unpack_nibbles(w, r0, buffer.data()) : nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* p = next;
    if (r + 1 < r1) next = unpack_nibbles(w, r + 1, buffer.data() + ((r + 1 - r0) % 2) * size);
    for (int64_t i = 0, b0 = 0; i < tiles; ++i) {
      const int64_t nb = (a.batch - b0) / (tiles - i) + ((a.batch - b0) % (tiles - i) != 0);
      switch (nb) {
        case 1: int4_tile<1>(w, a, p, o, r, b0); break;
        case 2: int4_tile<2>(w, a, p, o, r, b0); break;
        case 3: int4_tile<3>(w, a, p, o, r, b0); break;
        default: int4_tile<4>(w, a, p, o, r, b0); break;
      }
      b0 += nb;
    }
  }
}

// Columns c..c+7 of an fp32 or bf16 activation row, as fp32.
inline __m256 load8(const void* x, bool bf16, int64_t c) {
  if (bf16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + c));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(x) + c);
}

inline float hmax_ps(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

}  // namespace

// As quantize_avx512, 8 columns at a time. It runs once per linear layer and token: done an element at a time
// it took longer than the layer's own multiply on narrow layers (27 us for 2048 columns).
void quantize_avx2(const void* x, bool bf16, int64_t cols, int8_t* out, float* scale_out) {
  const int64_t full = cols - cols % 8;
  // max drops NaN, so a NaN or an infinity is caught apart: x * 0 is NaN for both, and NaN stays in a sum
  const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = zero, poison = zero;
  for (int64_t c = 0; c < full; c += 8) {
    const __m256 v = load8(x, bf16, c);
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
    poison = _mm256_fmadd_ps(v, zero, poison);
  }
  float absmax = hmax_ps(vmax);
  bool finite = !std::isnan(hsum_ps(poison));
  for (int64_t c = full; c < cols; ++c) {
    const float v = activation(x, bf16, c);
    finite = finite && std::isfinite(v);
    absmax = std::max(absmax, std::fabs(v));
  }
  *scale_out = finite ? absmax / 127.0f : std::numeric_limits<float>::quiet_NaN();  // NaN in, NaN out
  const float scale = *scale_out;
  if (!(scale > 0.0f)) return;
  // division, not multiplication by 1 / scale: it must round exactly as the reference's x / scale does
  const __m256 vscale = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  for (int64_t c = 0; c < full; c += 8) {
    const __m256 q = _mm256_round_ps(_mm256_div_ps(load8(x, bf16, c), vscale),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i words = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
    const __m256i halves = _mm256_packs_epi32(words, words);
    const __m256i bytes = _mm256_packs_epi16(halves, halves);  // each 128-bit lane's 4 values in its low 4 bytes
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + c),
                     _mm_unpacklo_epi32(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1)));
  }
  for (int64_t c = full; c < cols; ++c)
    out[c] = static_cast<int8_t>(quantized(activation(x, bf16, c), scale, 127.0f));
}

void int4_avx2(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
               const Shared*) {
  int4_rows(w, a, o, r0, r1);
}

void bf16_avx2(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
               const Shared*) {
  rows<false>(w, a, split_bf16(a), o, r0, r1);
}

void int8_avx2(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
               const Shared*) {
  rows<true>(w, a, a.data, o, r0, r1);
}

}  // namespace sparseft
