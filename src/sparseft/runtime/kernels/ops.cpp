// The torch side of the CPU kernels: checks shapes, prepares the activations (bf16 or per-token int8, padded),
// splits rows across torch's own thread pool (at::parallel_for, so no second OpenMP runtime competes with
// torch for the cores) and calls the kernel of the requested instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

#include "ops.h"
#include "sparse.h"

namespace sparseft {
namespace {

enum Isa : int64_t { kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512bf16") &&
      __builtin_cpu_supports("avx512vnni"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return kAvx2;
  return kScalar;
}

}  // namespace

bool intel_cpu() {
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
}

namespace {

// Whether the AMX kernels can run: they were compiled, the CPU has AMX (tiles, BF16, INT8) and Linux lets this
// process use the tile registers (asked for once, ARCH_REQ_XCOMP_PERM for XTILEDATA). amx_ready adds the
// SPARSEFT_AMX=0 switch.
bool amx_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return kAmxBuilt && best_isa() == kAvx512 && __builtin_cpu_supports("amx-tile") &&
           __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-int8") &&
           syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return supported;
}

bool amx_ready() {
  const char* env = std::getenv("SPARSEFT_AMX");
  return amx_supported() && !(env && std::strcmp(env, "0") == 0);
}

// The AMX kernels' batch range. Below it the expand kernels are as fast or faster. Since the AMX kernels expand a
// chunk ahead, write their sums sixteen tiles at a time and share a call's tiles between threads (2 threads, 70%,
// alternated with the expand kernels, which share theirs too): bf16 at batch 2 0.98-1.44x (medians 0.99-1.28x
// over 2048x2048, 4096x4096, 11008x4096, 4096x11008), batch 1 0.73-0.95x; int8, whose expand kernel does twice the
// work per instruction, 0.96-1.06x at 4, 1.05-1.23x at 5, 1.13-1.22x at 6. Larger batches go in pieces of at
// most kAmxBatch.
constexpr int64_t kAmxMinBatch = 2, kAmxMinBatchInt8 = 5;

// Scratch for the prepared activations, reused across calls of the same thread.
std::vector<uint8_t>& scratch() {
  thread_local std::vector<uint8_t> buffer;
  return buffer;
}
std::vector<float>& scratch_scales() {
  thread_local std::vector<float> buffer;
  return buffer;
}

float element(const at::Tensor& x, int64_t i) {
  return x.scalar_type() == at::kBFloat16 ? bf16_to_f32(reinterpret_cast<const uint16_t*>(x.data_ptr())[i])
                                          : x.data_ptr<float>()[i];
}

// bf16 activations, each row padded with zeros to stride elements.
Activations prepare_bf16(const at::Tensor& x, int64_t batch, int64_t cols, int64_t stride) {
  if (x.scalar_type() == at::kBFloat16 && cols == stride) return {x.data_ptr(), nullptr, batch, stride};
  auto& buf = scratch();
  buf.assign(static_cast<size_t>(batch * stride) * 2, 0);
  uint16_t* out = reinterpret_cast<uint16_t*>(buf.data());
  for (int64_t b = 0; b < batch; ++b) {
    if (x.scalar_type() == at::kBFloat16) {
      std::memcpy(out + b * stride, reinterpret_cast<const uint16_t*>(x.data_ptr()) + b * cols, cols * 2);
    } else {
      const float* src = x.data_ptr<float>() + b * cols;
      for (int64_t c = 0; c < cols; ++c) out[b * stride + c] = f32_to_bf16(src[c]);
    }
  }
  return {buf.data(), nullptr, batch, stride};
}

// Symmetric per-token int8: scale = max|x| / 127, q = round(x / scale) (ties to even, as torch.round).
// With offset, q + 128 is stored as uint8 for vpdpbusd; the padding is then 128, which meets zero weights.
// The AVX-512 kernels take them offset, the others (int4 everywhere) plain.
Activations prepare_int8(const at::Tensor& x, int64_t batch, int64_t cols, int64_t stride, int64_t isa,
                         bool offset) {
  auto& buf = scratch();
  auto& scales = scratch_scales();
  buf.assign(static_cast<size_t>(batch * stride), offset ? 128 : 0);
  scales.assign(static_cast<size_t>(batch), 0.0f);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const char* src = static_cast<const char*>(x.data_ptr());
  if (isa == kAvx512) {
    for (int64_t b = 0; b < batch; ++b)
      quantize_avx512(src + b * cols * x.element_size(), bf16, cols, buf.data() + b * stride, &scales[b], offset);
    return {buf.data(), scales.data(), batch, stride};
  }
  if (isa == kAvx2 && !offset) {
    for (int64_t b = 0; b < batch; ++b)
      quantize_avx2(src + b * cols * x.element_size(), bf16, cols,
                    reinterpret_cast<int8_t*>(buf.data() + b * stride), &scales[b]);
    return {buf.data(), scales.data(), batch, stride};
  }
  for (int64_t b = 0; b < batch; ++b) {
    float absmax = 0.0f;
    bool finite = true;
    for (int64_t c = 0; c < cols; ++c) {
      const float v = element(x, b * cols + c);
      finite = finite && std::isfinite(v);
      absmax = std::max(absmax, std::fabs(v));
    }
    const float scale = finite ? absmax / 127.0f : std::numeric_limits<float>::quiet_NaN();  // NaN in, NaN out
    scales[b] = scale;
    if (!(scale > 0.0f)) continue;
    for (int64_t c = 0; c < cols; ++c) {
      const int v = quantized(element(x, b * cols + c), scale, 127.0f);
      buf[b * stride + c] = static_cast<uint8_t>(offset ? v + 128 : v);
    }
  }
  return {buf.data(), scales.data(), batch, stride};
}

// Symmetric per-token 16-bit (int8_wide_amx): each row's high bytes, then (at batch * stride) its low bytes.
Activations prepare_int16(const at::Tensor& x, int64_t batch, int64_t cols, int64_t stride) {
  auto& buf = scratch();
  auto& scales = scratch_scales();
  buf.assign(static_cast<size_t>(2 * batch * stride), 0);
  scales.assign(static_cast<size_t>(batch), 0.0f);
  const char* src = static_cast<const char*>(x.data_ptr());
  for (int64_t b = 0; b < batch; ++b)
    quantize16_avx512(src + b * cols * x.element_size(), x.scalar_type() == at::kBFloat16, cols,
                      buf.data() + b * stride, buf.data() + (batch + b) * stride, &scales[b]);
  return {buf.data(), scales.data(), batch, stride};
}

// Row boundaries that give each part about the same number of bytes to read (mask words + values), so
// threads finish together even when some rows are much denser than others.
std::vector<int64_t> split_rows(const SparseMatrix& w, int64_t value_bits, int64_t parts) {
  const auto bytes_before = [&](int64_t r) {
    return (w.mask ? w.row_start[r] * value_bits / 8 + r * w.words * 8 : r * w.cols * value_bits / 8);
  };
  const int64_t total = bytes_before(w.rows);
  std::vector<int64_t> bounds(parts + 1, w.rows);
  bounds[0] = 0;
  for (int64_t t = 1; t < parts; ++t) {
    // The first row at or past the target, by bisection rather than a walk over thousands of rows each call.
    const int64_t target = total / parts * t;
    int64_t lo = bounds[t - 1], hi = w.rows;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (bytes_before(mid) < target)
        lo = mid + 1;
      else
        hi = mid;
    }
    bounds[t] = lo;
  }
  return bounds;
}

void run_parallel(const SparseMatrix& w, int64_t value_bits, int64_t batch,
                  const std::function<void(int64_t, int64_t, const Shared*)>& body) {
  // Below ~64 KiB of weights the cost of waking threads exceeds the work.
  const int64_t bytes =
      w.mask ? w.row_start[w.rows] * value_bits / 8 + w.rows * w.words * 8 : w.rows * w.cols * 2;
  const int64_t parts = bytes * batch < (int64_t{1} << 16) ? 1 : std::min<int64_t>(at::get_num_threads(), w.rows);
  if (parts <= 1) {
    body(0, w.rows, nullptr);
    return;
  }
  const std::vector<int64_t> bounds = split_rows(w, value_bits, parts);
  std::vector<StepCounter> counters(static_cast<size_t>(parts));
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Shared shared{counters.data(), bounds.data(), parts, t};
      body(bounds[t], bounds[t + 1], &shared);
    }
  });
}

// The kernels read raw pointers: every tensor must be one contiguous block in CPU memory.
void check_array(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "sparseft: ", what, " must be a contiguous CPU tensor");
}

// Widest int8 row: the kernels sum up to 255 * 127 per column in 32-bit integers (packing.INT8_MAX_COLUMNS).
constexpr int64_t kInt8MaxColumns = 65536;

// The kind of values follows their dtype: bfloat16, int8 (char) or int4 (uint8, two to a byte; `group_size`
// then gives the columns per scale).
SparseMatrix matrix(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& row_start,
                    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& rowsum, int64_t cols,
                    int64_t group_size = 0) {
  check_array(mask, "mask");
  check_array(values, "values");
  check_array(row_start, "row_start");
  TORCH_CHECK(cols > 0, "sparseft: a weight needs input columns");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kLong, "sparseft: bad mask");
  const bool int8 = values.scalar_type() == at::kChar, int4 = values.scalar_type() == at::kByte;
  TORCH_CHECK(row_start.scalar_type() == at::kLong && row_start.numel() == mask.size(0) + 1 &&
                  row_start.data_ptr<int64_t>()[0] >= 0 && row_start.data_ptr<int64_t>()[0] <= (int4 ? 1 : 0),
              "sparseft: bad row_start");
  TORCH_CHECK(mask.size(1) == (cols + 63) / 64, "sparseft: mask has ", mask.size(1), " words per row for ", cols,
              " columns");
  TORCH_CHECK(int8 || int4 || values.scalar_type() == at::kBFloat16,
              "sparseft: values must be bfloat16, int8 or uint8 (int4)");
  TORCH_CHECK(!(int8 || int4) || cols <= kInt8MaxColumns, "sparseft: int8 and int4 values take at most ",
              kInt8MaxColumns, " columns");
  const int64_t end = row_start.data_ptr<int64_t>()[mask.size(0)];
  const int64_t value_bytes = int4 ? (end + 1) / 2 : end * values.element_size();
  TORCH_CHECK(end >= row_start.data_ptr<int64_t>()[0] && values.numel() * values.element_size() >= value_bytes + 64,
              "sparseft: values must be padded by 64 bytes");
  SparseMatrix w{reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>()),
                 values.data_ptr(),
                 row_start.data_ptr<int64_t>(),
                 mask.size(0),
                 cols,
                 mask.size(1),
                 nullptr,
                 nullptr};
  if (int8) {
    TORCH_CHECK(scale && rowsum, "sparseft: int8 values need scale and rowsum");
    check_array(*scale, "scale");
    check_array(*rowsum, "rowsum");
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->numel() == w.rows, "sparseft: bad scale");
    TORCH_CHECK(rowsum->scalar_type() == at::kInt && rowsum->numel() == w.rows, "sparseft: bad rowsum");
    w.scale = scale->data_ptr<float>();
    w.rowsum = rowsum->data_ptr<int32_t>();
  }
  if (int4) {
    TORCH_CHECK(group_size > 0 && group_size % 32 == 0, "sparseft: int4 group size must be a multiple of 32, got ",
                group_size);
    TORCH_CHECK(scale, "sparseft: int4 values need group scales");
    check_array(*scale, "scale");
    w.group_size = group_size;
    w.groups = (cols + group_size - 1) / group_size;
    TORCH_CHECK((scale->scalar_type() == at::kFloat || scale->scalar_type() == at::kBFloat16) &&
                    scale->numel() == w.rows * w.groups,
                "sparseft: int4 scale must be fp32 or bf16 (rows, ", w.groups, ")");
    w.group_scale = scale->data_ptr();
    w.group_scale_bf16 = scale->scalar_type() == at::kBFloat16;
  }
  return w;
}

at::Tensor output_for(const at::Tensor& x, int64_t rows) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = rows;
  return at::empty(sizes, x.options());
}

const float* bias_ptr(const std::optional<at::Tensor>& bias, int64_t rows) {
  if (!bias) return nullptr;
  check_array(*bias, "bias");
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == rows, "sparseft: bias must be fp32 of size ", rows);
  return bias->data_ptr<float>();
}

void check_input(const at::Tensor& x, int64_t cols) {
  TORCH_CHECK(x.device().is_cpu(), "sparseft: input must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "sparseft: input must be float32 or bfloat16");
  TORCH_CHECK(x.is_contiguous() && x.dim() >= 1 && x.size(-1) == cols, "sparseft: input must be contiguous with ",
              cols, " features");
}

// Through the AMX kernels, batch rows at most kAmxBatch (kAmxWideBatch for 16-bit activations) at a time.
void amx_mm(const SparseMatrix& w, const Activations& a, const Output& o, bool int8, bool wide) {
  thread_local std::vector<uint32_t> pairs, low_pairs;
  const int64_t element = int8 ? 1 : 2, row_words = a.stride * element / 4;
  TORCH_INTERNAL_ASSERT(row_words % 16 == 0, "sparseft: AMX activations must be whole 64-byte chunks");
  const int64_t most = wide ? kAmxWideBatch : kAmxBatch;
  for (int64_t b0 = 0; b0 < a.batch; b0 += most) {
    const int64_t nb = std::min(most, a.batch - b0);
    const char* x = static_cast<const char*>(a.data) + b0 * a.stride * element;
    pairs.resize(static_cast<size_t>(interleaved_words(nb, row_words)));
    // the 8-bit kernels' activations are stored offset by 128; the high bytes of 16-bit ones are plain int8
    interleave(x, nb, row_words, int8 && !wide, pairs.data());
    Activations part{x, a.scale ? a.scale + b0 : nullptr, nb, a.stride, pairs.data()};
    if (wide) {
      low_pairs.resize(pairs.size());
      interleave(x + a.batch * a.stride, nb, row_words, false, low_pairs.data());
      part.low_pairs = low_pairs.data();
    }
    const Output out{static_cast<char*>(o.data) + b0 * o.stride * (o.bf16 ? 2 : 4), o.bf16, o.stride, o.bias};
    // a last piece below the AMX range goes to the expand kernel: the choice depends on the batch only
    Kernel kernel = wide   ? int8_wide_amx
                    : int8 ? (nb >= kAmxMinBatchInt8 ? int8_amx : int8_avx512)
                           : (nb >= kAmxMinBatch ? bf16_amx : bf16_avx512);
    run_parallel(w, element * 8, nb, [&](int64_t r0, int64_t r1, const Shared* s) { kernel(w, part, out, r0, r1, s); });
  }
}

}  // namespace

at::Tensor sparse_mm(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                     const at::Tensor& row_start, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& rowsum, const std::optional<at::Tensor>& bias, int64_t cols,
                     int64_t isa, bool wide, int64_t group_size) {
  check_isa(isa);
  check_input(x, cols);
  const SparseMatrix w = matrix(mask, values, row_start, scale, rowsum, cols, group_size);
  const bool int8 = w.scale != nullptr, int4 = is_int4(w);
  TORCH_CHECK(!wide || (int8 && isa == kAvx512 && amx_ready()),
              "sparseft: 16-bit activations need int8 values and the AMX kernels");
  const int64_t batch = cols ? x.numel() / cols : 0;
  at::Tensor y = output_for(x, w.rows);
  if (batch == 0 || w.rows == 0) return y;
  const Output o{y.data_ptr(), y.scalar_type() == at::kBFloat16, w.rows, bias_ptr(bias, w.rows)};
  const int64_t stride = w.words * 64;
  if (wide) {
    amx_mm(w, prepare_int16(x, batch, cols, stride), o, true, true);
    return y;
  }
  if (int4) {
    const Activations a = prepare_int8(x, batch, cols, stride, isa, false);
    const Kernel kernel = isa == kScalar ? int4_scalar : int4_avx2;
    run_parallel(w, 4, batch, [&](int64_t r0, int64_t r1, const Shared* s) { kernel(w, a, o, r0, r1, s); });
    return y;
  }
  const Activations a = int8 ? prepare_int8(x, batch, cols, stride, isa, isa == kAvx512)
                             : prepare_bf16(x, batch, cols, stride);
  Kernel kernel = nullptr;
  if (isa == kAvx512) kernel = int8 ? int8_avx512 : bf16_avx512;
  if (isa == kAvx2) kernel = int8 ? int8_avx2 : bf16_avx2;
  if (isa == kScalar) kernel = int8 ? int8_scalar : bf16_scalar;
  if (isa == kAvx512 && batch >= (int8 ? kAmxMinBatchInt8 : kAmxMinBatch) && amx_ready()) {
    amx_mm(w, a, o, int8, false);
    return y;
  }
  run_parallel(w, int8 ? 8 : 16, batch, [&](int64_t r0, int64_t r1, const Shared* s) { kernel(w, a, o, r0, r1, s); });
  return y;
}

namespace {

// The dense bf16 matrix of a compressed weight (int8 and int4 values are dequantized), for the large-batch path.
at::Tensor decompress(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& row_start,
                      const std::optional<at::Tensor>& scale, int64_t cols, int64_t isa, int64_t group_size) {
  check_isa(isa);
  const bool int8 = values.scalar_type() == at::kChar;
  std::optional<at::Tensor> rowsum;
  if (int8) rowsum = at::zeros({mask.size(0)}, at::kInt);
  const SparseMatrix w = matrix(mask, values, row_start, scale, rowsum, cols, group_size);
  at::Tensor out = at::empty({w.rows, cols}, at::kBFloat16);
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  run_parallel(w, is_int4(w) ? 4 : int8 ? 8 : 16, 1, [&](int64_t r0, int64_t r1, const Shared*) {
    if (isa == kAvx512 && !is_int4(w))
      decompress_avx512(w, int8, dst, r0, r1);
    else
      decompress_scalar(w, int8, dst, r0, r1);
  });
  return out;
}

// Each row's offsets agree with the popcount of its mask words, so that no kernel reads past the values: checked
// once when a layer is built (per call it would cost more than small layers take), not by the kernels.
void check_packed(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& row_start, int64_t cols,
                  int64_t group_size) {
  const bool int8 = values.scalar_type() == at::kChar;
  std::optional<at::Tensor> scale, rowsum;
  if (int8) scale = at::zeros({mask.size(0)}, at::kFloat), rowsum = at::zeros({mask.size(0)}, at::kInt);
  if (values.scalar_type() == at::kByte && group_size > 0)
    scale = at::zeros({mask.size(0) * ((cols + group_size - 1) / group_size)}, at::kFloat);
  const SparseMatrix w = matrix(mask, values, row_start, scale, rowsum, cols, group_size);
  const uint64_t tail = cols % 64 ? ~((uint64_t{1} << (cols % 64)) - 1) : 0;
  for (int64_t r = 0; r < w.rows; ++r) {
    int64_t count = 0;
    for (int64_t k = 0; k < w.words; ++k) count += __builtin_popcountll(w.mask[r * w.words + k]);
    TORCH_CHECK(count == w.row_start[r + 1] - w.row_start[r], "sparseft: row ", r, " has ", count,
                " mask bits but ", w.row_start[r + 1] - w.row_start[r], " values");
    TORCH_CHECK(!(w.mask[r * w.words + w.words - 1] & tail), "sparseft: row ", r, " sets mask bits past column ",
                cols);
  }
}

// Dense bf16 y = W x with our own AVX-512 kernel (torch's CPU GEMV leaves bandwidth unused at small batch).
at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_isa(kAvx512);
  check_array(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "sparseft: weight must be contiguous bfloat16 (rows, cols)");
  const int64_t cols = weight.size(1);
  check_input(x, cols);
  SparseMatrix w{nullptr, weight.data_ptr(), nullptr, weight.size(0), cols, (cols + 63) / 64, nullptr, nullptr};
  const int64_t batch = cols ? x.numel() / cols : 0;
  at::Tensor y = output_for(x, w.rows);
  if (batch == 0 || w.rows == 0) return y;
  const Output o{y.data_ptr(), y.scalar_type() == at::kBFloat16, w.rows, bias_ptr(bias, w.rows)};
  const Activations a = prepare_bf16(x, batch, cols, w.words * 64);
  run_parallel(w, 2, batch, [&](int64_t r0, int64_t r1, const Shared* s) { dense_bf16_avx512(w, a, o, r0, r1, s); });
  return y;
}

// How many threads run_parallel's at::parallel_for really uses: 1 when the library was built without OpenMP
// (torch's header-only parallel_for then compiles to a serial loop), so the build can be checked.
int64_t parallel_threads() {
  const int64_t n = at::get_num_threads();
  std::vector<int64_t> seen(n, 0);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) seen[i] = at::get_thread_num();
  });
  std::sort(seen.begin(), seen.end());
  return std::unique(seen.begin(), seen.end()) - seen.begin();
}

// The core's clock in GHz, from a chain of dependent 64-bit multiplies (3 cycles each on x86-64 cores from Intel
// since Nehalem and from AMD since Zen). This machine's clock moves between runs, and with it every figure bound by
// computation rather than memory (the bf16 expand kernel's among them), so benchmarks print it beside the copy
// probe. 0 where it cannot be read this way.
double clock_ghz() {
#if defined(__x86_64__)
  constexpr int64_t kSteps = 20000000;
  uint64_t x = 3;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < kSteps; ++i) asm volatile("imul %0, %0" : "+r"(x));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return 3.0 * kSteps / seconds / 1e9;
#else
  return 0.0;
#endif
}

}  // namespace

void check_isa(int64_t isa) {
  TORCH_CHECK(isa >= kScalar && isa <= best_isa(), "sparseft: instruction set level ", isa,
              " is not available on this CPU (best: ", best_isa(), ")");
}

}  // namespace sparseft

// Bound with pybind11 rather than registered as torch.ops: a call through torch's dispatcher costs about 4 µs
// more, and a decoded token makes some 180 calls here (measured 6.1 against 2.1 µs for an op with nine
// arguments). A failed TORCH_CHECK reaches Python as a RuntimeError either way. The ops let go of the GIL while
// they run, as torch's own ops do, so other Python threads (a token streamer, a server) are not held up.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto free = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("best_isa", &sparseft::best_isa);
  m.def("amx_supported", &sparseft::amx_supported);
  m.def("bf16_fma_tiles", &sparseft::bf16_fma_tiles);
  m.def("intel_cpu", &sparseft::intel_cpu);
  m.def("clock_ghz", &sparseft::clock_ghz, free);
  m.def("parallel_threads", &sparseft::parallel_threads, free);
  m.def("sparse_mm", &sparseft::sparse_mm, free);
  m.def("decompress", &sparseft::decompress, free);
  m.def("check_packed", &sparseft::check_packed, free);
  m.def("dense_mm", &sparseft::dense_mm, free);
  m.def("rms_norm", &sparseft::rms_norm, free);
  m.def("rotary", &sparseft::rotary, free);
  m.def("decode_attention", &sparseft::decode_attention, free);
  m.def("store_and_attend", &sparseft::store_and_attend, free);
  m.def("silu_mul", &sparseft::silu_mul, free);
  sparseft::bind_layer_stack(m);
}
