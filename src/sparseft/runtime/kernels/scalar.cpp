// Portable kernels: plain C++ that any compiler and CPU can run, walking the set bits of each mask word.
// They define what the vector kernels must compute (int8: exact integer dot products, signed activations).
#include "sparse.h"

namespace sparseft {

void bf16_scalar(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
                 const Shared*) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b = 0; b < a.batch; ++b) {
      const uint16_t* x = static_cast<const uint16_t*>(a.data) + b * a.stride;
      const uint16_t* p = static_cast<const uint16_t*>(w.values) + w.row_start[r];
      float acc = 0.0f;
      for (int64_t k = 0; k < w.words; ++k) {
        for (uint64_t bits = w.mask[r * w.words + k]; bits != 0; bits &= bits - 1)
          acc += bf16_to_f32(*p++) * bf16_to_f32(x[k * 64 + __builtin_ctzll(bits)]);
      }
      store(o, b, r, acc);
    }
  }
}

void int8_scalar(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
                 const Shared*) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b = 0; b < a.batch; ++b) {
      const int8_t* x = static_cast<const int8_t*>(a.data) + b * a.stride;
      const int8_t* p = static_cast<const int8_t*>(w.values) + w.row_start[r];
      int64_t acc = 0;
      for (int64_t k = 0; k < w.words; ++k) {
        for (uint64_t bits = w.mask[r * w.words + k]; bits != 0; bits &= bits - 1)
          acc += int64_t{*p++} * x[k * 64 + __builtin_ctzll(bits)];
      }
      store(o, b, r, static_cast<float>(acc) * a.scale[b] * w.scale[r]);
    }
  }
}

void int4_scalar(const SparseMatrix& w, const Activations& a, const Output& o, int64_t r0, int64_t r1,
                 const Shared*) {
  const uint8_t* values = static_cast<const uint8_t*>(w.values);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b = 0; b < a.batch; ++b) {
      const int8_t* x = static_cast<const int8_t*>(a.data) + b * a.stride;
      int64_t next = w.row_start[r], group = 0, sum = 0;
      float acc = 0.0f;
      for (int64_t k = 0; k < w.words; ++k) {
        for (uint64_t bits = w.mask[r * w.words + k]; bits != 0; bits &= bits - 1) {
          const int64_t c = k * 64 + __builtin_ctzll(bits);
          if (c / w.group_size != group) {  // columns come in order, so each group's sum closes once
            acc += static_cast<float>(sum) * group_scale(w, r, group);
            sum = 0;
            group = c / w.group_size;
          }
          sum += int64_t{nibble(values, next++)} * x[c];
        }
      }
      acc += static_cast<float>(sum) * group_scale(w, r, group);
      store(o, b, r, acc * a.scale[b]);
    }
  }
}

void decompress_scalar(const SparseMatrix& w, bool int8, uint16_t* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t* row = out + r * w.cols;
    for (int64_t c = 0; c < w.cols; ++c) row[c] = 0;
    int64_t next = w.row_start[r];
    for (int64_t k = 0; k < w.words; ++k) {
      for (uint64_t bits = w.mask[r * w.words + k]; bits != 0; bits &= bits - 1) {
        const int64_t c = k * 64 + __builtin_ctzll(bits);
        if (is_int4(w))
          row[c] = f32_to_bf16(static_cast<float>(nibble(static_cast<const uint8_t*>(w.values), next++)) *
                               group_scale(w, r, c / w.group_size));
        else if (int8)
          row[c] = f32_to_bf16(static_cast<float>(static_cast<const int8_t*>(w.values)[next++]) * w.scale[r]);
        else
          row[c] = static_cast<const uint16_t*>(w.values)[next++];
      }
    }
  }
}

}  // namespace sparseft
