// AVX-512 kernels: VBMI2 vpexpand{w,b} puts the packed nonzeros back in their columns inside a register, then
// fp32 FMAs or BF16 vdpbf16ps (bf16 values) or VNNI vpdpbusd (int8 values) multiply-add them with the
// activations. Per 32 (bf16) or 64 (int8) weights the work is one mask load, one popcount, one vector load, one
// expand and the multiply-adds of each batch row.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "sparse.h"

// Everything below may use these instructions; ops.cpp calls it only when the CPU reports all of them.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,avx512vnni,popcnt,bmi2")

namespace sparseft {
namespace {

constexpr int kMaxBatchTile = 8;

// Software prefetch distance, in bytes ahead of each stream's read position. Every kernel prefetches its values
// (or dense rows) at every step, and the int8 kernel its mask words once per cache line of them. Measured out of
// cache, side by side, 2 threads, 70%, batch 1, on the decode shapes and 4096x4096, over the hardware prefetcher
// alone: int8 1.03-1.33x (mostly 1.1-1.2x), bf16 1.06-1.13x; 256 and 1024-2048 bytes ahead gained less, and
// the mask prefetch made the bf16 kernel (bound by port 5) 3-5% slower.
constexpr int kPrefetchBytes = 512;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0); }

// Load into a register and hide the value from the optimizer, so the compiler cannot fold the load into
// vpexpand's memory operand: that form is several times slower on AMD Zen 4/5.
inline __m512i load_opaque(const void* p) {
  __m512i v = _mm512_loadu_si512(p);
  asm volatile("" : "+v"(v));
  return v;
}

// vpexpand into a register zeroed just before, rather than with zeroing-masking ({z}): Zen 4 makes a zero-masked
// instruction wait for the old value of its destination, and the compiler gives every row's expand the same
// register, so the expands of a tile ran one after another. On a Zen 4 EPYC, 1 thread, L2: int8 6.7 -> 4.0 and
// bf16 9.2 -> 4.8 cycles per chunk; out of cache (4096x4096, 70%, batch 1) 1.1-1.8x. The zeroing idiom costs no
// execution port on Intel or AMD.
inline __m512i fresh_zero() {
  __m512i z = _mm512_setzero_si512();
  asm volatile("" : "+v"(z));  // keeps the zeroing instruction: the compiler would fold it back into {z}
  return z;
}
inline __m512i expand16(uint32_t bits, __m512i packed) { return _mm512_mask_expand_epi16(fresh_zero(), bits, packed); }
inline __m512i expand8(uint64_t bits, __m512i packed) { return _mm512_mask_expand_epi8(fresh_zero(), bits, packed); }

inline __mmask32 tail_mask32(int64_t count) {
  return count >= 32 ? static_cast<__mmask32>(0xffffffffu) : static_cast<__mmask32>((1u << count) - 1u);
}

// NR rows (r, r + step, ...) times NB batch rows of y, bf16 weights (expanded from the bitmask, or dense when
// DENSE). Several rows at once give independent dependency chains: the next load address of a row waits on the
// popcount of its current mask word.
//
// On Intel (FMA: a.split is set, see fma_tiles) the sparse tiles of up to 4 batch rows multiply in fp32 rather
// than with vdpbf16ps: each 32-bit lane of the expanded weights holds an even and an odd column, which a shift and
// an and turn into two fp32 vectors for two FMAs against the activations split the same way (a.split, made by
// bf16_avx512). On a Xeon vdpbf16ps takes 3 cycles and vpexpandw 2, both on port 5, while FMAs also issue on port
// 0: 4.1 instead of 5.1 cycles per 32 columns in L2, and 1.03-1.27x out of cache (batch 1, 70%). The products of
// two bf16 values are exact in fp32, so this is also the more accurate of the two. Larger batch tiles keep
// vdpbf16ps, which needs half the accumulator registers.
//
// On that Xeon at batch 1 this is close to what the ports allow: per 32 columns the mask's kmovd (about a cycle more than a
// fixed mask, in an L1 loop) and the expand are three uops only port 5 runs, and the shift, the and and the two
// FMAs are four more for ports 0 and 5, so 3.5 cycles at best against 3.9-4.1 measured. Tried, alternated in one
// process, and slower: the shift as a vpshufb (port 5) 0.96-0.99x; vdpbf16ps 0.84-0.93x; compressing the
// activations to each row's nonzeros, then a dense dot with the packed values, 0.55x out of cache; AMX (amx.cpp)
// 0.69-0.84x, and with four result tiles taken in turn 0.61-0.66x.
template <int NR, int NB, bool DENSE, bool FMA>
void bf16_tile(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r, int64_t step, int64_t b0) {
  constexpr bool kFma = FMA && !DENSE && NB <= 4;
  constexpr int kHalves = kFma ? 2 : 1;  // accumulators per (row, batch row): even and odd columns
  const int64_t chunks = (w.cols + 31) / 32;
  const uint32_t* m[NR];
  const uint16_t* p[NR];
  for (int i = 0; i < NR; ++i) {
    const int64_t row = r + i * step;
    if (DENSE) {
      m[i] = nullptr;
      p[i] = static_cast<const uint16_t*>(w.values) + row * w.cols;
    } else {
      m[i] = reinterpret_cast<const uint32_t*>(w.mask + row * w.words);
      p[i] = static_cast<const uint16_t*>(w.values) + w.row_start[row];
    }
  }
  const uint16_t* x = static_cast<const uint16_t*>(a.data) + b0 * a.stride;
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 acc[NR][NB][kHalves];
#pragma GCC unroll 8
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j)
#pragma GCC unroll 2
      for (int h = 0; h < kHalves; ++h) acc[i][j][h] = _mm512_setzero_ps();

  const float* split = a.split;  // the fp32 tiles' rows (only the last tile of a batch can be one)
  for (int64_t k = 0; k < chunks; ++k) {
    __m512i xv[NB][kHalves];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      if constexpr (kFma) {
        xv[j][0] = _mm512_load_si512(split + (j * chunks + k) * 32);
        xv[j][kHalves - 1] = _mm512_load_si512(split + (j * chunks + k) * 32 + 16);
      } else {
        xv[j][0] = _mm512_loadu_si512(x + j * a.stride + k * 32);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) {
      __m512i wv;
      if (DENSE) {
        // Dense rows are not padded: the last chunk of a row loads only its own columns.
        __mmask32 keep = tail_mask32(w.cols - k * 32);
        prefetch(p[i] + k * 32);
        wv = _mm512_maskz_loadu_epi16(keep, p[i] + k * 32);
      } else {
        const uint32_t bits = m[i][k];
        prefetch(p[i]);
        const __m512i packed = load_opaque(p[i]);
        p[i] += _mm_popcnt_u32(bits);
        wv = expand16(bits, packed);
      }
      if constexpr (kFma) {
        const __m512 even_w = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
        const __m512 odd_w = _mm512_castsi512_ps(_mm512_and_si512(wv, odd));
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) {
          acc[i][j][0] = _mm512_fmadd_ps(even_w, _mm512_castsi512_ps(xv[j][0]), acc[i][j][0]);
          __m512& odd_acc = acc[i][j][kHalves - 1];
          odd_acc = _mm512_fmadd_ps(odd_w, _mm512_castsi512_ps(xv[j][kHalves - 1]), odd_acc);
        }
      } else {
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j)
          acc[i][j][0] = _mm512_dpbf16_ps(acc[i][j][0], (__m512bh)wv, (__m512bh)xv[j][0]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      __m512 sum = acc[i][j][0];
      if constexpr (kFma) sum = _mm512_add_ps(sum, acc[i][j][kHalves - 1]);
      store(o, b0 + j, r + i * step, _mm512_reduce_add_ps(sum));
    }
}

// int8 weights, uint8 activations (int8 + 128): vpdpbusd multiplies u8 by s8, so the sum carries an extra
// 128 * sum(w) per row, removed with the precomputed row sum. Zeros expanded into the register add nothing.
template <int NR, int NB>
void int8_tile(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r, int64_t step, int64_t b0) {
  const uint64_t* m[NR];
  const int8_t* p[NR];
  for (int i = 0; i < NR; ++i) {
    m[i] = w.mask + (r + i * step) * w.words;
    p[i] = static_cast<const int8_t*>(w.values) + w.row_start[r + i * step];
  }
  const uint8_t* x = static_cast<const uint8_t*>(a.data) + b0 * a.stride;
  __m512i acc[NR][NB];
#pragma GCC unroll 8
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();

  for (int64_t k = 0; k < w.words; ++k) {
    __m512i xv[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) xv[j] = _mm512_loadu_si512(x + j * a.stride + k * 64);
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) {
      const uint64_t bits = m[i][k];
      prefetch(p[i]);
      if (k % 8 == 0) prefetch(m[i] + k);
      const __m512i packed = load_opaque(p[i]);
      p[i] += _mm_popcnt_u64(bits);
      const __m512i wv = expand8(bits, packed);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv[j], wv);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NR; ++i) {
    const int64_t row = r + i * step;
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      const int64_t dot = static_cast<int64_t>(_mm512_reduce_add_epi32(acc[i][j])) - 128 * int64_t{w.rowsum[row]};
      store(o, b0 + j, row, static_cast<float>(dot) * a.scale[b0 + j] * w.scale[row]);
    }
  }
}

template <int NR, int NB, int KIND>
void tile(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r, int64_t step, int64_t b0) {
  if constexpr (KIND == 0) {
    if (a.split != nullptr)
      bf16_tile<NR, NB, false, true>(w, a, o, r, step, b0);
    else
      bf16_tile<NR, NB, false, false>(w, a, o, r, step, b0);
  }
  if constexpr (KIND == 1) bf16_tile<NR, NB, true, false>(w, a, o, r, step, b0);
  if constexpr (KIND == 2) int8_tile<NR, NB>(w, a, o, r, step, b0);
}

template <int NR, int KIND>
void batch_tiles(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r, int64_t step) {
  for (int64_t b0 = 0; b0 < a.batch; b0 += kMaxBatchTile) {
    const int64_t nb = a.batch - b0 < kMaxBatchTile ? a.batch - b0 : kMaxBatchTile;
    switch (nb) {
      case 1: tile<NR, 1, KIND>(w, a, o, r, step, b0); break;
      case 2: tile<NR, 2, KIND>(w, a, o, r, step, b0); break;
      case 3: tile<NR, 3, KIND>(w, a, o, r, step, b0); break;
      case 4: tile<NR, 4, KIND>(w, a, o, r, step, b0); break;
      case 5: tile<NR, 5, KIND>(w, a, o, r, step, b0); break;
      case 6: tile<NR, 6, KIND>(w, a, o, r, step, b0); break;
      case 7: tile<NR, 7, KIND>(w, a, o, r, step, b0); break;
      default: tile<NR, 8, KIND>(w, a, o, r, step, b0); break;
    }
  }
}

// A tile of NR rows reads NR streams at once (mask words and values of each row). Its rows are not neighbours
// but NR evenly spaced rows of the caller's range, r, r + step, r + 2 step, ...; the next tile starts one row
// further. Each stream then runs straight on from one row into the next for the whole range, which the hardware
// prefetcher follows, where a tile of neighbouring rows would give it NR short streams of one row each (at 70%
// sparsity a 4096-column int8 row holds 1.2 KB). Measured out of cache, side by side, 2 threads, 70%, batch 1:
// int8 1.05-1.7x (mostly 1.2-1.4x) and bf16 1.0-1.2x over neighbouring rows with a software prefetch that swept
// the next tile's region; int8 then reads as fast as a plain 8-stream read of the same bytes.
// Rows [r0, r1) go in such tiles; what does not divide evenly goes one row at a time.
//
// On several threads (`shared`), each takes the tile steps of its own part kStepsTaken at a time, then those left
// in the other parts (for_each_step; rows that do not divide evenly stay with their owners). A thread the machine
// slows down then no longer holds up the call (the two threads' times per call had differed by 1.05-1.35x). Measured
// against the fixed split out of cache, 2 threads, 70%, batch 1, alternated in one process, 10 runs over
// 4096x4096, 11008x4096, 4096x11008 and TinyLlama's fused 2560x2048, 11264x2048 and its 2048x2048, 2048x5632:
// bf16 0.99-1.17x (median 1.10x), int8 0.98-1.14x (1.04x), our dense GEMV 0.99-1.13x (1.05x). Taking four steps
// at a time was slower for int8 (0.96-1.02x against eight), one slower still.
constexpr int64_t kStepsTaken = 8;

template <int NR, int KIND>
void spaced_tiles(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
                  const Shared* shared) {
  for_each_step(shared, r0, r1, NR, kStepsTaken, [&](int64_t p0, int64_t step, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) batch_tiles<NR, KIND>(w, a, o, p0 + t, step);
  });
  for (int64_t r = r1 - (r1 - r0) % NR; r < r1; ++r) batch_tiles<1, KIND>(w, a, o, r, 1);
}

// Batch 1 takes several rows at a time, for independent chains and read streams: eight for the dense kernel
// (against six 0.96x, four 0.92x), six for the sparse ones. Sparse bf16 with eight ran out of general registers
// for the 16 stream pointers and moved them through vector registers, on the ports the expand needs; int8 with six
// rather than eight was 0.99-1.10x, median 1.04x (out of cache, 2 threads, 70%, alternated in one process, 23 runs
// over 4096x4096, 11008x4096, 4096x11008, 2048x2048, 5632x2048 and 2048x5632; twelve was 0.8x). Larger batches
// take two (the batch rows already give the multiply-adds enough independent work, and registers run out: 2 x 8
// accumulators + 8 inputs).
template <int KIND>
void rows(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1, const Shared* shared) {
  if (a.batch == 1)
    spaced_tiles<KIND == 1 ? 8 : 6, KIND>(w, a, o, r0, r1, shared);
  else
    spaced_tiles<2, KIND>(w, a, o, r0, r1, shared);
}

}  // namespace

// The fp32 tiles (up to 4 batch rows: the batch, or the last rows after tiles of 8) read the activations split
// into even and odd columns as fp32, made here once for the thread's rows rather than by a shift and an and for
// every 32 columns of every tile: those two ops shared the ports of the expand. With six rows a tile, 1.15-1.23x
// out of cache (4096x4096, 70%, batch 1, alternated in one process).
//
// Only on Intel: on a Zen 4 EPYC vdpbf16ps is the faster way, 3.7 against 4.8 cycles per 32 columns in L2 (1
// thread) and 1.09x out of cache (11008x4096, 70%, batch 1, alternated in one process).
namespace {

std::atomic<int> fma_setting{-1};  // -1: by the CPU; 0 or 1: set by bf16_fma_tiles

bool fma_tiles() {
  const int set = fma_setting.load(std::memory_order_relaxed);
  return set < 0 ? intel_cpu() : set == 1;
}

}  // namespace

bool bf16_fma_tiles(int64_t mode) {
  fma_setting.store(static_cast<int>(mode < 0 ? -1 : mode > 0), std::memory_order_relaxed);
  return fma_tiles();
}

void bf16_avx512(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
                 const Shared* shared) {
  const int64_t tail = a.batch % kMaxBatchTile == 0 ? kMaxBatchTile : a.batch % kMaxBatchTile;
  const int64_t split_rows = tail <= 4 && fma_tiles() ? tail : 0;
  const int64_t chunks = (w.cols + 31) / 32;
  thread_local std::vector<float> buffer;
  buffer.resize(static_cast<size_t>(split_rows * chunks * 32 + 16));
  float* split = buffer.data();
  split += (16 - reinterpret_cast<uintptr_t>(split) / 4 % 16) % 16;  // 64-byte aligned
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const uint16_t* x = static_cast<const uint16_t*>(a.data) + (a.batch - split_rows) * a.stride;
  for (int64_t b = 0; b < split_rows; ++b)
    for (int64_t k = 0; k < chunks; ++k) {
      const __m512i v = _mm512_loadu_si512(x + b * a.stride + k * 32);
      _mm512_store_si512(split + (b * chunks + k) * 32, _mm512_slli_epi32(v, 16));
      _mm512_store_si512(split + (b * chunks + k) * 32 + 16, _mm512_and_si512(v, odd));
    }
  Activations with_split = a;
  with_split.split = split_rows > 0 ? split : nullptr;
  rows<0>(w, with_split, o, r0, r1, shared);
}

void dense_bf16_avx512(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
                       const Shared* shared) {
  rows<1>(w, a, o, r0, r1, shared);
}

void int8_avx512(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
                 const Shared* shared) {
  rows<2>(w, a, o, r0, r1, shared);
}

namespace {

// Columns c..c+15 of an fp32 or bf16 activation row, as fp32.
inline __m512 load16(const void* x, bool bf16, int64_t c) {
  if (bf16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + c));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_loadu_ps(static_cast<const float*>(x) + c);
}

// Symmetric per-token quantization to +-levels: scale = max|x| / levels, q = round(x / scale) (ties to even),
// `put(c, q)` for 16 columns at once (int32 lanes) and `put1(c, q)` for the rest. Nothing is put when x is all
// zero. Division, not multiplication by 1/scale: it must round exactly as the reference's x / scale does.
template <typename Put, typename Put1>
float quantize(const void* x, bool bf16, int64_t cols, float levels, Put put, Put1 put1) {
  const int64_t full = cols - cols % 16;
  // max drops NaN, so a NaN or an infinity is caught apart: x * 0 is NaN for both, and NaN stays in a sum
  const __m512 zero = _mm512_setzero_ps();
  __m512 vmax = zero, poison = zero;
  for (int64_t c = 0; c < full; c += 16) {
    const __m512 v = load16(x, bf16, c);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    poison = _mm512_fmadd_ps(v, zero, poison);
  }
  float absmax = _mm512_reduce_max_ps(vmax);
  bool finite = !std::isnan(_mm512_reduce_add_ps(poison));
  for (int64_t c = full; c < cols; ++c) {
    const float v = activation(x, bf16, c);
    finite = finite && std::isfinite(v);
    absmax = std::max(absmax, std::fabs(v));
  }
  if (!finite) return std::numeric_limits<float>::quiet_NaN();  // the outputs then come out NaN, as in torch
  const float scale = absmax / levels;
  if (scale == 0.0f) return scale;
  const __m512 vscale = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-levels), hi = _mm512_set1_ps(levels);
  for (int64_t c = 0; c < full; c += 16) {
    const __m512 q =
        _mm512_roundscale_ps(_mm512_div_ps(load16(x, bf16, c), vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    put(c, _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, lo), hi)));
  }
  for (int64_t c = full; c < cols; ++c)
    put1(c, quantized(activation(x, bf16, c), scale, levels));
  return scale;
}

inline void store16_bytes(uint8_t* out, __m512i v) {  // the low byte of each int32 lane
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(v));
}

}  // namespace

void quantize_avx512(const void* x, bool bf16, int64_t cols, uint8_t* out, float* scale_out, bool offset) {
  const int shift = offset ? 128 : 0;
  *scale_out = quantize(
      x, bf16, cols, 127.0f,
      [&](int64_t c, __m512i q) { store16_bytes(out + c, _mm512_add_epi32(q, _mm512_set1_epi32(shift))); },
      [&](int64_t c, int q) { out[c] = static_cast<uint8_t>(q + shift); });
}

void quantize16_avx512(const void* x, bool bf16, int64_t cols, uint8_t* high, uint8_t* low, float* scale_out) {
  // q = 256 (q >> 8) + (q & 255) with an arithmetic shift: the high byte signed, the low one unsigned
  *scale_out = quantize(
      x, bf16, cols, 32767.0f,
      [&](int64_t c, __m512i q) {
        store16_bytes(high + c, _mm512_srai_epi32(q, 8));
        store16_bytes(low + c, q);
      },
      [&](int64_t c, int q) {
        high[c] = static_cast<uint8_t>(q >> 8);
        low[c] = static_cast<uint8_t>(q & 255);
      });
}

void decompress_avx512(const SparseMatrix& w, bool int8, uint16_t* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t* row = out + r * w.cols;
    if (!int8) {
      const uint32_t* m = reinterpret_cast<const uint32_t*>(w.mask + r * w.words);
      const uint16_t* p = static_cast<const uint16_t*>(w.values) + w.row_start[r];
      for (int64_t k = 0; k * 32 < w.cols; ++k) {
        const __m512i packed = load_opaque(p);
        p += _mm_popcnt_u32(m[k]);
        _mm512_mask_storeu_epi16(row + k * 32, tail_mask32(w.cols - k * 32),
                                 expand16(m[k], packed));
      }
      continue;
    }
    const uint64_t* m = w.mask + r * w.words;
    const int8_t* p = static_cast<const int8_t*>(w.values) + w.row_start[r];
    const __m512 scale = _mm512_set1_ps(w.scale[r]);
    for (int64_t k = 0; k < w.words; ++k) {
      const __m512i packed = load_opaque(p);
      p += _mm_popcnt_u64(m[k]);
      const __m512i q = expand8(m[k], packed);
      for (int part = 0; part < 4; ++part) {
        const int64_t col = k * 64 + part * 16;
        if (col >= w.cols) break;
        const __m128i lanes = part == 0   ? _mm512_extracti32x4_epi32(q, 0)
                              : part == 1 ? _mm512_extracti32x4_epi32(q, 1)
                              : part == 2 ? _mm512_extracti32x4_epi32(q, 2)
                                          : _mm512_extracti32x4_epi32(q, 3);
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lanes)), scale);
        const int64_t count = w.cols - col < 16 ? w.cols - col : 16;
        const __mmask16 keep = static_cast<__mmask16>((1u << count) - 1u);
        _mm256_mask_storeu_epi16(row + col, keep, (__m256i)_mm512_cvtneps_pbh(f));
      }
    }
  }
}

}  // namespace sparseft
