// llmint8::cpu_int8_mm's kernel, for x86 CPUs with AVX2 (built and loaded by cpu_int8_mm.py): the exact int8 GEMM
// acc[m, n] = sum_k x_q[m, k] * w[n, k] in int32, and the outlier columns' product X[:, O] . W_q[:, O]^T in fp32.
// x_q and w are row-major int8; x_q holds codes in [-127, 127].
//
// Without VNNI, x86's int8 multiply is vpmaddubsw: u8 x s8 products added in pairs into a *saturating* int16. Fed
// |w| (at most 128, as u8) and x carrying w's sign (vpsignb; |x| <= 127), a pair is at most 2 * 128 * 127 < 2^15,
// so it never saturates: one instruction does 32 exact multiplies and 16 adds, and vpmaddwd widens to int32. Tiles
// of MB activation rows x NB weight rows keep their MB * NB accumulators in registers; each block of NC weight rows
// is read from L2 for every activation row, and each thread takes whole blocks. The outlier columns of a block are
// read right after its GEMM, while its rows are still cached, so the weight is streamed from memory once.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t KC = 4096;  // columns per block: NC rows of KC int8 stay in L2 while all activation rows pass
constexpr int64_t NC = 64;

inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// out[i, j] += sum over k in [k0, k1) of x[i, k] * w[j, k], for MB rows of x and NB rows of w; k1 - k0 is a
// multiple of 32.
template <int MB, int NB>
inline void tile(const int8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int32_t* out, int64_t ldo,
                 int64_t k0, int64_t k1) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t k = k0; k < k1; k += 32) {
    for (int j = 0; j < NB; ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * ldw + k));
      const __m256i wabs = _mm256_abs_epi8(wv);
      for (int i = 0; i < MB; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * ldx + k));
        const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out[i * ldo + j] += horizontal_sum(acc[i][j]);
}

template <int MB>
void row_block(const int8_t* x, const int8_t* w, int32_t* out, int64_t K, int64_t N, int64_t n0, int64_t n1,
               int64_t k0, int64_t k1) {
  constexpr int NB = 4;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile<MB, NB>(x, K, w + n * K, K, out + n, N, k0, k1);
  for (; n < n1; ++n) tile<MB, 1>(x, K, w + n * K, K, out + n, N, k0, k1);
}

// The outlier columns' product for weight rows [n0, n1) (at most NC): outliers[m, n] = sum_j x_o[m, j] * w[n, cols[j]]
// in fp32, x_o being X[:, O] ([M, |O|], fp32). The columns W_q[n0:n1, O] are gathered once, while those rows are
// still in cache from the GEMM; each output row is then a sum of |O| scaled copies of them, vectorized over n,
// adding the columns in ascending order as a matmul would.
void outlier_rows(const float* x_o, const int32_t* cols, int64_t n_cols, const int8_t* w, float* outliers, int64_t M,
                  int64_t N, int64_t K, int64_t n0, int64_t n1, float* w_o) {
  const int64_t width = n1 - n0;
  for (int64_t n = 0; n < width; ++n)
    for (int64_t j = 0; j < n_cols; ++j) w_o[j * NC + n] = float(w[(n0 + n) * K + cols[j]]);
  for (int64_t m = 0; m < M; ++m) {
    float* row = outliers + m * N + n0;
    const float* x_m = x_o + m * n_cols;
    int64_t n = 0;
    for (; n + 32 <= width; n += 32) {  // 4 independent accumulators: the FMA latency is hidden
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t j = 0; j < n_cols; ++j) {
        const __m256 x_mj = _mm256_set1_ps(x_m[j]);
        for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(x_mj, _mm256_loadu_ps(w_o + j * NC + n + 8 * c), acc[c]);
      }
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(row + n + 8 * c, acc[c]);
    }
    for (; n < width; ++n) {
      float sum = 0.0f;
      for (int64_t j = 0; j < n_cols; ++j) sum = std::fma(x_m[j], w_o[j * NC + n], sum);
      row[n] = sum;
    }
  }
}

void gemm_rows(const int8_t* x, const int8_t* w, int32_t* out, int64_t M, int64_t N, int64_t K, int64_t n0,
               int64_t n1) {
  constexpr int MB = 3;  // 12 accumulators beside the operands fill the 16 ymm registers (2 and 4 measured slower)
  const int64_t k_vec = K / 32 * 32;
  for (int64_t m = 0; m < M; ++m) std::fill(out + m * N + n0, out + m * N + n1, 0);
  for (int64_t kc = 0; kc < k_vec; kc += KC) {
    const int64_t kc_end = std::min(kc + KC, k_vec);
    int64_t m = 0;
    for (; m + MB <= M; m += MB) row_block<MB>(x + m * K, w, out + m * N, K, N, n0, n1, kc, kc_end);
    for (; m < M; ++m) row_block<1>(x + m * K, w, out + m * N, K, N, n0, n1, kc, kc_end);
  }
  for (int64_t m = 0; m < M; ++m)  // the last K % 32 columns
    for (int64_t n = n0; n < n1; ++n) {
      int32_t sum = 0;
      for (int64_t k = k_vec; k < K; ++k) sum += int32_t(x[m * K + k]) * int32_t(w[n * K + k]);
      out[m * N + n] += sum;
    }
}

float to_float(const void* x, int64_t i, int dtype) {
  switch (dtype) {
    case 0: return static_cast<const float*>(x)[i];
    case 1: {  // bfloat16: the high half of a float
      uint32_t bits = uint32_t(static_cast<const uint16_t*>(x)[i]) << 16;
      float value;
      std::memcpy(&value, &bits, sizeof value);
      return value;
    }
    default: return _cvtsh_ss(static_cast<const uint16_t*>(x)[i]);  // float16
  }
}

}  // namespace

// acc = X_q . W_q^T (int32 [M, N]) and outliers = X[:, O] . W_q[:, O]^T (fp32 [M, N]), where O are the columns
// that is_outlier marks. x is X [M, K] in fp32 (dtype 0), bfloat16 (1) or float16 (2); all rows contiguous.
// Threads (the caller's OpenMP pool: torch's own) each take whole blocks of NC weight rows.
// Returns 0, or -1 when x_q holds -128 (outside the code range, where vpsignb cannot carry a sign).
extern "C" int int8pass_cpu_int8_mm(const int8_t* x_q, const void* x, int x_dtype, const bool* is_outlier,
                                    const int8_t* w, int32_t* acc, float* outliers, int64_t M, int64_t N,
                                    int64_t K) {
  for (int64_t i = 0; i < M * K; ++i)
    if (x_q[i] == -128) return -1;
  std::vector<int32_t> cols;
  for (int64_t k = 0; k < K; ++k)
    if (is_outlier[k]) cols.push_back(int32_t(k));
  const int64_t n_cols = int64_t(cols.size());
  std::vector<float> x_o(M * n_cols);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < n_cols; ++j) x_o[m * n_cols + j] = to_float(x, m * K + cols[j], x_dtype);
  const int64_t blocks = (N + NC - 1) / NC;
#pragma omp parallel
  {
    std::vector<float> w_o(n_cols * NC);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * NC, n1 = std::min(N, n0 + NC);
      gemm_rows(x_q, w, acc, M, N, K, n0, n1);
      if (n_cols)
        outlier_rows(x_o.data(), cols.data(), n_cols, w, outliers, M, N, K, n0, n1, w_o.data());
      else
        for (int64_t m = 0; m < M; ++m) std::fill(outliers + m * N + n0, outliers + m * N + n1, 0.0f);
    }
  }
  return 0;
}
