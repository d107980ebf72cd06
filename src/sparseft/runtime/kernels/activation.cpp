// SiLU(gate) * up of the gated MLPs (Llama and its kin) in one op, over the packed gate/up linear's output: per row,
// the first half of the features is the gate, the second half the up projection. Rounded as torch's
// `silu(gate) * up` rounds it: silu(x) = x / (1 + e^-x) in fp32, rounded to the dtype, then the product in fp32,
// rounded again. The exp is the one torch's vectorized silu calls (vec_avx2.h), so each value has torch's bits
// wherever torch computes it with that exp (see runtime/models/ops.py for where it does not). Two torch ops and
// their views and allocation cost more per decoder layer than the arithmetic does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops.h"
#include "sparse.h"
#include "vec_avx2.h"

namespace sparseft {
namespace {

template <typename T>
void silu_mul_scalar(const T* gate, const T* up, T* out, int64_t n) {
  const T kind{};
  for (int64_t i = 0; i < n; ++i) {
    const float x = as_f32(gate[i]);
    put(out + i, rounded(x / (1.0f + exp1(-x)), kind) * as_f32(up[i]));
  }
}

// x / (1 + e^-x) for N vectors at once (see exp8).
template <int N>
SPARSEFT_AVX2 inline void silu8(__m256 (&x)[N]) {
  __m256 e[N];
  for (int k = 0; k < N; ++k) e[k] = _mm256_xor_ps(x[k], _mm256_set1_ps(-0.0f));
  exp8(e);
  for (int k = 0; k < N; ++k) x[k] = _mm256_div_ps(x[k], _mm256_add_ps(_mm256_set1_ps(1.0f), e[k]));
}

// A bf16 value's fp32 bits, rounded from fp32 (bf16_bits, shifted back up).
SPARSEFT_AVX2 inline __m256 round_bf16(__m256 x) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(x), 16));
}

// 32 values a pass, as four vectors of 8 (each pass's even and odd columns of two blocks of 16).
SPARSEFT_AVX2 void silu_mul_avx2(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 g[4], u[4];
    for (int b = 0; b < 2; ++b) {
      split_bf16(gate + i + 16 * b, &g[2 * b], &g[2 * b + 1]);
      split_bf16(up + i + 16 * b, &u[2 * b], &u[2 * b + 1]);
    }
    silu8(g);
    for (int k = 0; k < 4; ++k) g[k] = _mm256_mul_ps(round_bf16(g[k]), u[k]);
    for (int b = 0; b < 2; ++b) store_bf16(out + i + 16 * b, g[2 * b], g[2 * b + 1]);
  }
  silu_mul_scalar(gate + i, up + i, out + i, n - i);
}

SPARSEFT_AVX2 void silu_mul_avx2(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 g[4];
    for (int k = 0; k < 4; ++k) g[k] = _mm256_loadu_ps(gate + i + 8 * k);
    silu8(g);
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + i + 8 * k, _mm256_mul_ps(g[k], _mm256_loadu_ps(up + i + 8 * k)));
  }
  silu_mul_scalar(gate + i, up + i, out + i, n - i);
}

template <typename T>
void silu_mul_rows(const at::Tensor& x, at::Tensor& y, int64_t isa) {
  const int64_t inner = y.size(-1), rows = inner ? y.numel() / inner : 0;
  const T* in = reinterpret_cast<const T*>(x.data_ptr());
  T* out = reinterpret_cast<T*>(y.data_ptr());
  // Rows split across torch's threads once there are some 32K values a thread (a prompt's); a decoding step's
  // few rows stay on the calling thread. Each value is computed the same either way.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, inner));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gate = in + r * 2 * inner;
      if (isa >= 2)
        silu_mul_avx2(gate, gate + inner, out + r * inner, inner);
      else
        silu_mul_scalar(gate, gate + inner, out + r * inner, inner);
    }
  });
}

}  // namespace

// gate_up (..., 2 * inner), float32 or bfloat16; returns (..., inner) of its dtype. `isa`: 2 or 3 run the AVX2
// code, 1 the portable one (the same values).
at::Tensor silu_mul(const at::Tensor& gate_up, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(gate_up.device().is_cpu(), "sparseft: silu_mul runs on the CPU");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "sparseft: silu_mul takes float32 or bfloat16");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "sparseft: silu_mul takes the gate and up halves of an even last dimension, got ", gate_up.sizes());
  const at::Tensor x = gate_up.contiguous();
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() /= 2;
  at::Tensor y = at::empty(shape, x.options());
  if (x.scalar_type() == at::kFloat)
    silu_mul_rows<float>(x, y, isa);
  else
    silu_mul_rows<uint16_t>(x, y, isa);
  return y;
}

}  // namespace sparseft
