// The ops Python calls that live outside ops.cpp; ops.cpp binds every op into the extension module.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace sparseft {

// Fails (a RuntimeError in Python) unless this CPU runs instruction-set level `isa` (1 scalar, 2 AVX2, 3 AVX-512).
void check_isa(int64_t isa);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            int64_t isa);
at::Tensor store_and_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, int64_t position, int64_t first, double scale,
                            int64_t isa);
at::Tensor silu_mul(const at::Tensor& gate_up, int64_t isa);

}  // namespace sparseft
