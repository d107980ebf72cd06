// A decoding step of the own decoders through all their layers in one call: `LayerStack` for the Llama family
// (runtime/models/llama.py), `WhisperStack` for Whisper's decoder (runtime/models/whisper.py). Each layer is the
// same ops, in the same order, as the decoder's Python code, so the step gives the same bits; what it saves is the
// dozen-odd Python calls per layer around them, which cost more than the norms, rotary and attention themselves
// once the linears are fast (benchmarks/cpu_decode.py's time outside the linears).
// Scope, checked by the caller (runtime/models/step.py): bfloat16, one token per row (at one shared position, or
// for the Llama family at positions of their own), the decoding attention op's head sizes, a full rotary (Llama
// family), batches the sparse kernels take without decompressing.
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <optional>
#include <utility>
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

// y = x W^T + bias as SparseLinear computes it for a decoding batch; `stub`: zeros instead (to time the rest).
at::Tensor apply(const Linear& w, const at::Tensor& x, int64_t isa, bool stub) {
  if (stub) {
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = w.mask.size(0);
    return at::zeros(sizes, x.options());
  }
  return sparse_mm(x, w.mask, w.values, w.row_start, w.scale, w.rowsum, w.bias, w.cols, isa, false, w.group_size);
}

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
    return run(hidden, cos, sin, keys, values, isa, stub,
               [&](size_t i, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window) {
                 return store_and_attend(q, k, v, keys[i], values[i], position, first(window, position), scale_,
                                         isa);
               });
  }

  // The same with each row at a position of its own (a server's running requests): row r of the batch is row
  // slots[r] of the caches (S, Hkv, capacity, D), its keys and values written at positions[r], and it attends over
  // its own cached rows only, as it would alone.
  at::Tensor step_rows(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                       const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                       const std::vector<int64_t>& slots, const std::vector<int64_t>& positions, int64_t isa,
                       bool stub) const {
    TORCH_CHECK(static_cast<int64_t>(slots.size()) == hidden.size(0) && positions.size() == slots.size(),
                "sparseft: LayerStack.step_rows takes a cache row and a position for each batch row");
    for (const at::Tensor& cache : keys)
      for (int64_t slot : slots)
        TORCH_CHECK(0 <= slot && slot < cache.size(0), "sparseft: cache row ", slot, " is not in the cache");
    return run(hidden, cos, sin, keys, values, isa, stub,
               [&](size_t i, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window) {
                 std::vector<at::Tensor> rows;
                 for (size_t r = 0; r < slots.size(); ++r) {
                   const int64_t b = static_cast<int64_t>(r), p = positions[r];
                   rows.push_back(store_and_attend(q.narrow(0, b, 1), k.narrow(0, b, 1), v.narrow(0, b, 1),
                                                   keys[i].narrow(0, slots[r], 1), values[i].narrow(0, slots[r], 1),
                                                   p, first(window, p), scale_, isa));
                 }
                 return at::cat(rows);
               });
  }

 private:
  // The first cached row a query at `position` sees: all of them, or the last `window` with a sliding window.
  static int64_t first(int64_t window, int64_t position) {
    return window < 0 ? 0 : std::max<int64_t>(0, position + 1 - window);
  }

  // The layers, with attend(layer, q, k, v, window) writing the step's keys and values and returning the
  // attention (B, 1, H, D).
  template <typename Attend>
  at::Tensor run(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                 const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values, int64_t isa, bool stub,
                 Attend attend) const {
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(),
                "sparseft: LayerStack.step takes the key and value caches of its ", layers_.size(), " layers");
    TORCH_CHECK(hidden.dim() == 3 && hidden.size(1) == 1 && hidden.scalar_type() == at::kBFloat16,
                "sparseft: LayerStack.step takes bfloat16 hidden states (B, 1, hidden)");
    for (const Layer& layer : layers_)
      TORCH_CHECK(layer.linears.size() == 4, "sparseft: a layer of the LayerStack lacks its linears");
    const int64_t batch = hidden.size(0);
    const auto linear = [&](const Linear& w, const at::Tensor& x) { return apply(w, x, isa, stub); };
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
      const at::Tensor a = attend(i, q_turned, k_turned, v, layer.window);
      add_into(h, linear(layer.linears[1], a.reshape({batch, 1, heads_ * head_dim_})));
      const at::Tensor gate_up = linear(layer.linears[2], rms_norm(h, layer.post_norm, eps_));
      add_into(h, linear(layer.linears[3], silu_mul(gate_up, isa)));
    }
    return h;
  }

  int64_t heads_, kv_heads_, head_dim_;
  double eps_, scale_;
  std::vector<Layer> layers_;
};

// Whisper's decoder layers: pre-norm self-attention (the query scaled before attending, attention unscaled), the
// same over the encoder's keys and values, and the MLP with exact GELU; LayerNorms with weight and bias. The norms
// and GELU are ATen's own ops, which the Python code calls too.
struct WhisperLayer {
  std::array<std::pair<at::Tensor, at::Tensor>, 3> norms;  // before self-attention, cross-attention, MLP
  std::vector<Linear> linears;                              // q/k/v, out, cross q, cross out, fc1, fc2
};

class WhisperStack {
 public:
  WhisperStack(int64_t heads, int64_t head_dim, double eps, double scale)
      : heads_(heads), head_dim_(head_dim), eps_(eps), scale_(scale) {
    TORCH_CHECK(heads > 0 && head_dim % 32 == 0 && head_dim <= 256,
                "sparseft: WhisperStack takes a head size in 32, 64, ..., 256");
  }

  void add_layer(const std::vector<at::Tensor>& norms) {
    TORCH_CHECK(norms.size() == 6, "sparseft: a Whisper layer has three LayerNorms, each a weight and a bias");
    for (const at::Tensor& t : norms)
      TORCH_CHECK(t.scalar_type() == at::kBFloat16, "sparseft: WhisperStack runs bfloat16 models");
    layers_.push_back(WhisperLayer{{{{norms[0], norms[1]}, {norms[2], norms[3]}, {norms[4], norms[5]}}}, {}});
  }

  void add_linear(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& row_start,
                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& rowsum,
                  const std::optional<at::Tensor>& bias, int64_t cols, int64_t group_size) {
    TORCH_CHECK(!layers_.empty() && layers_.back().linears.size() < 6, "sparseft: add a layer before its 6 linears");
    layers_.back().linears.push_back(Linear{mask, values, row_start, scale, rowsum, bias, cols, group_size});
  }

  // h (B, 1, width) through every layer; the self-attention caches (B, H, capacity, D), the step's keys and
  // values written at row `position`; the encoder's keys and values of each layer (B, H, S, D).
  at::Tensor step(const at::Tensor& hidden, const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                  const std::vector<at::Tensor>& cross_keys, const std::vector<at::Tensor>& cross_values,
                  int64_t position, int64_t isa, bool stub) const {
    const size_t n = layers_.size();
    TORCH_CHECK(keys.size() == n && values.size() == n && cross_keys.size() == n && cross_values.size() == n,
                "sparseft: WhisperStack.step takes the caches of its ", n, " layers");
    TORCH_CHECK(hidden.dim() == 3 && hidden.size(1) == 1 && hidden.scalar_type() == at::kBFloat16,
                "sparseft: WhisperStack.step takes bfloat16 hidden states (B, 1, width)");
    for (const WhisperLayer& layer : layers_)
      TORCH_CHECK(layer.linears.size() == 6, "sparseft: a layer of the WhisperStack lacks its linears");
    const int64_t batch = hidden.size(0), width = heads_ * head_dim_;
    const auto linear = [&](const Linear& w, const at::Tensor& x) { return apply(w, x, isa, stub); };
    const auto norm = [&](const at::Tensor& x, const std::pair<at::Tensor, at::Tensor>& n) {
      return at::layer_norm(x, {width}, n.first, n.second, eps_);
    };
    const auto split = [&](const at::Tensor& x) { return x.view({batch, 1, heads_, head_dim_}).transpose(1, 2); };
    const auto merged = [&](const at::Tensor& a) { return a.reshape({batch, 1, width}); };
    at::Tensor h = hidden.contiguous().clone();
    for (size_t i = 0; i < n; ++i) {
      const WhisperLayer& layer = layers_[i];
      const std::vector<Linear>& w = layer.linears;
      const at::Tensor y = linear(w[0], norm(h, layer.norms[0]));
      const at::Tensor q = split(y.narrow(-1, 0, width) * scale_);
      const at::Tensor a = store_and_attend(q, split(y.narrow(-1, width, width)), split(y.narrow(-1, 2 * width, width)),
                                            keys[i], values[i], position, 0, 1.0, isa);
      add_into(h, linear(w[1], merged(a)));
      const at::Tensor cross_q = split(linear(w[2], norm(h, layer.norms[1])) * scale_);
      add_into(h, linear(w[3], merged(decode_attention(cross_q, cross_keys[i], cross_values[i], 1.0, isa))));
      add_into(h, linear(w[5], at::gelu(linear(w[4], norm(h, layer.norms[2])))));
    }
    return h;
  }

 private:
  int64_t heads_, head_dim_;
  double eps_, scale_;
  std::vector<WhisperLayer> layers_;
};

}  // namespace

void bind_layer_stack(pybind11::module_& m) {
  const auto free = pybind11::call_guard<pybind11::gil_scoped_release>();
  pybind11::class_<LayerStack>(m, "LayerStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &LayerStack::add_layer)
      .def("add_linear", &LayerStack::add_linear)
      .def("step", &LayerStack::step, free)
      .def("step_rows", &LayerStack::step_rows, free);
  pybind11::class_<WhisperStack>(m, "WhisperStack")
      .def(pybind11::init<int64_t, int64_t, double, double>())
      .def("add_layer", &WhisperStack::add_layer)
      .def("add_linear", &WhisperStack::add_linear)
      .def("step", &WhisperStack::step, free);
}

}  // namespace sparseft
