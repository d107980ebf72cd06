// Shared types of the sparse CPU kernels. No torch here: the kernel files are plain C++ over pointers, each
// compiled for one instruction set, and ops.cpp is the only file that talks to torch.
//
// Layout of a compressed weight W (rows x cols), the bitmask archive's own layout with each mask row padded:
//   mask       rows x words uint64, words = ceil(cols / 64); column j of a row is bit j % 64 of word j / 64,
//              least significant bit first (the archive's bytes read as little-endian words).
//   values     the nonzeros in row-major order (bf16 bits, int8, or int4 two to a byte: value k is the low nibble
//              (k even) or the high nibble (k odd) of byte k / 2, as the archive stores them), followed by at
//              least 64 bytes of zeros so that full-vector loads at the end of the last row never read past the
//              buffer.
//   row_start  rows + 1 offsets into values, counted in values (the archive's row_offsets plus the total). int4
//              rows may start in the middle of a byte; row_start[0] is 0 or (int4, rows cut from a larger
//              weight) 1.
// Activations are batch rows of words * 64 elements each, zero beyond cols (a zero weight times a garbage
// activation could still be NaN, so the padding must really be zero).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace sparseft {

struct SparseMatrix {
  const uint64_t* mask;
  const void* values;
  const int64_t* row_start;
  int64_t rows, cols, words;
  const float* scale;     // int8 only: per-row dequantization scale
  const int32_t* rowsum;  // int8 only: per-row sum of the int8 values (for the u8 x s8 zero-point correction)
  // int4 only: the scale of each group of group_size input columns, rows x groups, fp32 or bf16 bits. group_size
  // is a multiple of 32 (the vector kernels apply a scale per 32 columns at the finest).
  const void* group_scale = nullptr;
  bool group_scale_bf16 = false;
  int64_t group_size = 0, groups = 0;
};

static inline bool is_int4(const SparseMatrix& w) { return w.group_size > 0; }

struct Activations {
  const void* data;    // bf16 bits, or int8 (uint8 = int8 + 128 for the VNNI kernel)
  const float* scale;  // int8 only: per-row quantization scale
  int64_t batch, stride;
  const uint32_t* pairs = nullptr;  // AMX kernels only: 32-bit words of columns (interleave's layout)
  const float* split = nullptr;     // bf16 expand kernel only: per 32 columns, the 16 even then 16 odd as fp32,
                                    // of the batch rows of its last tile when that has at most 4
  const uint32_t* low_pairs = nullptr;  // int8_wide_amx only: `pairs` holds the high bytes of 16-bit
                                        // activations, this their low bytes
};

struct Output {
  void* data;  // y[b * stride + r], fp32 or bf16
  bool bf16;
  int64_t stride;
  const float* bias;  // fp32 or null
};

// How the threads of one call share its rows. Part p owns rows [bounds[p], bounds[p + 1]) (about equal bytes
// to read, ops.cpp's split) and takes its tile steps through counters[p]; a thread through with its own part takes
// the steps still left in the others', so a thread the machine slows down does not hold up the call. Each counter
// has a cache line of its own: the owner writes it every few steps.
struct alignas(64) StepCounter {
  std::atomic<int64_t> next{0};
};
struct Shared {
  StepCounter* counters;
  const int64_t* bounds;
  int64_t parts, part;  // this thread's part
};

// The tile steps a thread runs, `taken` at a time: run(p0, step, t0, t1) for steps [t0, t1) of the part starting at
// row p0, whose rows go in step = rows / n steps of n rows spaced `step` apart. Without `shared`, every step of
// [r0, r1) in order; with it, its own part's steps through the part's counter, then those left in the others'. The
// rows of a part that do not fill a step stay with its owner: the caller runs them.
template <typename Run>
inline void for_each_step(const Shared* shared, int64_t r0, int64_t r1, int64_t n, int64_t taken, Run run) {
  if (shared == nullptr) {
    const int64_t step = (r1 - r0) / n;
    for (int64_t t0 = 0; t0 < step; t0 += taken) run(r0, step, t0, t0 + taken < step ? t0 + taken : step);
    return;
  }
  for (int64_t k = 0; k < shared->parts; ++k) {
    const int64_t part = (shared->part + k) % shared->parts;
    const int64_t p0 = shared->bounds[part], step = (shared->bounds[part + 1] - p0) / n;
    std::atomic<int64_t>& next = shared->counters[part].next;
    for (int64_t t0 = next.fetch_add(taken, std::memory_order_relaxed); t0 < step;
         t0 = next.fetch_add(taken, std::memory_order_relaxed))
      run(p0, step, t0, t0 + taken < step ? t0 + taken : step);
  }
}

// Kernels compute rows [r0, r1) of y = W x for every batch row; ops.cpp splits rows across threads. With `shared`
// (null on one thread) [r0, r1) is part shared->part, and a kernel may also take rows of the other parts through
// it (the AVX-512 expand kernels and the AMX kernels do).
using Kernel = void (*)(const SparseMatrix&, const Activations&, const Output&, int64_t r0, int64_t r1,
                        const Shared* shared);

void bf16_scalar(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);
void int8_scalar(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);
void bf16_avx2(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);
void int8_avx2(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);
// int4 values times per-token int8 activations (not offset): exact integer sums per group, times the group's
// scale, summed in fp32. On AVX-512 CPUs the AVX2 kernel runs them.
void int4_scalar(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);
void int4_avx2(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);
void bf16_avx512(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);
// Whether the CPU is Intel's: some choices between equally correct kernels follow the vendor's cores.
bool intel_cpu();
// Whether bf16_avx512 multiplies tiles of up to 4 batch rows with fp32 FMAs (by default on Intel) or vdpbf16ps
// (elsewhere): `mode` 1 or 0 sets it (for the tests, which check both ways on any CPU), -1 goes back to the CPU's.
bool bf16_fma_tiles(int64_t mode);
// AMX (tdpbf16ps, tdpbssd) for batch 1..kAmxBatch with `pairs` prepared by `interleave` (for (batch + 15) / 16
// groups of min(batch, 16) rows, row_words * min(batch, 16) words each); kAmxBuilt is false where the compiler
// had no AMX intrinsics (the kernels then run the expand kernels). ops.cpp gives them larger batches in pieces.
constexpr int64_t kAmxBatch = 64;
// `interleave`'s layout: groups of 16 batch rows, or one group as wide as the batch below 16 (no padding to load
// and multiply); interleaved_words is the size it writes.
static inline int64_t group_width(int64_t batch) { return batch < 16 ? batch : 16; }
static inline int64_t interleaved_words(int64_t batch, int64_t row_words) {
  return (batch + 15) / 16 * group_width(batch) * row_words;
}
extern const bool kAmxBuilt;
void bf16_amx(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);
void int8_amx(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);
void interleave(const void* x, int64_t batch, int64_t row_words, bool signed_bytes, uint32_t* out);
// int8 weights times 16-bit per-token activations (quantize16_avx512) on AMX, batch 1..kAmxWideBatch: each
// activation q = 256 high + low is two bytes, the high one signed (tdpbssd) and the low one unsigned (tdpbsud),
// so the dot products stay exact integers and the activations lose next to nothing: for int8 prompts past 32
// tokens (dispatch.py's `wide`). Each byte needs result tiles of its own: 32 batch rows a pass.
constexpr int64_t kAmxWideBatch = 32;
void int8_wide_amx(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);
void int8_avx512(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);

// Dense bf16 y = W x (W rows x cols, row-major, unpadded): the strongest dense baseline we can write, also
// used for dense layers of a sparse model (the LM head). W is passed as a SparseMatrix with mask = null.
void dense_bf16_avx512(const SparseMatrix&, const Activations&, const Output&, int64_t, int64_t, const Shared*);

// Symmetric per-token int8 of one activation row (fp32 or bf16 `x`): scale = max|x| / 127, q = round(x / scale)
// (ties to even), stored as int8, or as uint8 q + 128 with `offset`. Leaves `out` untouched when x is all zero, or
// holds a NaN or an infinity (the scale is then NaN, and so are the outputs).
void quantize_avx512(const void* x, bool bf16, int64_t cols, uint8_t* out, float* scale, bool offset);
// The same on AVX2, as int8 (no offset: the AVX2 kernels take signed activations).
void quantize_avx2(const void* x, bool bf16, int64_t cols, int8_t* out, float* scale);
// Symmetric per-token 16-bit, the same way with 32767 for 127: q = 256 high + low, high stored as int8, low as
// uint8.
void quantize16_avx512(const void* x, bool bf16, int64_t cols, uint8_t* high, uint8_t* low, float* scale);

// Rows [r0, r1) of the dense bf16 matrix (rows x cols): W itself, or W * scale for int8 and int4 values.
void decompress_scalar(const SparseMatrix&, bool int8, uint16_t* out, int64_t r0, int64_t r1);
void decompress_avx512(const SparseMatrix&, bool int8, uint16_t* out, int64_t r0, int64_t r1);

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch does; NaN stays NaN.
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Elementwise ops on fp32 or bf16 (uint16_t) tensors, rounding as torch does: compute in fp32, and round every
// result to the tensor's dtype.
static inline float as_f32(float v) { return v; }
static inline float as_f32(uint16_t v) { return bf16_to_f32(v); }
static inline float rounded(float v, float) { return v; }
static inline float rounded(float v, uint16_t) { return bf16_to_f32(f32_to_bf16(v)); }
static inline void put(float* out, float v) { *out = v; }
static inline void put(uint16_t* out, float v) { *out = f32_to_bf16(v); }

// Element c of an fp32 or bf16 activation row as fp32, and its quantized value: x / scale rounded to nearest even
// (the reference's division, not a multiplication by 1 / scale), within +-levels. The per-token quantizers' scalar
// tails.
static inline float activation(const void* x, bool bf16, int64_t c) {
  return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(x)[c]) : static_cast<const float*>(x)[c];
}
static inline int quantized(float x, float scale, float levels) {
  return static_cast<int>(std::min(levels, std::max(-levels, std::nearbyint(x / scale))));
}

// Value k of int4 values, sign-extended.
static inline int nibble(const uint8_t* values, int64_t k) {
  const int v = (values[k >> 1] >> ((k & 1) * 4)) & 0xf;
  return v - ((v & 8) << 1);
}

static inline float group_scale(const SparseMatrix& w, int64_t r, int64_t g) {
  const int64_t i = r * w.groups + g;
  return w.group_scale_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(w.group_scale)[i])
                            : static_cast<const float*>(w.group_scale)[i];
}

static inline void store(const Output& o, int64_t b, int64_t r, float v) {
  if (o.bias) v += o.bias[r];
  if (o.bf16)
    static_cast<uint16_t*>(o.data)[b * o.stride + r] = f32_to_bf16(v);
  else
    static_cast<float*>(o.data)[b * o.stride + r] = v;
}

}  // namespace sparseft
