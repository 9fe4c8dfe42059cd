// The CPU kernel of llmint8::cpu_decode_attention (cpu_linear.cpp registers the op): scaled dot-product attention of
// one query token per head against a key/value cache, in float32 arithmetic on the cache as it is stored (bf16, fp16
// or fp32), for x86-64 CPUs with AVX2 and F16C (what the library is built for).
//
// Why: at decode PyTorch's CPU attention on a bf16 cache is slow without AMX, and computing it in float32 costs a
// float32 copy of the whole cache per call. With grouped-query attention it also expands the key/value heads to the
// query heads first (repeat_interleave), so each cached key is read once per query head. Here each key and value row
// is read once per call and serves all the query heads of its group; a call is bound by reading the cache.
//
// One call, for each batch b and key/value head g (its query heads h = g * G ... g * G + G - 1):
//   s[h, j] = (q[h] . k[j]) * scale (+ mask[h, j] for a floating-point mask; -inf where a boolean one is false),
//   m[h] = max_j s[h, j], p[h, j] = exp(s[h, j] - m[h]),
//   out[h] = (sum_j p[h, j] v[j]) / (sum_j p[h, j]), rounded once to the output's dtype; 0 where every s[h, j] is
//   -inf (every key masked out), as PyTorch's attention gives.
// The keys are split into chunks (so that one key/value head keeps every thread busy); each chunk keeps its own
// m, sum and weighted sum, and the chunks are merged with the usual rescaling by exp(m_chunk - m). NaN and Inf in
// q, k or v propagate as they do in a float32 softmax: a NaN score, or an infinite maximum, makes its row NaN.
#pragma once

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_linear_kernels.h"

namespace int8pass::attention {

// Keys per chunk at least, so that a chunk's work outweighs handing it to a thread
constexpr int64_t MIN_CHUNK_KEYS = 128;

struct DecodeAttention {
  const void* q;  // [B, H, D] in `dtype`, strides in elements below (the query's length-1 dim dropped)
  int64_t q_stride_b, q_stride_h;
  const void* k;  // [B, KVH, S, D], last dim contiguous
  int64_t k_stride_b, k_stride_h, k_stride_s;
  const void* v;  // [B, KVH, S, Dv], last dim contiguous
  int64_t v_stride_b, v_stride_h, v_stride_s;
  int dtype;  // of q, k, v and the output
  const void* mask;  // nullptr, or [B, H, S] (broadcast dims with stride 0): bool, or in `dtype` and added
  bool mask_is_bool;
  int64_t mask_stride_b, mask_stride_h, mask_stride_s;
  int64_t B, H, KVH, S, D, Dv;
  float scale;
  void* out;  // [B, H, Dv], contiguous
};

// n values of type DTYPE at p (element offset `offset`) as float32 into dst; DTYPE a constant, so that the loads'
// dtype switch is resolved at compile time, not per 8 values (measured: 20-30% of a call at 1024 keys)
template <int DTYPE>
inline void to_float_from(const void* p, int64_t offset, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(p, offset + i, DTYPE));
  for (; i < n; ++i) dst[i] = load(p, offset + i, DTYPE);
}

inline void to_float(const void* p, int dtype, int64_t offset, int64_t n, float* dst) {
  switch (dtype) {
    case F32: return to_float_from<F32>(p, offset, n, dst);
    case BF16: return to_float_from<BF16>(p, offset, n, dst);
    default: return to_float_from<F16>(p, offset, n, dst);
  }
}

// exp of 8 floats for x <= 0 (a score minus its row's maximum) and NaN: 2^n * p(r) with n = round(x / ln 2) and
// r = x - n ln 2 (|r| <= ln 2 / 2, two-part ln 2), p the degree-6 Taylor polynomial (relative error ~1e-7, about an
// ulp); exactly 1 at 0, 0 below ln(FLT_MIN) (so at -inf), NaN for NaN
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.33654f);  // ln(FLT_MIN)
  const __m256 too_small = _mm256_cmp_ps(x, low, _CMP_LT_OQ), is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 xc = _mm256_max_ps(x, low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 poly = _mm256_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(poly, _mm256_castsi256_ps(bits));
  return _mm256_blendv_ps(_mm256_blendv_ps(result, _mm256_setzero_ps(), too_small), x, is_nan);
}

// the 8 sums of the lanes of a[0..7], in that order
inline __m256 sum_each(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

constexpr int64_t TILE = 8;  // keys converted to float32 together, then used by every head of the group

// One chunk [j0, j1) of the keys of (b, g), for its G query heads qf [G, D] (float32): per head its maximum score
// m[G], the sum of exp(s - m) l[G], and the weighted sum of the values acc[G, Dv]
inline void chunk(const DecodeAttention& a, int64_t b, int64_t g, int64_t j0, int64_t j1, const float* qf, float* m,
                  float* l, float* acc) {
  const int64_t G = a.H / a.KVH, n = j1 - j0, D = a.D, Dv = a.Dv, D8 = D - D % 8, Dv8 = Dv - Dv % 8;
  const int64_t padded = (n + TILE - 1) / TILE * TILE;
  std::vector<float> tile(TILE * std::max(D, Dv)), scores(G * padded);
  const int64_t k_base = b * a.k_stride_b + g * a.k_stride_h, v_base = b * a.v_stride_b + g * a.v_stride_h;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<__m256> maxima(G, _mm256_set1_ps(neg_inf)), nans(G, _mm256_setzero_ps());
  for (int64_t t = 0; t < n; t += TILE) {  // scores, 8 keys at a time
    const int64_t keys = std::min(TILE, n - t);
    for (int64_t jj = 0; jj < TILE; ++jj) {
      if (jj < keys) {
        to_float(a.k, a.dtype, k_base + (j0 + t + jj) * a.k_stride_s, D, tile.data() + jj * D);
      } else {
        std::fill(tile.data() + jj * D, tile.data() + (jj + 1) * D, 0.0f);
      }
    }
    for (int64_t h = 0; h < G; ++h) {
      const float* q = qf + h * D;
      __m256 sums[TILE];
      for (auto& sum : sums) sum = _mm256_setzero_ps();
      for (int64_t d = 0; d < D8; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int64_t jj = 0; jj < TILE; ++jj)
          sums[jj] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(tile.data() + jj * D + d), sums[jj]);
      }
      __m256 s = sum_each(sums);
      if (D8 < D) {  // the head dim's tail
        alignas(32) float tail[TILE] = {};
        for (int64_t jj = 0; jj < TILE; ++jj)
          for (int64_t d = D8; d < D; ++d) tail[jj] += q[d] * tile[jj * D + d];
        s = _mm256_add_ps(s, _mm256_load_ps(tail));
      }
      s = _mm256_mul_ps(s, _mm256_set1_ps(a.scale));
      if (a.mask) {
        const int64_t base = b * a.mask_stride_b + (g * G + h) * a.mask_stride_h + (j0 + t) * a.mask_stride_s;
        alignas(32) float add[TILE] = {};
        for (int64_t jj = 0; jj < keys; ++jj) {
          const int64_t at = base + jj * a.mask_stride_s;
          add[jj] = a.mask_is_bool ? (static_cast<const bool*>(a.mask)[at] ? 0.0f : neg_inf)
                                   : load(a.mask, at, a.dtype);
        }
        s = _mm256_add_ps(s, _mm256_load_ps(add));
      }
      const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(keys)),
                                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      s = _mm256_blendv_ps(_mm256_set1_ps(neg_inf), s, valid);  // keys past the chunk: no weight
      _mm256_storeu_ps(scores.data() + h * padded + t, s);
      maxima[h] = _mm256_max_ps(maxima[h], s);
      nans[h] = _mm256_or_ps(nans[h], _mm256_cmp_ps(s, s, _CMP_UNORD_Q));
    }
  }
  for (int64_t h = 0; h < G; ++h) {  // a NaN score makes its row NaN
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, maxima[h]);
    float mh = neg_inf;
    for (const float lane : lanes) mh = std::max(mh, lane);
    if (_mm256_movemask_ps(nans[h]) != 0) mh = std::numeric_limits<float>::quiet_NaN();
    m[h] = mh;
    __m256 total = _mm256_setzero_ps();
    float* row = scores.data() + h * padded;
    for (int64_t j = 0; j < padded; j += 8) {  // the padding's -inf gives exp 0 (or NaN if mh is NaN or -inf)
      const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), _mm256_set1_ps(mh)));
      _mm256_storeu_ps(row + j, p);
      total = _mm256_add_ps(total, p);
    }
    alignas(32) float parts[8];
    _mm256_store_ps(parts, total);
    // padding lanes add exp(-inf - mh): 0 for a finite mh, NaN otherwise, as the row's own entries are then
    float sum = 0.0f;
    for (float part : parts) sum += part;
    l[h] = sum;
  }
  std::fill(acc, acc + G * Dv, 0.0f);
  for (int64_t t = 0; t < n; t += TILE) {  // the weighted values, 8 keys at a time
    const int64_t keys = std::min(TILE, n - t);
    for (int64_t jj = 0; jj < keys; ++jj)
      to_float(a.v, a.dtype, v_base + (j0 + t + jj) * a.v_stride_s, Dv, tile.data() + jj * Dv);
    for (int64_t h = 0; h < G; ++h) {
      const float* p = scores.data() + h * padded + t;
      float* out = acc + h * Dv;
      for (int64_t d = 0; d < Dv8; d += 8) {
        __m256 sum = _mm256_loadu_ps(out + d);
        for (int64_t jj = 0; jj < keys; ++jj)
          sum = _mm256_fmadd_ps(_mm256_set1_ps(p[jj]), _mm256_loadu_ps(tile.data() + jj * Dv + d), sum);
        _mm256_storeu_ps(out + d, sum);
      }
      for (int64_t d = Dv8; d < Dv; ++d)
        for (int64_t jj = 0; jj < keys; ++jj) out[d] += p[jj] * tile[jj * Dv + d];
    }
  }
}

// acc[0:n] += w * x[0:n]
inline void axpy(float w, const float* x, float* acc, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(acc + i)));
  for (; i < n; ++i) acc[i] += w * x[i];
}

// S >= 1 (cpu_linear.cpp checks): every chunk holds at least MIN_CHUNK_KEYS keys, or all S
inline void decode_attention(const DecodeAttention& a) {
  const int64_t G = a.H / a.KVH, groups = a.B * a.KVH;
  // chunks per (b, g): enough for every thread when there are few heads, none shorter than MIN_CHUNK_KEYS
  const int64_t threads = omp_get_max_threads();
  const int64_t wanted = std::max<int64_t>(1, (threads + groups - 1) / groups);
  const int64_t chunks = std::max<int64_t>(1, std::min(wanted, a.S / MIN_CHUNK_KEYS));
  const int64_t chunk_keys = (a.S + chunks - 1) / chunks;
  // per (group, chunk): m [G], l [G], acc [G, Dv]
  const int64_t stride = G * (2 + a.Dv);
  std::vector<float> partial(groups * chunks * stride), qf(a.B * a.H * a.D);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.H; ++h)
      to_float(a.q, a.dtype, b * a.q_stride_b + h * a.q_stride_h, a.D, qf.data() + (b * a.H + h) * a.D);
#pragma omp parallel for schedule(static) if (groups * chunks > 1 && a.S * a.D * groups >= PARALLEL_MIN_ELEMENTS)
  for (int64_t task = 0; task < groups * chunks; ++task) {
    const int64_t group = task / chunks, c = task % chunks, b = group / a.KVH, g = group % a.KVH;
    const int64_t j0 = c * chunk_keys, j1 = std::min(a.S, j0 + chunk_keys);
    float* p = partial.data() + task * stride;
    chunk(a, b, g, j0, j1, qf.data() + (b * a.H + g * G) * a.D, p, p + G, p + 2 * G);
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> result(a.Dv);
  for (int64_t group = 0; group < groups; ++group) {
    const int64_t b = group / a.KVH, g = group % a.KVH;
    for (int64_t h = 0; h < G; ++h) {
      float m = neg_inf;
      for (int64_t c = 0; c < chunks; ++c) {
        const float mc = partial[(group * chunks + c) * stride + h];
        m = std::isnan(mc) || mc > m ? mc : m;  // once NaN, stays NaN
      }
      float l = 0.0f;
      std::fill(result.begin(), result.end(), 0.0f);
      for (int64_t c = 0; c < chunks && m != neg_inf; ++c) {  // m = -inf: every key masked out, the output is 0
        const float* p = partial.data() + (group * chunks + c) * stride;
        if (p[h] == neg_inf) continue;  // every score of this chunk -inf: no weight
        const float w = std::exp(p[h] - m);  // NaN when m is NaN or +inf: the row becomes NaN
        l += w * p[G + h];
        axpy(w, p + 2 * G + h * a.Dv, result.data(), a.Dv);
      }
      if (m != neg_inf)
        for (float& r : result) r /= l;
      const int64_t offset = (b * a.H + g * G + h) * a.Dv;
      for (int64_t i = 0; i < a.Dv; ++i) store(a.out, offset + i, result[i], a.dtype);
    }
  }
}

}  // namespace int8pass::attention
