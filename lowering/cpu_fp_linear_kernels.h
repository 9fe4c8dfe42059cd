// The kernel of llmint8::cpu_fp_linear: y = x W^T + b for a bfloat16 or float16 x [M, K] and weight W [N, K]
// (row-major), products and sums in float32, rounded once to the dtype. It is the decode GEMV of the linears a
// compiled graph keeps in floating point (an output head, most often; int8pass/fx_pass.py writes it for up to
// MAX_ROWS rows): those read the whole weight for a row or two, so the weight's stream is all that counts. PyTorch's
// bf16 matmul reached 14 GB/s there on a 262144 x 640 head (2 threads, AMX Xeon whose memory reads 27-31 GB/s): it
// reorders the weight for oneDNN on every call.
//
// AVX2 + FMA + F16C, which the whole library is built for: the weight goes 8 values to a vector, widened to float32
// by the library's load8 (bf16: a 16-bit shift; fp16: vcvtph2ps) and multiplied into float32 sums with vfmadd, a few
// instructions per 16 bytes, far below what the memory can bring on any core. Each thread takes whole blocks of
// weight rows; a row is read once for all M (at most MAX_ROWS) activation rows, its stream fetched ahead into L2.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_linear_kernels.h"

namespace int8pass {
namespace fp_linear {

constexpr int MAX_ROWS = 4;              // activation rows per pass over the weight
constexpr int64_t ROWS_PER_TASK = 64;    // weight rows a thread takes at a time
constexpr int64_t AHEAD_BYTES = 16384;   // how far ahead of the stream its lines are fetched into L2

// y[i * N + j] = x_f[i] . w[j] + bias[j] for MB activation rows (float32, K each) and weight rows [j0, j1) in DTYPE
// (a constant, so that the loads' dtype switch is resolved at compile time): 4 sums along K per activation row for
// one row (to cover vfmadd's latency), 2 for more
template <int DTYPE, int MB>
void rows_block(const float* x_f, const void* w, const void* bias, void* y, int64_t N, int64_t K, int64_t j0,
                int64_t j1) {
  constexpr int U = MB == 1 ? 4 : 2;
  const int64_t ahead = std::max<int64_t>(AHEAD_BYTES / 2, K);  // in 2-byte values
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t row = j * K;
    __m256 acc[MB][U];
    for (int i = 0; i < MB; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
      if ((k & 31) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(static_cast<const uint16_t*>(w) + row + ahead + k), _MM_HINT_T1);
      for (int u = 0; u < U; ++u) {
        const __m256 wv = load8(w, row + k + 8 * u, DTYPE);
        for (int i = 0; i < MB; ++i)
          acc[i][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x_f + i * K + k + 8 * u), wv, acc[i][u]);
      }
    }
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = load8(w, row + k, DTYPE);
      for (int i = 0; i < MB; ++i) acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x_f + i * K + k), wv, acc[i][0]);
    }
    for (int i = 0; i < MB; ++i) {
      __m256 total = acc[i][0];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[i][u]);
      float s = horizontal_sum(total);
      for (int64_t t = k; t < K; ++t) s += x_f[i * K + t] * load(w, row + t, DTYPE);
      store(y, i * N + j, s + (bias ? load(bias, j, DTYPE) : 0.0f), DTYPE);
    }
  }
}

template <int DTYPE>
void rows_block_for(int mb, const float* x_f, const void* w, const void* bias, void* y, int64_t N, int64_t K,
                    int64_t j0, int64_t j1) {
  switch (mb) {
    case 1: return rows_block<DTYPE, 1>(x_f, w, bias, y, N, K, j0, j1);
    case 2: return rows_block<DTYPE, 2>(x_f, w, bias, y, N, K, j0, j1);
    case 3: return rows_block<DTYPE, 3>(x_f, w, bias, y, N, K, j0, j1);
    default: return rows_block<DTYPE, 4>(x_f, w, bias, y, N, K, j0, j1);
  }
}

// y [M, N] = x [M, K] . w [N, K]^T + bias [N] (or null), all in DTYPE (BF16 or F16)
template <int DTYPE>
void linear(const void* x, const void* w, const void* bias, void* y, int64_t M, int64_t N, int64_t K) {
  std::vector<float> x_f(size_t(std::min<int64_t>(M, MAX_ROWS) * K));
  const int64_t tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
  for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
    const int mb = int(std::min<int64_t>(MAX_ROWS, M - m0));
    for (int64_t t = 0; t < mb * K; ++t) x_f[t] = load(x, m0 * K + t, DTYPE);
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_ELEMENTS)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t j0 = task * ROWS_PER_TASK, j1 = std::min(N, j0 + ROWS_PER_TASK);
      rows_block_for<DTYPE>(mb, x_f.data(), w, bias, static_cast<uint16_t*>(y) + m0 * N, N, K, j0, j1);
    }
  }
}

}  // namespace fp_linear
}  // namespace int8pass
