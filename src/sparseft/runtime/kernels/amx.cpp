// AMX kernels for batches of tokens (prefill of short prompts, beam search, batched decoding): bf16 weights from
// 2 tokens, int8 from 5 (ops.cpp decides).
//
// The expand kernels of avx512.cpp multiply each expanded chunk of weights with every batch row separately, so
// their cost grows with the batch: at batch 16 the bf16 kernel ran at 0.42x torch's dense bf16 matmul. Here 16
// rows' expanded chunks are stored to a 16 x 64-byte tile in L1 and one tdpbf16ps (bf16) or tdpbssd (int8)
// multiplies it with the tile of activations of up to 16 batch rows; four such groups (64 batch rows, a call)
// share each expanded tile, so the work per weight hardly depends on the batch. bf16, 4096x4096 at 70%, out of
// cache, 2 threads, alternated with the expand kernel: 1.24x at batch 3, 1.48x at 4, 2.83x at 8, 5.13x at 16
// (2.18x torch's dense bf16 matmul, against 0.42x), when a call took 16 batch rows. Products of two bf16
// values are exact in fp32, so only the order of the fp32 sums differs; int8 sums are exact integers, so the
// int8 results equal the expand kernel's bit for bit. int8_wide_amx takes 16-bit activations as two bytes, each
// through its own result tiles (sparse.h).
#include "bf16_bits.h"
#include "sparse.h"

// AMX intrinsics need GCC 11 (or clang); with an older compiler the other kernels still build and ops.cpp never
// calls these (kAmxBuilt).
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 11)

#include <immintrin.h>

#include <type_traits>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,popcnt,amx-tile,amx-bf16,amx-int8")

namespace sparseft {

const bool kAmxBuilt = true;

namespace {

// GCC's AMX intrinsics do not tell the optimizer which memory they read or write (ldtilecfg is said to read 8 of
// its 64 bytes, tileloadd nothing), so it may drop or sink the stores they depend on: at -O1 the tile
// configuration's stores vanished. A compiler barrier before each such instruction keeps them.
inline void memory_barrier() { asm volatile("" ::: "memory"); }

constexpr int kRows = 16;    // rows of a weight tile (and of the result tiles)
constexpr int kTokens = 16;  // most batch rows of a result tile (16 fp32 or int32 sums make its 64-byte row)

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Load into a register and hide the value from the optimizer, so the compiler cannot fold the load into
// vpexpand's memory operand (several times slower on AMD Zen 4/5; see avx512.cpp).
inline __m512i load_opaque(const void* p) {
  __m512i v = _mm512_loadu_si512(p);
  asm volatile("" : "+v"(v));
  return v;
}

// Tiles 0-3: the sums of up to four groups of `width` batch rows (rows x width, fp32 or int32); 4: expanded
// weights (rows x 64 bytes: 32 bf16 or 64 int8); 5 and 6: activations, 16 words of columns (bf16 pairs or int8
// quads) x width batch rows, taken in turn by the groups so that loading one group's need not wait for the
// multiply reading the other's.
void configure(int64_t rows, int64_t width) {
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 7; ++t) {
    config.rows[t] = static_cast<uint8_t>(t < 5 ? rows : 16);
    config.bytes_per_row[t] = static_cast<uint16_t>(t == 4 ? 64 : width * 4);
  }
  asm volatile("ldtilecfg %0" : : "m"(config) : "memory");
}

// The weights' values, and for int8 the activations': 8 bits, or 16 (int8_wide_amx).
enum class Values { kBf16, kInt8, kInt8Wide };

// What a tile multiply does: bf16 pairs into fp32 (tdpbf16ps), or int8 quads into int32 with the activations
// signed (tdpbssd) or unsigned (tdpbsud: the low bytes of 16-bit activations).
enum class Dot { kBf16, kSigned, kUnsigned };

// One chunk of columns into result tile C: the activations' tile (from `pairs`, laid out by `interleave`; tiles 5
// and 6 by turns), multiplied with the expanded weights. The intrinsics take tile numbers as literals only.
template <Dot kDot, int C>
inline void multiply(const uint32_t* pairs, int64_t stride) {
  if constexpr (C % 2 == 0)
    _tile_loadd(5, pairs, stride);
  else
    _tile_loadd(6, pairs, stride);
  if constexpr (kDot == Dot::kBf16 && C == 0) _tile_dpbf16ps(0, 4, 5);
  if constexpr (kDot == Dot::kBf16 && C == 1) _tile_dpbf16ps(1, 4, 6);
  if constexpr (kDot == Dot::kBf16 && C == 2) _tile_dpbf16ps(2, 4, 5);
  if constexpr (kDot == Dot::kBf16 && C == 3) _tile_dpbf16ps(3, 4, 6);
  if constexpr (kDot == Dot::kSigned && C == 0) _tile_dpbssd(0, 4, 5);
  if constexpr (kDot == Dot::kSigned && C == 1) _tile_dpbssd(1, 4, 6);
  if constexpr (kDot == Dot::kSigned && C == 2) _tile_dpbssd(2, 4, 5);
  if constexpr (kDot == Dot::kSigned && C == 3) _tile_dpbssd(3, 4, 6);
  if constexpr (kDot == Dot::kUnsigned && C == 1) _tile_dpbsud(1, 4, 6);
  if constexpr (kDot == Dot::kUnsigned && C == 2) _tile_dpbsud(2, 4, 5);
  if constexpr (kDot == Dot::kUnsigned && C == 3) _tile_dpbsud(3, 4, 6);
}

// The sums of one tile: up to four result tiles of kRows rows x group_width batch rows (fp32, or int32 for int8
// values), stored as compactly as the tiles were configured.
struct alignas(64) TileSums {
  uint32_t sums[4][kRows * kTokens];
};

// Rows r, r + step, ... (spaced, as the expand kernels' tiles, so each row stream runs on into the next tile's for
// the hardware prefetcher) times kGroups groups of batch rows (group_width): kRows rows, or `count` (fewer) for the
// last rows of a range, in tiles configured for that many. Every group multiplies the same expanded weights, so
// the expand (the costly part at batch 1) is done once for up to 64 batch rows. Each row's sum comes out the same
// for any number of rows or groups, so results depend neither on how rows were split between threads nor on the
// batch.
// A chunk is 32 bf16 or 64 int8 columns: 64 bytes of a tile row either way.
//
// Keeping a tile's expanded chunks in L2 for the next 64 batch rows, rather than expanding them again, was slower
// (4096x4096: 8.3 against 6.3 ms at 128 batch rows, 48 against 26 at 512): each tile then reads the activations
// of the whole batch, which outgrow L2, where a call of 64 reads the same 512 KB for every tile.
//
// The sums go to `out` rather than to their places in the output (see flush).
template <Values kValues, bool kFull, int kGroups>
void tile(const SparseMatrix& w, const Activations& a, TileSums* out, int64_t r, int64_t step, int count) {
  constexpr bool kInt8 = kValues != Values::kBf16, kWide = kValues == Values::kInt8Wide;
  constexpr Dot kDot = kInt8 ? Dot::kSigned : Dot::kBf16;
  using Value = std::conditional_t<kInt8, int8_t, uint16_t>;
  using Bits = std::conditional_t<kInt8, uint64_t, uint32_t>;
  if constexpr (kFull) count = kRows;
  const Bits* m[kRows];
  const Value* p[kRows];
  for (int i = 0; i < count; ++i) {
    const int64_t row = r + i * step;
    m[i] = reinterpret_cast<const Bits*>(w.mask + row * w.words);
    p[i] = static_cast<const Value*>(w.values) + w.row_start[row];
  }
  // Two buffers: each chunk is expanded one ahead of its tile load, so the load does not wait for the stores that
  // wrote it to reach the cache (bf16 1.06-1.13x at 3-16 batch rows, about even from 32; loading right after the
  // stores, or two chunks ahead, was slower).
  alignas(64) uint8_t expanded[2][kRows * 64];
  const int64_t chunks = kInt8 ? w.words : (w.cols + 31) / 32;
  // one group's activations, as `interleave` lays them out from rows of a.stride elements (whole 64-column
  // words, where bf16 chunks may stop short)
  const int64_t width = group_width(a.batch), stride = width * 4;
  const int64_t group_words = a.stride * (kInt8 ? 1 : 2) / 4 * width;
  // 16-bit activations: result tiles 0..kGroups-1 take their high bytes' sums, the next kGroups their low bytes'
  constexpr int kTiles = kWide ? 2 * kGroups : kGroups;
  _tile_zero(0);
  if constexpr (kTiles > 1) _tile_zero(1);
  if constexpr (kTiles > 2) _tile_zero(2);
  if constexpr (kTiles > 3) _tile_zero(3);
  const auto expand = [&](int64_t k) {
    uint8_t* e = expanded[k & 1];
#pragma GCC unroll 16
    for (int i = 0; i < count; ++i) {
      const Bits bits = m[i][k];
      _mm_prefetch(reinterpret_cast<const char*>(p[i]) + 512, _MM_HINT_T0);
      const __m512i packed = load_opaque(p[i]);
      if constexpr (kInt8) {
        p[i] += _mm_popcnt_u64(bits);
        _mm512_store_si512(e + i * 64, _mm512_maskz_expand_epi8(bits, packed));
      } else {
        p[i] += _mm_popcnt_u32(bits);
        _mm512_store_si512(e + i * 64, _mm512_maskz_expand_epi16(bits, packed));
      }
    }
  };
  if (chunks > 0) expand(0);
  for (int64_t k = 0; k < chunks; ++k) {
    if (k + 1 < chunks) expand(k + 1);
    memory_barrier();
    _tile_loadd(4, expanded[k & 1], 64);
    const uint32_t* x = a.pairs + k * 16 * width;
    multiply<kDot, 0>(x, stride);
    if constexpr (kGroups > 1) multiply<kDot, 1>(x + group_words, stride);
    if constexpr (kGroups > 2) multiply<kDot, 2>(x + 2 * group_words, stride);
    if constexpr (kGroups > 3) multiply<kDot, 3>(x + 3 * group_words, stride);
    if constexpr (kWide) {
      const uint32_t* low = a.low_pairs + k * 16 * width;
      multiply<Dot::kUnsigned, kGroups>(low, stride);
      if constexpr (kGroups > 1) multiply<Dot::kUnsigned, kGroups + 1>(low + group_words, stride);
    }
  }
  _tile_stored(0, out->sums[0], stride);
  if constexpr (kTiles > 1) _tile_stored(1, out->sums[1], stride);
  if constexpr (kTiles > 2) _tile_stored(2, out->sums[2], stride);
  if constexpr (kTiles > 3) _tile_stored(3, out->sums[3], stride);
}

// 16 x 16 transpose of 32-bit words in registers: row i in r[i] becomes column i in r[i].
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 8; ++i) {
    const int a = (i / 4) * 8 + i % 4;
    t[a] = _mm512_shuffle_i32x4(r[a], r[a + 4], 0x88);
    t[a + 4] = _mm512_shuffle_i32x4(r[a], r[a + 4], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

template <Values kValues, bool kFull>
void groups(const SparseMatrix& w, const Activations& a, TileSums* out, int64_t r, int64_t step, int count) {
  switch ((a.batch + kTokens - 1) / kTokens) {
    case 1: tile<kValues, kFull, 1>(w, a, out, r, step, count); break;
    case 2: tile<kValues, kFull, 2>(w, a, out, r, step, count); break;
    case 3:
      if constexpr (kValues != Values::kInt8Wide) tile<kValues, kFull, 3>(w, a, out, r, step, count);
      break;
    default:
      if constexpr (kValues != Values::kInt8Wide) tile<kValues, kFull, 4>(w, a, out, r, step, count);
      break;
  }
}

// The sums of up to sixteen consecutive tiles (`block`) to their places in the output: tile j (< n) holds rows
// first + j + i * spacing (i < count), so for each i the n tiles hold n neighbouring rows, and one 16 x 16
// transpose turns their sums for 16 batch rows into a vector of n outputs per batch row. Scaled, biased and rounded
// as `store` does, so the results are the same bit for bit. Against writing each tile's sums straight to their
// places, each to a cache line of its own (1024 lines a tile at 64 batch rows), 2 threads, alternated: bf16
// 1.03-1.10x at 3-16 batch rows, 1.22-1.23x at 64; int8 1.19-1.42x at 8-64; 16-bit activations 1.18-1.28x at 32.
template <Values kValues>
void flush(const SparseMatrix& w, const Activations& a, const Output& o, const TileSums* block, int n, int64_t first,
           int64_t spacing, int count) {
  const int64_t width = group_width(a.batch), groups = (a.batch + kTokens - 1) / kTokens;
  const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1u);
  for (int i = 0; i < count; ++i) {
    const int64_t row = first + i * spacing;  // rows row .. row + n - 1
    const __m512 bias = o.bias ? _mm512_maskz_loadu_ps(lanes, o.bias + row) : _mm512_setzero_ps();
    const __m512 row_scale =
        kValues != Values::kBf16 ? _mm512_maskz_loadu_ps(lanes, w.scale + row) : _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512i sums[16], low[16];
      for (int j = 0; j < 16; ++j)
        sums[j] = j < n ? _mm512_loadu_si512(block[j].sums[g] + i * width) : _mm512_setzero_si512();
      transpose16(sums);
      if constexpr (kValues == Values::kInt8Wide) {
        for (int j = 0; j < 16; ++j)
          low[j] = j < n ? _mm512_loadu_si512(block[j].sums[groups + g] + i * width) : _mm512_setzero_si512();
        transpose16(low);
      }
      for (int64_t t = 0; t < width && g * width + t < a.batch; ++t) {
        const int64_t b = g * width + t;
        __m512 y;
        if constexpr (kValues == Values::kBf16) {
          y = _mm512_castsi512_ps(sums[t]);
        } else {
          if constexpr (kValues == Values::kInt8) {
            y = _mm512_cvtepi32_ps(sums[t]);
          } else {  // 256 sum(high) + sum(low), exact in double, then rounded once, as from an int64
            const __m512d k256 = _mm512_set1_pd(256.0);
            const auto half = [&](int h) {
              const __m256i hi = _mm512_extracti64x4_epi64(sums[t], h), lo = _mm512_extracti64x4_epi64(low[t], h);
              return _mm512_cvtpd_ps(_mm512_fmadd_pd(_mm512_cvtepi32_pd(hi), k256, _mm512_cvtepi32_pd(lo)));
            };
            y = _mm512_insertf32x8(_mm512_castps256_ps512(half(0)), half(1), 1);
          }
          y = _mm512_mul_ps(_mm512_mul_ps(y, _mm512_set1_ps(a.scale[b])), row_scale);
        }
        if (o.bias) y = _mm512_add_ps(y, bias);
        if (o.bf16)
          _mm256_mask_storeu_epi16(static_cast<uint16_t*>(o.data) + b * o.stride + row, lanes,
                                   _mm512_cvtepi32_epi16(bf16_bits(y)));
        else
          _mm512_mask_storeu_ps(static_cast<float*>(o.data) + b * o.stride + row, lanes, y);
      }
    }
  }
}

// Tiles go in blocks of 16 (see flush), taken through for_each_step as the expand kernels take theirs: a thread
// through with its own part takes blocks left in the others'. Each thread does the last rows of its own part,
// fewer than a tile, at the end.
template <Values kValues>
void rows(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1, const Shared* shared) {
  const int64_t most = kValues == Values::kInt8Wide ? kAmxWideBatch : kAmxBatch;
  // not a batch the tiles hold (ops.cpp never passes one)
  if (a.batch < 1 || a.batch > most || a.pairs == nullptr ||
      (kValues == Values::kInt8Wide) != (a.low_pairs != nullptr)) {
    if constexpr (kValues != Values::kInt8Wide)
      (kValues == Values::kInt8 ? int8_avx512 : bf16_avx512)(w, a, o, r0, r1, shared);
    return;
  }
  // 64 KB: the sums of 16 consecutive tiles, flushed together. Not on the stack: there it made the tiles of a
  // batch of 3 take 0.81-0.92x as long (2048x2048).
  static thread_local TileSums block[16];
  configure(kRows, group_width(a.batch));
  for_each_step(shared, r0, r1, kRows, 16, [&](int64_t p0, int64_t step, int64_t t0, int64_t t1) {
    const int n = static_cast<int>(t1 - t0);
    for (int j = 0; j < n; ++j) groups<kValues, true>(w, a, &block[j], p0 + t0 + j, step, kRows);
    memory_barrier();
    flush<kValues>(w, a, o, block, n, p0 + t0, step, kRows);
  });
  const int64_t rest = (r1 - r0) % kRows;
  if (rest > 0) {
    configure(rest, group_width(a.batch));
    groups<kValues, false>(w, a, &block[0], r1 - rest, 1, static_cast<int>(rest));
    memory_barrier();
    flush<kValues>(w, a, o, block, 1, r1 - rest, 1, static_cast<int>(rest));
  }
  _tile_release();
}

}  // namespace

void bf16_amx(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
              const Shared* shared) {
  rows<Values::kBf16>(w, a, o, r0, r1, shared);
}

void int8_amx(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
              const Shared* shared) {
  rows<Values::kInt8>(w, a, o, r0, r1, shared);
}

void int8_wide_amx(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
                   const Shared* shared) {
  rows<Values::kInt8Wide>(w, a, o, r0, r1, shared);
}

void interleave(const void* x, int64_t batch, int64_t row_words, bool signed_bytes, uint32_t* out) {
  // Group g of `width` batch rows (group_width): out[(g * row_words + c) * width + t] = 32-bit word c of batch row
  // g * width + t (two bf16 of neighbouring columns, or four int8), zero past the last batch row; that is the
  // layout the activations' tile of tdpbf16ps / tdpbssd is read in. The int8 kernels' activations are stored as
  // uint8 (int8 + 128) for vpdpbusd; tdpbssd takes them signed again (flipping each byte's top bit subtracts 128).
  // Blocks of 16 words of 16 rows are transposed in registers: 1.5-4.3x a plain loop (15 us less at batch 16 and
  // 2048 words a row), which had cost a third of a small weight's call. row_words is a multiple of 16: the rows
  // are padded to whole 64-column words.
  const uint32_t* words = static_cast<const uint32_t*>(x);
  const __m512i flip = _mm512_set1_epi32(signed_bytes ? static_cast<int>(0x80808080u) : 0);
  const int64_t width = group_width(batch);
  const __mmask16 lanes = static_cast<__mmask16>((1u << width) - 1u);
  for (int64_t g = 0; g * width < batch; ++g) {
    const int64_t here = batch - g * width;
    uint32_t* group = out + g * row_words * width;
    for (int64_t c0 = 0; c0 < row_words; c0 += 16) {
      __m512i r[16];
      for (int t = 0; t < 16; ++t)
        r[t] = t < here && t < width
                   ? _mm512_xor_si512(_mm512_loadu_si512(words + (g * width + t) * row_words + c0), flip)
                   : _mm512_setzero_si512();
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_mask_storeu_epi32(group + (c0 + j) * width, lanes, r[j]);
    }
  }
}

}  // namespace sparseft

#else  // no AMX intrinsics in this compiler

namespace sparseft {
const bool kAmxBuilt = false;
void bf16_amx(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
              const Shared*) {
  bf16_avx512(w, a, o, r0, r1, nullptr);
}
void int8_amx(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
              const Shared*) {
  int8_avx512(w, a, o, r0, r1, nullptr);
}
void int8_wide_amx(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*) {}
void interleave(const void*, int64_t, int64_t, bool, uint32_t*) {}
}  // namespace sparseft

#endif
