// llmint8::linear on CPUs with AVX2 and without VNNI or AMX, on dense int8 codes (built and loaded by
// avx2_linear.py). One call does all of docs/design.md §1 for X [M, K] and W_q [N, K]:
//   1. the outlier columns O: those where some |x| is not below the threshold (NaN and Inf included);
//   2. per row, s_x = max |x| over the other columns, and X_q = round(x / s_x * 127) there (0 in O);
//   3. the exact int32 product X_q . W_q^T, and the fp32 product X[:, O] . W_q[:, O]^T;
//   4. the epilogue acc * (s_x * (s_w / 127^2)) + outliers * (s_w / 127) + b, rounded once to X's dtype.
// Steps 3 and 4 go a block of NC weight rows at a time (each thread takes whole blocks), so the weight is streamed
// from memory once and nothing of size [M, N] is written but the output. The floating-point steps are those of the
// reference (int8pass/reference.py) in the same order; it is built with -ffp-contract=off so none is fused.
//
// Without VNNI, x86's int8 multiply is vpmaddubsw: u8 x s8 products added in pairs into a *saturating* int16. Fed
// |w| (at most 128, as u8) and x carrying w's sign (vpsignb; |x_q| <= 127), a pair is at most 2 * 128 * 127 < 2^15,
// so it never saturates: one instruction does 32 exact multiplies and 16 adds, and vpmaddwd widens to int32. Tiles
// of MB activation rows x NB weight rows keep their MB * NB accumulators in registers; each block of NC weight rows
// is read from L2 for every activation row.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t KC = 4096;  // columns per block: NC rows of KC int8 stay in L2 while all activation rows pass
constexpr int64_t NC = 64;
constexpr float Q_MAX = 127.0f;

enum Dtype { F32 = 0, BF16 = 1, F16 = 2 };

float load(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case F32: return static_cast<const float*>(p)[i];
    case BF16: {  // the high half of a float
      const uint32_t bits = uint32_t(static_cast<const uint16_t*>(p)[i]) << 16;
      float value;
      std::memcpy(&value, &bits, sizeof value);
      return value;
    }
    default: return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
  }
}

void store(void* p, int64_t i, float value, int dtype) {
  switch (dtype) {
    case F32: static_cast<float*>(p)[i] = value; return;
    case BF16: {  // round to nearest even, as torch's .to(bfloat16); NaN stays NaN
      uint32_t bits;
      std::memcpy(&bits, &value, sizeof bits);
      const uint16_t out = std::isnan(value) ? uint16_t(0x7FC0) : uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
      static_cast<uint16_t*>(p)[i] = out;
      return;
    }
    default: static_cast<uint16_t*>(p)[i] = _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT); return;
  }
}

// 8 consecutive values as fp32
__m256 load8(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case F32: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    case BF16: {
      const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    }
    default: return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
}

// 8 fp32 values stored in dtype, rounded as store() rounds
void store8(void* p, int64_t i, __m256 v, int dtype) {
  switch (dtype) {
    case F32: _mm256_storeu_ps(static_cast<float*>(p) + i, v); return;
    case BF16: {
      const __m256i bits = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), packed);
      return;
    }
    default:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

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
void row_block(const int8_t* x, const int8_t* w, int32_t* out, int64_t ldo, int64_t K, int64_t rows, int64_t k0,
               int64_t k1) {
  constexpr int NB = 4;
  int64_t n = 0;
  for (; n + NB <= rows; n += NB) tile<MB, NB>(x, K, w + n * K, K, out + n, ldo, k0, k1);
  for (; n < rows; ++n) tile<MB, 1>(x, K, w + n * K, K, out + n, ldo, k0, k1);
}

// out[m, j] = X_q[m, :] . w[j, :] for the `rows` weight rows at w (out has row stride ldo).
void gemm_block(const int8_t* x_q, const int8_t* w, int32_t* out, int64_t ldo, int64_t M, int64_t K, int64_t rows) {
  constexpr int MB = 3;  // 12 accumulators beside the operands fill the 16 ymm registers (2 and 4 measured slower)
  const int64_t k_vec = K / 32 * 32;
  for (int64_t m = 0; m < M; ++m) std::fill(out + m * ldo, out + m * ldo + rows, 0);
  for (int64_t kc = 0; kc < k_vec; kc += KC) {
    const int64_t kc_end = std::min(kc + KC, k_vec);
    int64_t m = 0;
    for (; m + MB <= M; m += MB) row_block<MB>(x_q + m * K, w, out + m * ldo, ldo, K, rows, kc, kc_end);
    for (; m < M; ++m) row_block<1>(x_q + m * K, w, out + m * ldo, ldo, K, rows, kc, kc_end);
  }
  for (int64_t m = 0; m < M; ++m)  // the last K % 32 columns
    for (int64_t n = 0; n < rows; ++n) {
      int32_t sum = 0;
      for (int64_t k = k_vec; k < K; ++k) sum += int32_t(x_q[m * K + k]) * int32_t(w[n * K + k]);
      out[m * ldo + n] += sum;
    }
}

// out[m, j] = sum over i of x_o[m, i] * w[j, cols[i]] in fp32 for the `rows` (at most NC) weight rows at w, x_o being
// X[:, O] ([M, |O|]). The columns are gathered once, while those rows are still in cache from the GEMM; each output
// row is then a sum of |O| scaled copies of them, vectorized over n, adding the columns in ascending order.
void outlier_block(const float* x_o, const std::vector<int32_t>& cols, const int8_t* w, float* out, int64_t M,
                   int64_t K, int64_t rows, float* w_o) {
  const int64_t n_cols = int64_t(cols.size());
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t i = 0; i < n_cols; ++i) w_o[i * NC + n] = float(w[n * K + cols[i]]);
  for (int64_t m = 0; m < M; ++m) {
    float* row = out + m * NC;
    const float* x_m = x_o + m * n_cols;
    int64_t n = 0;
    for (; n + 32 <= rows; n += 32) {  // 4 independent accumulators: the FMA latency is hidden
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t i = 0; i < n_cols; ++i) {
        const __m256 x_mi = _mm256_set1_ps(x_m[i]);
        for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(x_mi, _mm256_loadu_ps(w_o + i * NC + n + 8 * c), acc[c]);
      }
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(row + n + 8 * c, acc[c]);
    }
    for (; n < rows; ++n) {
      float sum = 0.0f;
      for (int64_t i = 0; i < n_cols; ++i) sum = std::fma(x_m[i], w_o[i * NC + n], sum);
      row[n] = sum;
    }
  }
}

// Steps 1 and 2: fills is_outlier [K], s_x [M] and x_q [M, K].
void quantize(const void* x, int dtype, int64_t M, int64_t K, float limit, uint8_t* is_outlier, float* s_x,
              int8_t* x_q) {
  const int64_t k_vec = K / 8 * 8;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 limit8 = _mm256_set1_ps(limit);
  std::fill(is_outlier, is_outlier + K, 0);
#pragma omp parallel for schedule(static)
  for (int64_t k0 = 0; k0 < K; k0 += 256) {  // !(|x| < limit) in any row: NaN compares false, so it is an outlier
    const int64_t k1 = std::min(K, k0 + 256);
    for (int64_t m = 0; m < M; ++m) {
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) {  // k0 is a multiple of 8, so these 8 lie below k_vec
        const __m256 a = _mm256_and_ps(load8(x, m * K + k, dtype), abs_mask);
        const int flags = _mm256_movemask_ps(_mm256_cmp_ps(a, limit8, _CMP_NLT_UQ));
        if (flags)
          for (int b = 0; b < 8; ++b) is_outlier[k + b] |= (flags >> b) & 1;
      }
      for (; k < k1; ++k) is_outlier[k] |= !(std::fabs(load(x, m * K + k, dtype)) < limit);
    }
  }
  std::vector<uint32_t> keep(K);  // all ones in the columns that are not outliers: where(is_outlier, +0, x) is x & keep
  for (int64_t k = 0; k < K; ++k) keep[k] = is_outlier[k] ? 0u : 0xFFFFFFFFu;
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const int64_t base = m * K;
    __m256 max8 = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_vec; k += 8) {
      const __m256 v = _mm256_and_ps(load8(x, base + k, dtype), _mm256_loadu_ps(reinterpret_cast<const float*>(keep.data() + k)));
      max8 = _mm256_max_ps(max8, _mm256_and_ps(v, abs_mask));  // inliers are finite
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, max8);
    float scale = *std::max_element(lanes, lanes + 8);
    for (int64_t k = k_vec; k < K; ++k)
      if (!is_outlier[k]) scale = std::max(scale, std::fabs(load(x, base + k, dtype)));
    s_x[m] = scale;
    const float safe = scale == 0.0f ? 1.0f : scale;
    const __m256 safe8 = _mm256_set1_ps(safe), q_max8 = _mm256_set1_ps(Q_MAX);
    for (int64_t k = 0; k < k_vec; k += 8) {  // round(v / s * 127), |v / s| <= 1, half to even as torch.round
      const __m256 v = _mm256_and_ps(load8(x, base + k, dtype), _mm256_loadu_ps(reinterpret_cast<const float*>(keep.data() + k)));
      const __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_div_ps(v, safe8), q_max8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      int32_t codes[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), _mm256_cvtps_epi32(q));
      for (int b = 0; b < 8; ++b) x_q[base + k + b] = int8_t(codes[b]);
    }
    for (int64_t k = k_vec; k < K; ++k) {
      const float value = is_outlier[k] ? 0.0f : load(x, base + k, dtype);
      x_q[base + k] = int8_t(std::nearbyint(value / safe * Q_MAX));
    }
  }
}

}  // namespace

extern "C" {

// y = llmint8 linear of x [M, K] (dtype 0 fp32, 1 bf16, 2 fp16; y the same) with codes w [N, K], row absmax s_w [N],
// optional bias [N] (bias_dtype as x's), threshold (<= 0: none). `outlier_product`, when not null, is X[:, O] . W[:, O]^T
// fp32 [M, N] from another weight (the original), replacing the product with the codes. All tensors contiguous.
void int8pass_avx2_linear(const void* x, int dtype, int64_t M, int64_t K, const int8_t* w, int64_t N,
                          const float* s_w, const void* bias, int bias_dtype, float threshold,
                          const float* outlier_product, void* y) {
  const float limit = threshold > 0 ? threshold : INFINITY;
  std::vector<uint8_t> is_outlier(K);
  std::vector<float> s_x(M);
  std::vector<int8_t> x_q(M * K);
  quantize(x, dtype, M, K, limit, is_outlier.data(), s_x.data(), x_q.data());
  std::vector<int32_t> cols;
  if (!outlier_product)
    for (int64_t k = 0; k < K; ++k)
      if (is_outlier[k]) cols.push_back(int32_t(k));
  const int64_t n_cols = int64_t(cols.size());
  std::vector<float> x_o(M * n_cols);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < n_cols; ++i) x_o[m * n_cols + i] = load(x, m * K + cols[i], dtype);
  const int64_t blocks = (N + NC - 1) / NC;
#pragma omp parallel
  {
    std::vector<int32_t> acc(M * NC);
    std::vector<float> outliers(n_cols ? M * NC : 0), w_o(n_cols * NC);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * NC, rows = std::min(N, n0 + NC) - n0;
      gemm_block(x_q.data(), w + n0 * K, acc.data(), NC, M, K, rows);
      if (n_cols) outlier_block(x_o.data(), cols, w + n0 * K, outliers.data(), M, K, rows, w_o.data());
      float acc_scale[NC], outlier_scale[NC], b_n[NC];
      for (int64_t n = 0; n < rows; ++n) {
        acc_scale[n] = s_w[n0 + n] / (Q_MAX * Q_MAX);
        outlier_scale[n] = s_w[n0 + n] / Q_MAX;
        b_n[n] = bias ? load(bias, n0 + n, bias_dtype) : 0.0f;
      }
      for (int64_t n = rows; n < NC; ++n) acc_scale[n] = outlier_scale[n] = b_n[n] = 0.0f;
      float product[NC] = {};
      float value[NC];
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < rows; ++n)
          product[n] = n_cols ? outliers[m * NC + n] * outlier_scale[n]
                       : outlier_product ? outlier_product[m * N + n0 + n] : 0.0f;
        const __m256 s_x8 = _mm256_set1_ps(s_x[m]);
        for (int64_t n = 0; n < NC; n += 8) {  // the reference's order: acc * (s_x * (s_w / 127^2)) + product + b
          const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc.data() + m * NC + n)));
          __m256 v = _mm256_add_ps(_mm256_mul_ps(a, _mm256_mul_ps(s_x8, _mm256_loadu_ps(acc_scale + n))), _mm256_loadu_ps(product + n));
          if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(b_n + n));
          _mm256_storeu_ps(value + n, v);
        }
        int64_t n = 0;
        for (; n + 8 <= rows; n += 8) store8(y, m * N + n0 + n, _mm256_loadu_ps(value + n), dtype);
        for (; n < rows; ++n) store(y, m * N + n0 + n, value[n], dtype);
      }
    }
  }
}

// The int32 accumulator X_q . W_q^T [M, N] alone (the tests check it bit for bit against the reference).
void int8pass_int8_mm(const int8_t* x_q, const int8_t* w, int32_t* acc, int64_t M, int64_t N, int64_t K) {
  const int64_t blocks = (N + NC - 1) / NC;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * NC;
    gemm_block(x_q, w + n0 * K, acc + n0, N, M, K, std::min(N, n0 + NC) - n0);
  }
}

}  // extern "C"
