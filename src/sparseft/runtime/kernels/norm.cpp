// RMSNorm of Llama and its kin in one op: per row, y = w * (x * rsqrt(mean(x^2) + eps)) rounded the way
// transformers' LlamaRMSNorm rounds it (normalised in fp32, cast to the input's dtype, then multiplied by the
// weight in that dtype). Eight small torch ops a norm cost about 26 us a call, twice per decoder layer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "ops.h"
#include "sparse.h"

namespace sparseft {
namespace {

template <typename T>
void rms_rows(const T* x, const T* w, T* y, int64_t rows, int64_t cols, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = x + r * cols;
    T* out = y + r * cols;
    // In double, wider than torch's fp32 mean, so at worst the last bit of the variance differs; four sums
    // run side by side rather than one chain of dependent adds.
    double squares[4] = {0, 0, 0, 0};
    int64_t c = 0;
    for (; c + 4 <= cols; c += 4)
      for (int k = 0; k < 4; ++k) squares[k] += static_cast<double>(as_f32(in[c + k])) * as_f32(in[c + k]);
    for (; c < cols; ++c) squares[0] += static_cast<double>(as_f32(in[c])) * as_f32(in[c]);
    const double total = (squares[0] + squares[1]) + (squares[2] + squares[3]);
    const float variance = static_cast<float>(total / static_cast<double>(cols));
    const float inv = 1.0f / std::sqrt(variance + eps);
    for (c = 0; c < cols; ++c) put(out + c, as_f32(w[c]) * rounded(as_f32(in[c]) * inv, T{}));
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "sparseft: rms_norm runs on the CPU");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "sparseft: rms_norm takes float32 or bfloat16 input and weight of the same dtype");
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && x.size(-1) == weight.size(0),
              "sparseft: rms_norm weight must have one entry per feature");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t cols = weight.size(0), rows = cols ? xc.numel() / cols : 0;
  // Rows split across torch's threads once there are some 32K values a thread (a prompt's; each row is computed
  // the same either way); a decoding step's few rows stay on the calling thread. 256 tokens of 2048: 1.6 ms a
  // call on one thread, twice torch's norm.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, cols));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    if (x.scalar_type() == at::kFloat)
      rms_rows(xc.data_ptr<float>() + r0 * cols, wc.data_ptr<float>(), y.data_ptr<float>() + r0 * cols, r1 - r0,
               cols, static_cast<float>(eps));
    else
      rms_rows(reinterpret_cast<const uint16_t*>(xc.data_ptr()) + r0 * cols,
               reinterpret_cast<const uint16_t*>(wc.data_ptr()), reinterpret_cast<uint16_t*>(y.data_ptr()) + r0 * cols,
               r1 - r0, cols, static_cast<float>(eps));
  });
  return y;
}

}  // namespace sparseft
