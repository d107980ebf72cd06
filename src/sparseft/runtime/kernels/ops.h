// The ops Python calls that live outside ops.cpp; ops.cpp binds every op into the extension module.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace pybind11 {
class module_;
}

namespace sparseft {

// Fails (a RuntimeError in Python) unless this CPU runs instruction-set level `isa` (1 scalar, 2 AVX2, 3 AVX-512).
void check_isa(int64_t isa);

// y = x W^T + bias for a compressed W (see sparse.h), the kernel of level `isa`; `wide`: 16-bit activations (AMX).
at::Tensor sparse_mm(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                     const at::Tensor& row_start, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& rowsum, const std::optional<at::Tensor>& bias, int64_t cols,
                     int64_t isa, bool wide, int64_t group_size);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            int64_t isa);
at::Tensor store_and_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, int64_t position, int64_t first, double scale,
                            int64_t isa);
at::Tensor silu_mul(const at::Tensor& gate_up, int64_t isa);

// Adds the LayerStack and WhisperStack classes (decode_step.cpp) to the extension module.
void bind_layer_stack(pybind11::module_& m);

}  // namespace sparseft
