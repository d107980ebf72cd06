// A decoding step of the own Llama-family decoder (runtime/models/llama.py) through all its layers in one call.
// Each layer is the same ops, in the same order, as the decoder's Python `_block`, so the step gives the same bits;
// what it saves is the dozen-odd Python calls per layer around them, which cost more than the norms, rotary and
// attention themselves once the linears are fast (benchmarks/cpu_decode.py's time outside the linears).
// Scope, checked by the caller (runtime/models/step.py): bfloat16, one token per row at one shared position,
// the decoding attention op's head sizes, a full rotary, batches the sparse kernels take without decompressing.
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "ops.h"
#include "sparse.h"

namespace sparseft {
namespace {

struct Linear {
  at::Tensor mask, values, row_start;
  std::optional<at::Tensor> scale, rowsum, bias;
  int64_t cols, group_size;
};

struct Layer {
  at::Tensor input_norm, post_norm;
  std::optional<at::Tensor> q_norm, k_norm;
  int64_t window;                // -1: full attention
  std::vector<Linear> linears;  // q/k/v, o, gate/up, down
};

// h += y, both bfloat16 and contiguous, rounded as torch rounds a bf16 add (in fp32, then to nearest even).
void add_into(at::Tensor& h, const at::Tensor& y) {
  auto* out = reinterpret_cast<uint16_t*>(h.data_ptr());
  const auto* in = reinterpret_cast<const uint16_t*>(y.data_ptr());
  for (int64_t i = 0, n = h.numel(); i < n; ++i) out[i] = f32_to_bf16(bf16_to_f32(out[i]) + bf16_to_f32(in[i]));
}

class LayerStack {
 public:
  LayerStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale) {
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim % 32 == 0 && head_dim <= 256,
                "sparseft: LayerStack takes heads a multiple of kv_heads and a head size in 32, 64, ..., 256");
  }

  void add_layer(const at::Tensor& input_norm, const at::Tensor& post_norm, const std::optional<at::Tensor>& q_norm,
                 const std::optional<at::Tensor>& k_norm, int64_t window) {
    TORCH_CHECK(input_norm.scalar_type() == at::kBFloat16 && post_norm.scalar_type() == at::kBFloat16,
                "sparseft: LayerStack runs bfloat16 models");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "sparseft: q and k norms come together");
    layers_.push_back(Layer{input_norm, post_norm, q_norm, k_norm, window, {}});
  }

  // The linears of the last layer added, in the order q/k/v, o, gate/up, down.
  void add_linear(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& row_start,
                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& rowsum,
                  const std::optional<at::Tensor>& bias, int64_t cols, int64_t group_size) {
    TORCH_CHECK(!layers_.empty() && layers_.back().linears.size() < 4, "sparseft: add a layer before its 4 linears");
    layers_.back().linears.push_back(Linear{mask, values, row_start, scale, rowsum, bias, cols, group_size});
  }

  // h (B, 1, hidden) through every layer; cos, sin (B, 1, head_dim) of the step's position; the layers' key and
  // value caches (B, Hkv, capacity, D), the step's keys and values written at row `position`. `stub`: every
  // linear gives zeros instead (to time the rest).
  at::Tensor step(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                  const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values, int64_t position,
                  int64_t isa, bool stub) const {
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(),
                "sparseft: LayerStack.step takes the key and value caches of its ", layers_.size(), " layers");
    TORCH_CHECK(hidden.dim() == 3 && hidden.size(1) == 1 && hidden.scalar_type() == at::kBFloat16,
                "sparseft: LayerStack.step takes bfloat16 hidden states (B, 1, hidden)");
    for (const Layer& layer : layers_)
      TORCH_CHECK(layer.linears.size() == 4, "sparseft: a layer of the LayerStack lacks its linears");
    const int64_t batch = hidden.size(0);
    const auto linear = [&](const Linear& w, const at::Tensor& x) {
      if (stub) {
        std::vector<int64_t> sizes = x.sizes().vec();
        sizes.back() = w.mask.size(0);
        return at::zeros(sizes, x.options());
      }
      return sparse_mm(x, w.mask, w.values, w.row_start, w.scale, w.rowsum, w.bias, w.cols, isa, false,
                       w.group_size);
    };
    at::Tensor h = hidden.contiguous().clone();
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      const at::Tensor y = linear(layer.linears[0], rms_norm(h, layer.input_norm, eps_));
      // q, k and v (B, heads, 1, D) as views of the packed output, as the Python block takes them
      const at::Tensor packed = y.view({batch, 1, -1, head_dim_}).transpose(1, 2);
      at::Tensor q = packed.narrow(1, 0, heads_), k = packed.narrow(1, heads_, kv_heads_);
      const at::Tensor v = packed.narrow(1, heads_ + kv_heads_, kv_heads_);
      if (layer.q_norm) {
        q = rms_norm(q, *layer.q_norm, eps_);
        k = rms_norm(k, *layer.k_norm, eps_);
      }
      const auto [q_turned, k_turned] = rotary(q, k, cos, sin);
      const int64_t first = layer.window < 0 ? 0 : std::max<int64_t>(0, position + 1 - layer.window);
      const at::Tensor a =
          store_and_attend(q_turned, k_turned, v, keys[i], values[i], position, first, scale_, isa);
      add_into(h, linear(layer.linears[1], a.reshape({batch, 1, heads_ * head_dim_})));
      const at::Tensor gate_up = linear(layer.linears[2], rms_norm(h, layer.post_norm, eps_));
      add_into(h, linear(layer.linears[3], silu_mul(gate_up, isa)));
    }
    return h;
  }

 private:
  int64_t heads_, kv_heads_, head_dim_;
  double eps_, scale_;
  std::vector<Layer> layers_;
};

}  // namespace

void bind_layer_stack(pybind11::module_& m) {
  const auto free = pybind11::call_guard<pybind11::gil_scoped_release>();
  pybind11::class_<LayerStack>(m, "LayerStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &LayerStack::add_layer)
      .def("add_linear", &LayerStack::add_linear)
      .def("step", &LayerStack::step, free);
}

}  // namespace sparseft
