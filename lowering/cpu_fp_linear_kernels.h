// The kernel of llmint8::cpu_fp_linear: y = x W^T + b for a bfloat16 or float16 x [M, K] and weight W [N, K]
// (row-major), products and sums in float32, rounded once to the dtype. It is the decode GEMV of the linears a
// compiled graph keeps in floating point (an output head, most often; int8pass/fx_pass.py writes it for up to
// MAX_ROWS rows): those read the whole weight for a row or two, so the weight's stream is all that counts. PyTorch's
// bf16 matmul reached 14 GB/s there on a 262144 x 640 head (2 threads, AMX Xeon whose memory reads 31 GB/s): it
// reorders the weight for oneDNN on every call.
//
// AVX2 + FMA + F16C, which the whole library is built for: the weight goes 8 values to a vector, widened to float32
// (bf16: a 16-bit shift; fp16: vcvtph2ps) and multiplied into float32 sums with vfmadd, a few instructions per 16
// bytes, far below what the memory can bring on any core. Each thread takes whole blocks of weight rows; a row is
// read once for all M (at most MAX_ROWS) activation rows, its stream fetched ahead into L2.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace int8pass {
namespace fp_linear {

constexpr int MAX_ROWS = 4;              // activation rows per pass over the weight
constexpr int64_t ROWS_PER_TASK = 64;    // weight rows a thread takes at a time
constexpr int64_t AHEAD_BYTES = 16384;   // how far ahead of the stream its lines are fetched into L2
constexpr int64_t PARALLEL_MIN_ELEMENTS = int64_t(1) << 16;

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// float -> bfloat16, round to nearest even; a NaN stays a (quiet) NaN
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float half_to_float(uint16_t v) { return _cvtsh_ss(v); }
inline uint16_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

// 8 values of the weight, widened to float32
template <bool BF16>
inline __m256 load8(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  return _mm256_cvtph_ps(v);
}

template <bool BF16>
inline float to_float(uint16_t v) {
  return BF16 ? bf16_to_float(v) : half_to_float(v);
}

inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

inline uint16_t round_to(bool bf16, float v) { return bf16 ? float_to_bf16(v) : float_to_half(v); }

// y[i * N + j] = x_f[i] . w[j] + bias[j] for MB activation rows (float32, K each) and weight rows [j0, j1): 4 sums
// along K per activation row for one row (to cover vfmadd's latency), 2 for more
template <bool BF16, int MB>
void rows_block(const float* x_f, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t N, int64_t K,
                int64_t j0, int64_t j1) {
  constexpr int U = MB == 1 ? 4 : 2;
  const int64_t ahead = std::max<int64_t>(AHEAD_BYTES / 2, K);
  for (int64_t j = j0; j < j1; ++j) {
    const uint16_t* row = w + j * K;
    __m256 acc[MB][U];
    for (int i = 0; i < MB; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
      if ((k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + ahead + k), _MM_HINT_T1);
      for (int u = 0; u < U; ++u) {
        const __m256 wv = load8<BF16>(row + k + 8 * u);
        for (int i = 0; i < MB; ++i)
          acc[i][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x_f + i * K + k + 8 * u), wv, acc[i][u]);
      }
    }
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = load8<BF16>(row + k);
      for (int i = 0; i < MB; ++i) acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x_f + i * K + k), wv, acc[i][0]);
    }
    for (int i = 0; i < MB; ++i) {
      __m256 total = acc[i][0];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[i][u]);
      float s = sum8(total);
      for (int64_t t = k; t < K; ++t) s += x_f[i * K + t] * to_float<BF16>(row[t]);
      y[i * N + j] = round_to(BF16, s + (bias ? to_float<BF16>(bias[j]) : 0.0f));
    }
  }
}

template <bool BF16>
void rows_block_for(int mb, const float* x_f, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t N,
                    int64_t K, int64_t j0, int64_t j1) {
  switch (mb) {
    case 1: return rows_block<BF16, 1>(x_f, w, bias, y, N, K, j0, j1);
    case 2: return rows_block<BF16, 2>(x_f, w, bias, y, N, K, j0, j1);
    case 3: return rows_block<BF16, 3>(x_f, w, bias, y, N, K, j0, j1);
    default: return rows_block<BF16, 4>(x_f, w, bias, y, N, K, j0, j1);
  }
}

// y [M, N] (the dtype of x and w) = x [M, K] . w [N, K]^T + bias [N] (the same dtype, or null)
template <bool BF16>
void linear(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t M, int64_t N, int64_t K) {
  std::vector<float> x_f(size_t(std::min<int64_t>(M, MAX_ROWS) * K));
  for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
    const int mb = int(std::min<int64_t>(MAX_ROWS, M - m0));
    for (int64_t t = 0; t < mb * K; ++t) x_f[t] = to_float<BF16>(x[m0 * K + t]);
    const int64_t tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_ELEMENTS)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t j0 = task * ROWS_PER_TASK, j1 = std::min(N, j0 + ROWS_PER_TASK);
      rows_block_for<BF16>(mb, x_f.data(), w, bias, y + m0 * N, N, K, j0, j1);
    }
  }
}

}  // namespace fp_linear
}  // namespace int8pass
