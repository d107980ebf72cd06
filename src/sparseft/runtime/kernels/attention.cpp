// Attention of one new token over all cached keys and values (decoding without a mask), bf16, in one op.
// torch's scaled_dot_product_attention costs 55-100 us a call here for 16-144 cached tokens, mostly fixed
// overhead. Arithmetic in fp32, the output rounded once to bf16, as torch's CPU flash attention does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "bf16_bits.h"
#include "ops.h"
#include "vec_avx2.h"

namespace sparseft {
namespace {

struct Group {
  const uint16_t* q;  // heads x D, rows `q_stride` apart
  const uint16_t* k;  // L x D, rows `k_stride` apart
  const uint16_t* v;  // L x D, rows `v_stride` apart
  uint16_t* out;      // heads x D, contiguous
  int64_t heads, keys, dim, q_stride, k_stride, v_stride;
  float scale;
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")

// 16 vectors in, one out: lane 4t + u holds the sum of the lanes of v[t + 4u].
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: v[2i], 8-15: v[2i + 1]
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lane t: v[4i + t]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // lane t: v[8i + t] twice, v[8i + 4 + t] twice, interleaved
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]));
  return _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
}

// e^x for x <= 0 (scores minus their maximum): 2^n * e^r with |r| <= ln2 / 2, e^r by its Taylor series to r^7
// (relative error below 2e-7).
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // in this order a NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// One key/value group: `heads` query heads over the same `keys` cached rows (head size a multiple of 32, at most
// 256). Scores: query and key multiplied in bf16 as they come by vdpbf16ps (products of two bf16 values are exact
// in fp32), 16 keys at a time, summed across lanes together. Then exp and sum in fp32 vectors, and p * v with the
// value rows split into their even and odd columns (as fp32), four heads at a time so that the accumulators stay
// in registers.
void attend_avx512(const Group& g, std::vector<float>& work) {
  const int64_t H = g.heads, L = g.keys, D = g.dim, C = D / 32;
  const int64_t Lp = (L + 15) / 16 * 16;
  work.resize(static_cast<size_t>(H * Lp + H));
  float* s = work.data();  // H x Lp: scores, then exp(score - max)
  float* total = s + H * Lp;
  const uint16_t *qp = g.q, *kp = g.k, *vp = g.v;
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512 scale = _mm512_set1_ps(g.scale);
  for (int64_t h = 0; h < H; ++h) {
    __m512bh q[8];
    for (int64_t c = 0; c < C; ++c) q[c] = (__m512bh)_mm512_loadu_si512(qp + h * g.q_stride + c * 32);
    for (int64_t j0 = 0; j0 < L; j0 += 16) {
      __m512 acc[16];
      for (int jj = 0; jj < 16; ++jj) {
        acc[jj] = _mm512_setzero_ps();
        if (j0 + jj >= L) continue;
        const uint16_t* k = kp + (j0 + jj) * g.k_stride;
        for (int64_t c = 0; c < C; ++c)
          acc[jj] = _mm512_dpbf16_ps(acc[jj], q[c], (__m512bh)_mm512_loadu_si512(k + c * 32));
      }
      _mm512_storeu_ps(s + h * Lp + j0, _mm512_mul_ps(_mm512_permutexvar_ps(order, sum16(acc)), scale));
    }
    float* sh = s + h * Lp;
    const __mmask16 tail = static_cast<__mmask16>((1u << (L - (Lp - 16))) - 1u);
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < Lp; j += 16)
      top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), j + 16 > L ? tail : 0xffff, sh + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < Lp; j += 16) {
      const __m512 e = _mm512_maskz_mov_ps(j + 16 > L ? tail : 0xffff,
                                           exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(sh + j), m)));
      _mm512_storeu_ps(sh + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    total[h] = _mm512_reduce_add_ps(sum);
  }
  const __m512i odd_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  uint16_t* out = g.out;
  for (int64_t h0 = 0; h0 < H; h0 += 4) {
    const int64_t nh = H - h0 < 4 ? H - h0 : 4;
    for (int64_t c = 0; c < C; ++c) {
      __m512 even[4], odd[4];
      for (int i = 0; i < 4; ++i) even[i] = odd[i] = _mm512_setzero_ps();
      for (int64_t j = 0; j < L; ++j) {
        const __m512i v = _mm512_loadu_si512(vp + j * g.v_stride + c * 32);
        const __m512 ve = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        const __m512 vo = _mm512_castsi512_ps(_mm512_and_si512(v, odd_half));
        for (int i = 0; i < 4; ++i) {
          if (i >= nh) break;
          const __m512 p = _mm512_set1_ps(s[(h0 + i) * Lp + j]);
          even[i] = _mm512_fmadd_ps(p, ve, even[i]);
          odd[i] = _mm512_fmadd_ps(p, vo, odd[i]);
        }
      }
      for (int i = 0; i < nh; ++i) {
        const __m512 inv = _mm512_set1_ps(1.0f / total[h0 + i]);
        const __m512i even_bits = bf16_bits(_mm512_mul_ps(even[i], inv));
        const __m512i odd_bits = bf16_bits(_mm512_mul_ps(odd[i], inv));
        _mm512_storeu_si512(out + (h0 + i) * D + c * 32, _mm512_or_si512(even_bits, _mm512_slli_epi32(odd_bits, 16)));
      }
    }
  }
}

#pragma GCC pop_options


// 8 vectors in, one out: lane i holds the sum of the lanes of v[i].
SPARSEFT_AVX2 inline __m256 sum8(const __m256* v) {
  __m256 a[4];
  for (int i = 0; i < 4; ++i) a[i] = _mm256_hadd_ps(v[2 * i], v[2 * i + 1]);
  // 128-bit half h of b[i]: the sums of the four lanes in half h of v[4i], ..., v[4i + 3]
  const __m256 b0 = _mm256_hadd_ps(a[0], a[1]), b1 = _mm256_hadd_ps(a[2], a[3]);
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// Lanes of a block of 8 keys from j0 on that hold one of the L keys (all ones), the others zero.
SPARSEFT_AVX2 inline __m256 lanes_below(int64_t L, int64_t j0) {
  const __m256i n = _mm256_set1_epi32(static_cast<int>(std::min<int64_t>(L - j0, 8)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// attend_avx512's work with AVX2 and FMA, in fp32 throughout: bf16 values widen by a shift (split_bf16), so each
// 16 columns of q, a key or a value row are an even and an odd fp32 vector, and products pair them alike. Scores 8
// keys at a time, each key's 16 columns in one register pair across the group's heads; a block's last keys past L
// read the last key again (their lanes are masked after), so no row past the cache's end is read. p * v four heads
// at a time (the group's heads padded to a multiple of 4 with zero rows), 16 columns a pass.
SPARSEFT_AVX2 void attend_avx2(const Group& g, std::vector<float>& work) {
  const int64_t H = g.heads, L = g.keys, D = g.dim, C = D / 16;
  const int64_t Lp = (L + 7) / 8 * 8, Hp = (H + 3) / 4 * 4;
  work.assign(static_cast<size_t>(Hp * Lp + Hp), 0.0f);
  float* s = work.data();  // Hp x Lp: scores, then exp(score - max); rows past H stay zero
  float* total = s + Hp * Lp;
  const __m256 scale = _mm256_set1_ps(g.scale);
  for (int64_t h = 0; h < H; ++h) {
    const uint16_t* q = g.q + h * g.q_stride;
    float* sh = s + h * Lp;
    for (int64_t j0 = 0; j0 < L; j0 += 8) {
      const uint16_t* key[8];
      for (int jj = 0; jj < 8; ++jj) key[jj] = g.k + std::min(j0 + jj, L - 1) * g.k_stride;
      __m256 acc[8];
      for (int jj = 0; jj < 8; ++jj) acc[jj] = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        __m256 qe, qo;
        split_bf16(q + c * 16, &qe, &qo);
        for (int jj = 0; jj < 8; ++jj) {
          __m256 ke, ko;
          split_bf16(key[jj] + c * 16, &ke, &ko);
          acc[jj] = _mm256_fmadd_ps(qo, ko, _mm256_fmadd_ps(qe, ke, acc[jj]));
        }
      }
      _mm256_storeu_ps(sh + j0, _mm256_mul_ps(sum8(acc), scale));
    }
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < Lp; j += 8)
      top = _mm256_max_ps(top, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(sh + j), lanes_below(L, j)));
    alignas(32) float tops[8];
    _mm256_store_ps(tops, top);
    float m = tops[0];
    for (int i = 1; i < 8; ++i) m = std::max(m, tops[i]);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < Lp; j += 8) {
      const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(sh + j), _mm256_set1_ps(m));
      const __m256 e = _mm256_and_ps(exp8(x), lanes_below(L, j));
      _mm256_storeu_ps(sh + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, sum);
    total[h] = ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
  }
  for (int64_t h0 = 0; h0 < H; h0 += 4) {
    const int64_t nh = std::min<int64_t>(H - h0, 4);
    const float* p = s + h0 * Lp;
    for (int64_t c = 0; c < C; ++c) {
      __m256 even[4], odd[4];
      for (int i = 0; i < 4; ++i) even[i] = odd[i] = _mm256_setzero_ps();
      for (int64_t j = 0; j < L; ++j) {
        __m256 ve, vo;
        split_bf16(g.v + j * g.v_stride + c * 16, &ve, &vo);
        for (int i = 0; i < 4; ++i) {
          const __m256 pj = _mm256_broadcast_ss(p + i * Lp + j);
          even[i] = _mm256_fmadd_ps(pj, ve, even[i]);
          odd[i] = _mm256_fmadd_ps(pj, vo, odd[i]);
        }
      }
      for (int i = 0; i < nh; ++i) {
        const __m256 inv = _mm256_set1_ps(1.0f / total[h0 + i]);
        store_bf16(g.out + (h0 + i) * D + c * 16, _mm256_mul_ps(even[i], inv), _mm256_mul_ps(odd[i], inv));
      }
    }
  }
}

}  // namespace

// q (B, H, 1, D); k, v (B, Hkv, L, D), bf16, H a multiple of Hkv, unit last strides. Returns (B, 1, H, D)
// contiguous, the layout transformers' attention functions return. `isa` is the sparse kernels' level: 3 runs the
// AVX-512 (BF16) code, 2 the AVX2 code; a lower level is refused with an error, and the caller then uses torch's
// SDPA.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            int64_t isa) {
  TORCH_CHECK(isa >= 2, "sparseft: decode_attention needs the AVX2 or AVX-512 kernels");
  check_isa(isa);
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "sparseft: decode_attention runs on the CPU");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "sparseft: decode_attention takes bfloat16 q, k and v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(2) == 1,
              "sparseft: decode_attention takes q (B, H, 1, D) and k, v (B, Hkv, L, D)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0 && L > 0,
              "sparseft: decode_attention shapes do not match");
  TORCH_CHECK(D % 32 == 0 && D <= 256, "sparseft: decode_attention takes head sizes 32, 64, ..., 256");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "sparseft: decode_attention needs a unit stride along the head dimension");
  at::Tensor out = at::empty({B, 1, H, D}, q.options());
  const int64_t per_group = H / Hkv;
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const auto run = [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> work;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, kv = i % Hkv;
      const Group g{qp + b * q.stride(0) + kv * per_group * q.stride(1),
                    kp + b * k.stride(0) + kv * k.stride(1),
                    vp + b * v.stride(0) + kv * v.stride(1),
                    op + (b * H + kv * per_group) * D,
                    per_group,
                    L,
                    D,
                    q.stride(1),
                    k.stride(2),
                    v.stride(2),
                    static_cast<float>(scale)};
      if (isa >= 3)
        attend_avx512(g, work);
      else
        attend_avx2(g, work);
    }
  };
  // Below about 64k multiply-adds a second thread costs more to wake than it saves.
  if (B * H * L * D < (int64_t{1} << 16))
    run(0, B * Hkv);
  else
    at::parallel_for(0, B * Hkv, 1, run);
  return out;
}

// A decoding step over a static cache in one call: the step's keys and values k, v (B, Hkv, 1, D) written to row
// `position` of key_cache, value_cache (B, Hkv, capacity, D), then decode_attention of q over the rows [first,
// position]. In Python the two writes and four slices around decode_attention cost more than the attention.
// Everything is checked before anything is written.
at::Tensor store_and_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, int64_t position, int64_t first, double scale,
                            int64_t isa) {
  TORCH_CHECK(isa >= 2, "sparseft: store_and_attend needs the AVX2 or AVX-512 kernels");
  check_isa(isa);
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && key_cache.device().is_cpu() &&
                  value_cache.device().is_cpu(),
              "sparseft: store_and_attend runs on the CPU");
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 &&
                  key_cache.scalar_type() == at::kBFloat16 && value_cache.scalar_type() == at::kBFloat16,
              "sparseft: store_and_attend takes bfloat16 keys, values and caches");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes() && k.dim() == 4 &&
                  v.sizes() == k.sizes() && k.size(2) == 1 && k.size(0) == key_cache.size(0) &&
                  k.size(1) == key_cache.size(1) && k.size(3) == key_cache.size(3),
              "sparseft: store_and_attend takes k, v (B, Hkv, 1, D) and caches (B, Hkv, capacity, D)");
  TORCH_CHECK(0 <= first && first <= position && position < key_cache.size(2),
              "sparseft: store_and_attend's rows [", first, ", ", position, "] are not in a cache of ",
              key_cache.size(2));
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
              "sparseft: store_and_attend needs a unit stride along the head dimension");
  const int64_t n = position + 1 - first;
  const at::Tensor keys = key_cache.narrow(2, first, n), values = value_cache.narrow(2, first, n);
  // decode_attention's own checks of q against the caches, before the writes below
  TORCH_CHECK(q.dim() == 4 && q.size(0) == k.size(0) && q.size(2) == 1 && q.size(3) == k.size(3) &&
                  q.size(1) % k.size(1) == 0 && q.scalar_type() == at::kBFloat16 && q.stride(3) == 1 &&
                  q.device().is_cpu() && q.size(3) % 32 == 0 && q.size(3) <= 256,
              "sparseft: store_and_attend takes q (B, H, 1, D) with H a multiple of Hkv and D in 32, 64, ..., 256");
  const auto write = [&](const at::Tensor& row, const at::Tensor& cache) {
    const auto* src = reinterpret_cast<const uint16_t*>(row.data_ptr());
    auto* dst = reinterpret_cast<uint16_t*>(cache.data_ptr());
    for (int64_t b = 0; b < row.size(0); ++b)
      for (int64_t h = 0; h < row.size(1); ++h)
        std::copy_n(src + b * row.stride(0) + h * row.stride(1), row.size(3),
                    dst + b * cache.stride(0) + h * cache.stride(1) + position * cache.stride(2));
  };
  write(k, key_cache);
  write(v, value_cache);
  return decode_attention(q, keys, values, scale, isa);
}

}  // namespace sparseft
