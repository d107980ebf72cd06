// Rotary position embedding of the query and key in one op, rounded as transformers' apply_rotary_pos_emb rounds
// it: x * cos + rotate_half(x) * sin, each product and the sum rounded to x's dtype (torch computes a bf16 op in
// fp32 and rounds its result). Per layer and token that function is about sixteen small torch ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>

#include "ops.h"
#include "sparse.h"

namespace sparseft {
namespace {

// x (B, H, T, D) with a unit last stride; cos, sin (B, T, D) likewise; out (B, H, T, D) contiguous.
template <typename T>
void rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3), half = D / 2;
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* cp = reinterpret_cast<const T*>(cos.data_ptr());
  const T* sp = reinterpret_cast<const T*>(sin.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const T kind{};
  // (batch, head) pairs split across torch's threads once there are some 16K values a thread (a prompt's); a
  // decoding step's few stay on the calling thread. Each value is computed the same either way.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, S * D));
  at::parallel_for(0, B * H, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / H, h = p % H;
      for (int64_t t = 0; t < S; ++t) {
        const T* in = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        const T* c = cp + b * cos.stride(0) + t * cos.stride(1);
        const T* s = sp + b * sin.stride(0) + t * sin.stride(1);
        T* o = op + ((b * H + h) * S + t) * D;
        for (int64_t d = 0; d < D; ++d) {
          // rotate_half: the second half negated, then the first half (negation is exact)
          const float turned = d < half ? -as_f32(in[d + half]) : as_f32(in[d - half]);
          put(o + d, rounded(as_f32(in[d]) * as_f32(c[d]), kind) + rounded(turned * as_f32(s[d]), kind));
        }
      }
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
              "sparseft: rotary runs on the CPU");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && sin.sizes() == cos.sizes(),
              "sparseft: rotary takes q, k (B, H, T, D) and cos, sin (B, T, D)");
  TORCH_CHECK(cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && cos.size(2) == x.size(3) &&
                  x.size(3) % 2 == 0,
              "sparseft: rotary shapes do not match");
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && x.scalar_type() == sin.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "sparseft: rotary takes float32 or bfloat16 tensors of one dtype");
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(2) == 1 && sin.stride(2) == 1,
              "sparseft: rotary needs unit last strides");
}

at::Tensor rotated(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat)
    rotate<float>(x, cos, sin, out);
  else
    rotate<uint16_t>(x, cos, sin, out);
  return out;
}

}  // namespace

// Both tensors in one call: each op call costs microseconds before it computes anything.
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin) {
  check(q, cos, sin);
  check(k, cos, sin);
  return {rotated(q, cos, sin), rotated(k, cos, sin)};
}

}  // namespace sparseft
