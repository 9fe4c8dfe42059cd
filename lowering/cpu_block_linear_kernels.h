// The CPU kernels of llmint8::cpu_block_linear (cpu_linear.cpp registers the op): the block-scaled linear of
// docs/design.md §1b for X [M, K] and the dense row-major int8 codes W_q [N, K] with one bf16 scale d_w per block of
// B consecutive columns of each row ([N, ceil(K / B)]), on raw pointers.
//
// One call:
//   1. the outlier columns O, as in LLM.int8() (cpu_linear_kernels.h: outlier_mask); at threshold 0 only the columns
//      holding NaN or Inf;
//   2. per row m and block b, d_x = max |x| over the block's other columns / 127, and X_q = round(x / d_x) there;
//   3. Y = sum over blocks of (X_q . W_q^T over the block, exact int32) * d_x * d_w, in fp32, plus the outlier
//      columns' fp32 product with the dequantized weight W_q * d_w, plus b, rounded once to X's dtype.
// The blocks are multiples of 32 columns, so every 32-column chunk lies in one block.
//
// The GEMM, by instruction set (each block's integer dot product is exact; its fp32 scaling and the sum over blocks
// are rounded in an order the reference does not fix, which the bound of §1b covers):
//   AVX2: dot products along K, tiles of up to 3 activation rows x 4 weight rows. Per 32 columns, vpmaddubsw /
//     vpmaddwd as in the LLM.int8() kernel give 8 int32 lanes of one block, converted and added into fp32 lanes
//     times d_x * d_w: no horizontal sum until the end.
//   AVX512-VNNI below ROW_LANES_MIN_ROWS rows: the same dot products over 64 columns, vpdpbusd of W_q + 128 by X_q.
//   AVX512-VNNI from ROW_LANES_MIN_ROWS to PACKED_MIN_ROWS rows: 16 weight rows at a time, each 64 columns of them
//     (+ 128) transposed in registers so that a vector holds 4 columns of all 16 rows, times 4 codes of an activation
//     row broadcast: every lane of a block's int32 sums is one output, scaled once per block (row_lanes_tile).
//   AVX512-VNNI from PACKED_MIN_ROWS rows: X_q packed in 16-row tiles (cpu_linear_kernels.h: vnni::pack_rows, signed),
//     each vpdpbusd multiplying 4 codes of one weight row + 128, broadcast, by 4 codes of 16 rows. A block's int32
//     sums start from -128 * the rows' code sums over the block, so they come out exact, and are converted and
//     added into fp32 sums times the 16 rows' d_x and the row's d_w: one conversion, one multiply and one fused
//     multiply-add per 8 * B / 32 vpdpbusd.
//   AMX from AMX_MIN_ROWS rows: X_q packed as tile B (pack_b_tiles, 32-column steps), each block's tile
//     products (s8 x s8, exact) stored, then converted and added into fp32 sums times d_x * d_w, 16 outputs at a time.
//   (vpdpbusd multiplies u8 by s8: W_q + 128 is the u8 side, so what it adds, 128 * x, comes from the activations,
//   once per call, and not from the weight.)
#pragma once

#include "cpu_linear_kernels.h"

namespace int8pass {
namespace blocks {

// The activation of a block-scaled linear: X [M, K], contiguous, in x_dtype, its block size and outlier threshold
struct BlockActivation {
  const void* x;
  int x_dtype;
  int64_t M, K;
  int64_t block_size;  // a multiple of 32
  float threshold;     // <= 0: no magnitude outliers
};

// One weight multiplying it, and its output y [M, N] in x_dtype
struct BlockWeight {
  const int8_t* w;  // [N, K] codes, contiguous
  int64_t N;
  const uint16_t* d_w;  // [N, blocks] bf16
  const void* bias;     // [N] in bias_dtype, or nullptr
  int bias_dtype;
  void* y;
};

// From this many rows the VNNI kernel packs X_q in 16-row tiles; below, 4-row dot-product tiles do less work (Zen 4
// EPYC, 14336 x 4096 at block 32: 5 rows 3.8 ms by dot products against 5.7 packed, 6 rows 4.6 against 5.6, 8 rows
// 6.5 against 5.6; Ice Lake Xeon with the register-held packed tiles, 4096 x 4096: 7 rows 1.9 against 2.6, 8 rows
// 2.5 against 2.6 but 2048 x 640 0.23 against 0.20, 10 rows 3.0 against 2.6)
constexpr int64_t PACKED_MIN_ROWS = 8;

// From this many rows the AMX kernel runs, where the CPU has it; below, the VNNI kernel (AMX Xeon, 6 shapes, block
// 32: at 6 and 7 rows AMX runs at 0.75-0.91x and 0.81-0.95x the speed of the VNNI kernel's row lanes; the tiles'
// scaling also pays for the rows of padding up to 16)
constexpr int64_t AMX_MIN_ROWS = 8;

inline int64_t block_count(int64_t K, int64_t B) { return (K + B - 1) / B; }

// Step 2: d_x [M, blocks] and x_q [M, K], from outlier_mask's is_outlier and keep. Each value is divided by its
// block's d_x (correctly rounded, as torch divides), rounded half to even and clamped to +-127 (a subnormal d_x can
// put a quotient past 127.5); d_x = 0 divides by 1, which gives 0 for the (tiny or zero) values of such a block.
// code_sums (or nullptr): [M, blocks], each block's sum of codes over its columns below K / 32 * 32, which the
// packed VNNI tiles take off (summed here, while the codes are in registers, rather than in a pass of their own)
inline void quantize(const void* x, int dtype, int64_t M, int64_t K, int64_t B, const uint8_t* is_outlier,
                     const uint32_t* keep, float* d_x, int8_t* x_q, int32_t* code_sums) {
  const int64_t blocks = block_count(K, B), k32 = K / 32 * 32;  // k32: a multiple of 8, so whole vectors lie below
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 q_max = _mm256_set1_ps(Q_MAX), q_min = _mm256_set1_ps(-Q_MAX);
#pragma omp parallel for schedule(static) if (M * K >= PARALLEL_MIN_ELEMENTS && M > 1)
  for (int64_t m = 0; m < M; ++m) {
    const int64_t base = m * K;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * B, k1 = std::min(K, k0 + B), k_vec = k0 + (k1 - k0) / 8 * 8;
      __m256 max8 = _mm256_setzero_ps();
      for (int64_t k = k0; k < k_vec; k += 8) {
        const __m256 v = _mm256_and_ps(load8(x, base + k, dtype), _mm256_loadu_ps(reinterpret_cast<const float*>(keep + k)));
        max8 = _mm256_max_ps(max8, _mm256_and_ps(v, abs_mask));  // inliers are finite
      }
      float lanes[8];
      _mm256_storeu_ps(lanes, max8);
      float absmax = *std::max_element(lanes, lanes + 8);
      for (int64_t k = k_vec; k < k1; ++k)
        if (!is_outlier[k]) absmax = std::max(absmax, std::fabs(load(x, base + k, dtype)));
      const float d = absmax / Q_MAX;
      d_x[m * blocks + b] = d;
      const __m256 safe8 = _mm256_set1_ps(d == 0.0f ? 1.0f : d);
      __m256i sums8 = _mm256_setzero_si256();
      for (int64_t k = k0; k < k_vec; k += 8) {
        const __m256 v = _mm256_and_ps(load8(x, base + k, dtype), _mm256_loadu_ps(reinterpret_cast<const float*>(keep + k)));
        const __m256 q = _mm256_round_ps(_mm256_div_ps(v, safe8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i codes = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, q_min), q_max));
        if (k < k32) sums8 = _mm256_add_epi32(sums8, codes);
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(x_q + base + k), _mm_packs_epi16(words, words));
      }
      int32_t sum = 0;
      for (int64_t k = k_vec; k < k1; ++k) {
        const float value = is_outlier[k] ? 0.0f : load(x, base + k, dtype);
        x_q[base + k] = int8_t(std::clamp(std::nearbyint(value / (d == 0.0f ? 1.0f : d)), -Q_MAX, Q_MAX));
        if (k < k32) sum += x_q[base + k];
      }
      if (code_sums) {
        int32_t lanes8[8];
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes8), sums8);
        for (const int32_t lane : lanes8) sum += lane;
        code_sums[m * blocks + b] = sum;
      }
    }
  }
}

// out[i] = the bf16 values at in, as fp32
inline void bf16_to_float(const uint16_t* in, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16)));
  }
  for (; i < count; ++i) out[i] = bf16_value(in[i]);
}

// out[i * ldo + j] = sum over the first K / 32 * 32 columns, block by block, of X_q[i] . w[j] * d_x[i, b] * d_w[j, b]
// for MB activation rows and NB weight rows (dx: [MB, blocks], dw: [NB, blocks] fp32; scale: scratch of
// MB x NB x blocks floats, where the products d_x * d_w are taken first, 8 blocks at a time, so that each step loads
// its own by one broadcast). For up to 4 activation rows the weight rows are fetched ahead into L2, as the LLM.int8()
// kernel's decode tiles do.
template <int MB, int NB>
inline void dot_tile(const int8_t* x, const float* dx, const int8_t* w, const float* dw, int64_t K, int64_t blocks,
                     int64_t B, float* scale, float* out, int64_t ldo) {
  const int64_t k32 = K / 32 * 32;
  const int64_t ahead = NB * std::max<int64_t>(1, vnni::PREFETCH_BYTES / (NB * K)) * K;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float* s = scale + (i * NB + j) * blocks;
      int64_t b = 0;
      for (; b + 8 <= blocks; b += 8)
        _mm256_storeu_ps(s + b, _mm256_mul_ps(_mm256_loadu_ps(dx + i * blocks + b), _mm256_loadu_ps(dw + j * blocks + b)));
      for (; b < blocks; ++b) s[b] = dx[i * blocks + b] * dw[j * blocks + b];
    }
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k32; k += 32) {
    const int64_t b = k / B;
    for (int j = 0; j < NB; ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + k));
      if (MB <= 4) _mm_prefetch(reinterpret_cast<const char*>(w + j * K + ahead + k), _MM_HINT_T1);
      const __m256i wabs = _mm256_abs_epi8(wv);
      for (int i = 0; i < MB; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * K + k));
        const __m256i lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv)), ones);
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_broadcast_ss(scale + (i * NB + j) * blocks + b),
                                    acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out[i * ldo + j] = horizontal_sum(acc[i][j]);
}

// dot_tile over M activation rows and `rows` weight rows (scale: scratch of 12 x blocks floats)
inline void dot_gemm_block(const int8_t* x_q, const float* d_x, const int8_t* w, const float* dw, int64_t M, int64_t K,
                           int64_t blocks, int64_t B, int64_t rows, float* scale, float* out, int64_t ldo) {
  constexpr int MB = 3, NB = 4;
  int64_t m = 0;
  for (; m + MB <= M; m += MB) {
    int64_t n = 0;
    for (; n + NB <= rows; n += NB)
      dot_tile<MB, NB>(x_q + m * K, d_x + m * blocks, w + n * K, dw + n * blocks, K, blocks, B, scale, out + m * ldo + n, ldo);
    for (; n < rows; ++n)
      dot_tile<MB, 1>(x_q + m * K, d_x + m * blocks, w + n * K, dw + n * blocks, K, blocks, B, scale, out + m * ldo + n, ldo);
  }
  for (; m < M; ++m) {
    int64_t n = 0;
    for (; n + NB <= rows; n += NB)
      dot_tile<1, NB>(x_q + m * K, d_x + m * blocks, w + n * K, dw + n * blocks, K, blocks, B, scale, out + m * ldo + n, ldo);
    for (; n < rows; ++n)
      dot_tile<1, 1>(x_q + m * K, d_x + m * blocks, w + n * K, dw + n * blocks, K, blocks, B, scale, out + m * ldo + n, ldo);
  }
}

}  // namespace blocks

// ---- AVX512-VNNI: the packed 16-row tiles -------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

namespace vnni_blocks {

// What vpdpbusd of W_q + 128 by X_q adds to each lane (4 columns) beyond w x: 128 * the lane's x codes, for each
// activation row over the first K / 32 * 32 columns, negated: [row][K / 64 rounded up][16] int32
inline void lane_offsets(const int8_t* x_q, int64_t M, int64_t K, int32_t* off) {
  const int64_t k32 = K / 32 * 32, steps = (k32 + 63) / 64;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t k = s * 64;
      const __mmask64 mask = k32 - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (k32 - k)) - 1;
      const __m512i sums = vnni::dpbusd(_mm512_setzero_si512(), ones, _mm512_maskz_loadu_epi8(mask, x_q + m * K + k));
      _mm512_storeu_si512(off + (m * steps + s) * 16, _mm512_mullo_epi32(sums, _mm512_set1_epi32(-128)));
    }
}

// blocks::dot_tile with vpdpbusd over 64 columns at a time: W_q + 128 (u8) by X_q, each lane starting from
// lane_offsets' -128 x so that it comes out exact, 16 int32 lanes each within one block, converted and added into
// fp32 lanes times their block's d_x * d_w. The scales of 16 blocks are multiplied once (d_x * d_w, 16 lanes), and each step's lanes take
// theirs by one permute: lane l of step t of a group covers block (64 t + 32 (l / 8)) / B of the group's 16.
// For each step t of a group, the block of the group each of its 16 lanes covers
template <int B>
struct LaneBlocks {
  alignas(64) int32_t index[16 * B / 64][16];
  LaneBlocks() {
    for (int t = 0; t < 16 * B / 64; ++t)
      for (int l = 0; l < 16; ++l) index[t][l] = (64 * t + 32 * (l / 8)) / B;
  }
};

template <int MB, int NB, int B>
inline void dot_tile(const int8_t* x, const float* dx, const int32_t* off, const int8_t* w, const float* dw, int64_t K,
                     int64_t blocks, float* out, int64_t ldo) {
  const int64_t k32 = K / 32 * 32, steps = (k32 + 63) / 64;
  const __m512i top_bits = _mm512_set1_epi8(char(0x80));
  const int64_t ahead = NB * std::max<int64_t>(1, vnni::PREFETCH_BYTES / (NB * K)) * K;
  static const LaneBlocks<B> lane_block;
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g * 16 * B < k32; ++g) {
    const int64_t b0 = g * 16;
    const __mmask16 present = blocks - b0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (blocks - b0)) - 1);
    __m512 scale[MB][NB];
    for (int i = 0; i < MB; ++i) {
      const __m512 dxv = _mm512_maskz_loadu_ps(present, dx + i * blocks + b0);
      for (int j = 0; j < NB; ++j) scale[i][j] = _mm512_mul_ps(dxv, _mm512_maskz_loadu_ps(present, dw + j * blocks + b0));
    }
    const int64_t k_end = std::min(k32, (g + 1) * 16 * B);
    for (int64_t k = g * 16 * B, t = 0; k < k_end; k += 64, ++t) {
      const __mmask64 mask = k_end - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (k_end - k)) - 1;
      __m512i xv[MB];
      for (int i = 0; i < MB; ++i) xv[i] = _mm512_maskz_loadu_epi8(mask, x + i * K + k);
      const int64_t s = k / 64;
      for (int j = 0; j < NB; ++j) {
        const __m512i w_u8 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + j * K + k), top_bits);
        if (MB <= 4) _mm_prefetch(reinterpret_cast<const char*>(w + j * K + ahead + k), _MM_HINT_T1);
        for (int i = 0; i < MB; ++i) {
          const __m512i lanes = vnni::dpbusd(_mm512_loadu_si512(off + (i * steps + s) * 16), w_u8, xv[i]);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), _mm512_permutexvar_ps(_mm512_load_si512(lane_block.index[t]), scale[i][j]),
                                      acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// dot_tile over M activation rows (d_x: [M, blocks]; off: lane_offsets'), 4 at a time, and `rows` weight rows
template <int B>
__attribute__((noinline)) void dot_gemm_block(const int8_t* x_q, const float* d_x, const int32_t* off, const int8_t* w,
                                              const float* dw, int64_t M, int64_t K, int64_t blocks, int64_t rows,
                                              float* out, int64_t ldo) {
  constexpr int NB = 4;
  const int64_t steps = (K / 32 * 32 + 63) / 64;
  for (int64_t m = 0; m < M; m += 4) {
    const int8_t* x = x_q + m * K;
    const float* dx = d_x + m * blocks;
    const int32_t* o = off + m * steps * 16;
    float* out_m = out + m * ldo;
    int64_t n = 0;
    for (; n + NB <= rows; n += NB) {
      const int8_t* wn = w + n * K;
      const float* dwn = dw + n * blocks;
      switch (std::min<int64_t>(4, M - m)) {
        case 1: dot_tile<1, NB, B>(x, dx, o, wn, dwn, K, blocks, out_m + n, ldo); break;
        case 2: dot_tile<2, NB, B>(x, dx, o, wn, dwn, K, blocks, out_m + n, ldo); break;
        case 3: dot_tile<3, NB, B>(x, dx, o, wn, dwn, K, blocks, out_m + n, ldo); break;
        default: dot_tile<4, NB, B>(x, dx, o, wn, dwn, K, blocks, out_m + n, ldo); break;
      }
    }
    for (; n < rows; ++n)
      for (int64_t i = m; i < std::min<int64_t>(M, m + 4); ++i)
        dot_tile<1, 1, B>(x_q + i * K, d_x + i * blocks, off + i * steps * 16, w + n * K, dw + n * blocks, K, blocks,
                          out + i * ldo + n, ldo);
  }
}

using DotGemm = void (*)(const int8_t*, const float*, const int32_t*, const int8_t*, const float*, int64_t, int64_t,
                         int64_t, int64_t, float*, int64_t);

inline DotGemm dot_gemm(int64_t B) {
  return B == 32 ? dot_gemm_block<32> : B == 64 ? dot_gemm_block<64> : dot_gemm_block<128>;
}

// From this many activation rows up to the packed tiles, 16 weight rows at a time go by row_lanes_tile; below, by
// dot_tile, whose every vpdpbusd needs a conversion, a permute and a fused multiply-add of its own, but which has no
// transpose to pay for (AMX Xeon, block 32, row lanes against dot_tile: 2 rows 0.89-0.94x dot_tile's speed, 3 rows
// 0.93-1.03x, 4 rows 1.14-1.20x, 5 rows 1.34-1.44x on 4096 x 4096, 4096 x 14336 and 1024 x 4096)
constexpr int64_t ROW_LANES_MIN_ROWS = 4;
static_assert(ROW_LANES_MIN_ROWS == 4 && blocks::PACKED_MIN_ROWS == 8, "row_lanes_gemm_block runs 4 to 7 rows");

// dwt[b][r] = dw[r][b] ([row][block] to [block][ldd]) for the first rows / 16 * 16 rows, 16 x 16 at a time
inline void transpose_scales(const float* dw, int64_t rows, int64_t blocks, float* dwt, int64_t ldd) {
  for (int64_t r0 = 0; r0 + 16 <= rows; r0 += 16)
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
      const __mmask16 present = blocks - b0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (blocks - b0)) - 1);
      __m512i v[16];
      for (int j = 0; j < 16; ++j) v[j] = _mm512_maskz_loadu_epi32(present, dw + (r0 + j) * blocks + b0);
      vnni::transpose16(v);
      for (int64_t i = 0; i < 16 && b0 + i < blocks; ++i) _mm512_storeu_si512(dwt + (b0 + i) * ldd + r0, v[i]);
    }
}

// out[i, 0..16) = the block-scaled products of MB activation rows x (d_x: [row][block]; code_sums: [row][block], each
// block's sum of codes below K / 32 * 32, which vpdpbusd's + 128 on the weight adds 128 times) with 16 weight rows w (their d_w transposed, dwt: [block][ldd]), over
// the first K / 32 * 32 columns. Each 64 columns of the 16 rows, + 128, are transposed in registers so that a vector
// holds 4 columns of every row: one vpdpbusd by 4 broadcast codes of an activation row then sums 16 outputs, each
// lane within one block, and a block costs one conversion, one multiply and one fused multiply-add per activation
// row and 16 outputs, where dot_tile pays those per vpdpbusd. The transpose (64 shuffles per 1 KB of weight) is
// shared by the MB rows.
template <int MB, int B>
inline void row_lanes_tile(const int8_t* x, const float* dx, const int32_t* code_sums, const int8_t* w, const float* dwt,
                           int64_t ldd, int64_t K, int64_t blocks, float* out, int64_t ldo) {
  const int64_t k32 = K / 32 * 32;
  const __m512i top_bits = _mm512_set1_epi8(char(0x80));
  const int64_t ahead = std::max<int64_t>(1, vnni::PREFETCH_BYTES / (16 * K)) * 16 * K;
  __m512 sum[MB];
  __m512i dot[MB];
  for (int i = 0; i < MB; ++i) sum[i] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < k32; k0 += 64) {
    const int64_t halves = std::min<int64_t>(2, (k32 - k0) / 32);
    const __mmask64 mask = halves == 2 ? ~__mmask64(0) : (__mmask64(1) << 32) - 1;
    __m512i r[16];
    for (int j = 0; j < 16; ++j) {
      r[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + j * K + k0), top_bits);
      _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k0 + ahead), _MM_HINT_T1);
    }
    vnni::transpose16(r);
    for (int64_t h = 0; h < halves; ++h) {
      const int64_t k = k0 + 32 * h, b = k / B;
      if (k % B == 0)
        for (int i = 0; i < MB; ++i) dot[i] = _mm512_set1_epi32(-128 * code_sums[i * blocks + b]);
      for (int q = 0; q < 8; ++q)
        for (int i = 0; i < MB; ++i) {
          int32_t quad;
          std::memcpy(&quad, x + i * K + k + 4 * q, 4);
          dot[i] = vnni::dpbusd(dot[i], r[8 * h + q], _mm512_set1_epi32(quad));
        }
      if ((k + 32) % B == 0 || k + 32 == k32) {  // the block ends: scale its sums into the fp32 ones
        const __m512 dwv = _mm512_loadu_ps(dwt + b * ldd);
        for (int i = 0; i < MB; ++i)
          sum[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), _mm512_mul_ps(_mm512_set1_ps(dx[i * blocks + b]), dwv),
                                   sum[i]);
      }
    }
  }
  for (int i = 0; i < MB; ++i) _mm512_storeu_ps(out + i * ldo, sum[i]);
}

// row_lanes_tile over M (4 to 7) activation rows and the first rows / 16 * 16 weight rows at w (d_w
// transposed in dwt, [block][ldd]); returns how many rows that is
template <int B>
__attribute__((noinline)) int64_t row_lanes_gemm_block(const int8_t* x_q, const float* d_x, const int32_t* code_sums,
                                                       const int8_t* w, const float* dwt, int64_t ldd, int64_t M,
                                                       int64_t K, int64_t blocks, int64_t rows, float* out,
                                                       int64_t ldo) {
  const int64_t full_rows = rows / 16 * 16;
  for (int64_t n = 0; n < full_rows; n += 16) {
    const int8_t* wn = w + n * K;
    switch (M) {
      case 4: row_lanes_tile<4, B>(x_q, d_x, code_sums, wn, dwt + n, ldd, K, blocks, out + n, ldo); break;
      case 5: row_lanes_tile<5, B>(x_q, d_x, code_sums, wn, dwt + n, ldd, K, blocks, out + n, ldo); break;
      case 6: row_lanes_tile<6, B>(x_q, d_x, code_sums, wn, dwt + n, ldd, K, blocks, out + n, ldo); break;
      default: row_lanes_tile<7, B>(x_q, d_x, code_sums, wn, dwt + n, ldd, K, blocks, out + n, ldo); break;
    }
  }
  return full_rows;
}

using RowLanesGemm = int64_t (*)(const int8_t*, const float*, const int32_t*, const int8_t*, const float*, int64_t,
                                 int64_t, int64_t, int64_t, int64_t, float*, int64_t);

inline RowLanesGemm row_lanes_gemm(int64_t B) {
  return B == 32 ? row_lanes_gemm_block<32> : B == 64 ? row_lanes_gemm_block<64> : row_lanes_gemm_block<128>;
}

// c[j][16v + l] (+)= the block-scaled products of V packed tiles' rows (signed codes) with NB rows of w_u8 = W_q + 128
// (stride ldw) over blocks [b0, b1), whose columns start at k_base in w_u8. vpdpbusd sums (w + 128) x = w x + 128 x,
// so each block's sum starts at -128 * the block's code sum of each activation row (off) and comes out exact.
// dxp, off: the tiles' d_x and offsets, [tile][block][16]; dw: the weight rows' d_w, [row][block].
// The fp32 sums stay in registers beside the int32 sums, at most 3 x 4 of each (Ice Lake Xeon, one core, operands in
// L1, B = 32: 0.52 of vpdpbusd's peak; 2 x 8 tiles summing in memory 0.36, or 0.54 in a buffer of their own, which
// measured slower as a whole GEMM). Each block costs a conversion, a multiply and a fused multiply-add per 8 * B / 32
// vpdpbusd, where the integer tiles of cpu_linear_kernels.h reach 0.77-0.85 of the peak.
template <int V, int NB, int B>
inline void packed_tile(const int8_t* x, int64_t tile_bytes, const float* dxp, const int32_t* off, const uint8_t* w_u8,
                        int64_t ldw, int64_t k_base, const float* dw, int64_t blocks, int64_t b0, int64_t b1,
                        int64_t k32, float* c, int64_t ldc, bool add) {
  __m512 sum[NB][V];
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < V; ++v) sum[j][v] = add ? _mm512_loadu_ps(c + j * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t k0 = b * B, steps = std::min<int64_t>(B, k32 - k0) / 4;
    __m512i dot[NB][V];
    for (int v = 0; v < V; ++v) {
      const __m512i start = _mm512_loadu_si512(off + (v * blocks + b) * 16);
      for (int j = 0; j < NB; ++j) dot[j][v] = start;
    }
    const auto step = [&](int64_t k) {
      __m512i xv[V];
      for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_si512(x + v * tile_bytes + k * 16);
      for (int j = 0; j < NB; ++j) {
        int32_t quad;
        std::memcpy(&quad, w_u8 + j * ldw + (k - k_base), 4);
        const __m512i wv = _mm512_set1_epi32(quad);
        for (int v = 0; v < V; ++v) dot[j][v] = vnni::dpbusd(dot[j][v], wv, xv[v]);
      }
    };
    if (steps == B / 4) {
#pragma GCC unroll 8
      for (int s = 0; s < B / 4; ++s) step(k0 + 4 * s);
    } else {
      for (int64_t s = 0; s < steps; ++s) step(k0 + 4 * s);
    }
    for (int v = 0; v < V; ++v) {
      const __m512 dxv = _mm512_loadu_ps(dxp + (v * blocks + b) * 16);
      for (int j = 0; j < NB; ++j)
        sum[j][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[j][v]), _mm512_mul_ps(dxv, _mm512_set1_ps(dw[j * blocks + b])),
                                    sum[j][v]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + j * ldc + 16 * v, sum[j][v]);
}

// Columns per pass: 3 packed tiles' codes over them (24 KB) stay in L1 while the row block's weight rows pass (a
// multiple of every B)
constexpr int64_t PACKED_KC = 512;

// out[m, j] = the block-scaled product over the first K / 32 * 32 columns of the M rows of `packed` (vnni::pack_rows
// with flip 0; their d_x in dxp, offsets in off) and the `rows` (at most NC) weight rows at w; out has room for M
// rounded up to 16 rows. Scratch: c of NC x (M rounded up to 16) floats, w_u8 of NC x PACKED_KC bytes.
template <int B>
__attribute__((noinline)) void packed_gemm_block(const int8_t* packed, const float* dxp, const int32_t* off,
                                                 const int8_t* w, const float* dw, int64_t M, int64_t K, int64_t blocks,
                                                 int64_t rows, float* c, uint8_t* w_u8, float* out, int64_t ldo) {
  constexpr int NB = 4;
  const int64_t tiles = (M + 15) / 16, ldc = tiles * 16, tile_bytes = K / 4 * 64, k32 = K / 32 * 32;
  const int64_t full_blocks = blocks::block_count(k32, B), blocks_per_pass = PACKED_KC / B;
  const __m512i top_bits = _mm512_set1_epi8(char(0x80));
  for (int64_t b0 = 0; b0 < full_blocks; b0 += blocks_per_pass) {
    const int64_t b1 = std::min(b0 + blocks_per_pass, full_blocks), k0 = b0 * B, k1 = std::min(b1 * B, k32);
    for (int64_t j = 0; j < rows; ++j)  // this pass's columns of the weight rows as W_q + 128, once for every tile
      for (int64_t k = k0; k < k1; k += 32)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w_u8 + j * PACKED_KC + (k - k0)),
                            _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + k)),
                                             _mm512_castsi512_si256(top_bits)));
    for (int64_t t = 0; t < tiles;) {  // 3 tiles at a time; 2 where 2 or 4 are left, 1 where 1 is
      const int64_t left = tiles - t, v = left == 1 ? 1 : left == 2 || left == 4 ? 2 : 3;
      const int8_t* x = packed + t * tile_bytes;
      const float* dx = dxp + t * blocks * 16;
      const int32_t* o = off + t * blocks * 16;
      float* ct = c + t * 16;
      int64_t j = 0;  // a single tile takes twice the weight rows: as many sums as two tiles
      if (v == 3)
        for (; j + NB <= rows; j += NB)
          packed_tile<3, NB, B>(x, tile_bytes, dx, o, w_u8 + j * PACKED_KC, PACKED_KC, k0, dw + j * blocks, blocks, b0, b1, k32, ct + j * ldc, ldc, b0 > 0);
      else if (v == 2)
        for (; j + NB <= rows; j += NB)
          packed_tile<2, NB, B>(x, tile_bytes, dx, o, w_u8 + j * PACKED_KC, PACKED_KC, k0, dw + j * blocks, blocks, b0, b1, k32, ct + j * ldc, ldc, b0 > 0);
      else
        for (; j + 2 * NB <= rows; j += 2 * NB)
          packed_tile<1, 2 * NB, B>(x, tile_bytes, dx, o, w_u8 + j * PACKED_KC, PACKED_KC, k0, dw + j * blocks, blocks, b0, b1, k32, ct + j * ldc, ldc, b0 > 0);
      for (; j < rows; ++j) {
        if (v == 3) packed_tile<3, 1, B>(x, tile_bytes, dx, o, w_u8 + j * PACKED_KC, PACKED_KC, k0, dw + j * blocks, blocks, b0, b1, k32, ct + j * ldc, ldc, b0 > 0);
        else if (v == 2) packed_tile<2, 1, B>(x, tile_bytes, dx, o, w_u8 + j * PACKED_KC, PACKED_KC, k0, dw + j * blocks, blocks, b0, b1, k32, ct + j * ldc, ldc, b0 > 0);
        else packed_tile<1, 1, B>(x, tile_bytes, dx, o, w_u8 + j * PACKED_KC, PACKED_KC, k0, dw + j * blocks, blocks, b0, b1, k32, ct + j * ldc, ldc, b0 > 0);
      }
      t += v;
    }
  }
  const int64_t rows16 = (rows + 15) / 16 * 16;
  if (full_blocks == 0 || rows < rows16) std::fill(c + (full_blocks == 0 ? 0 : rows) * ldc, c + rows16 * ldc, 0.0f);
  const uint32_t zeros[16] = {};
  for (int64_t j = 0; j < rows16; j += 16)  // [row][activation row] to [activation row][row], as bits
    for (int64_t t = 0; t < tiles; ++t)
      vnni::transpose_minus(reinterpret_cast<const int32_t*>(c + j * ldc + t * 16), ldc, zeros,
                            reinterpret_cast<int32_t*>(out + t * 16 * ldo + j), ldo);
}

using PackedGemm = void (*)(const int8_t*, const float*, const int32_t*, const int8_t*, const float*, int64_t, int64_t,
                           int64_t, int64_t, float*, uint8_t*, float*, int64_t);

inline PackedGemm packed_gemm(int64_t B) {
  return B == 32 ? packed_gemm_block<32> : B == 64 ? packed_gemm_block<64> : packed_gemm_block<128>;
}

}  // namespace vnni_blocks

#pragma GCC pop_options

// ---- AMX: int8 tile products per block --------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

namespace amx_blocks {

// sums[t][j] += float(c[t][j]) * (d_x of the 16 activation rows * d_w[j]) for each stored tile t = 2 tn + tm (weight
// rows n + 16 tn + j of dw's [row][block], activation tile tm of dxp's [tile][block][16]) of block b
inline void scale_add(const int32_t* c, const float* dxp, const float* dw, int64_t blocks, int64_t b, int tiles_n,
                      int tiles_m, float* sums) {
  for (int tm = 0; tm < tiles_m; ++tm) {
    const __m512 dxv = _mm512_loadu_ps(dxp + (tm * blocks + b) * 16);
    for (int tn = 0; tn < tiles_n; ++tn) {
      const int t = 2 * tn + tm;
      for (int j = 0; j < 16; ++j) {
        float* s = sums + (t * 16 + j) * 16;
        const __m512 products = _mm512_cvtepi32_ps(_mm512_load_si512(c + (t * 16 + j) * 16));
        _mm512_store_ps(s, _mm512_fmadd_ps(products, _mm512_mul_ps(dxv, _mm512_set1_ps(dw[(16 * tn + j) * blocks + b])),
                                           _mm512_load_ps(s)));
      }
    }
  }
}

// out[m, j] = the block-scaled product over the first K / 32 * 32 columns of the M activation rows (pack_b_tiles with
// 32-column steps: `halves`; their d_x in dxp, [tile][block][16]) and the first rows / 16 * 16 weight rows at w (their
// d_w in dw, [row][block]); returns how many rows that is. Each block's products are stored and scaled before the next
// block's: on the Xeon with AMX, tile products, tile stores and the AVX-512 scaling take turns whatever the order (a
// 16 x 16 tile of a 32-column block: product 5 ns, store 5 ns, scaling its 16 rows 10-15 ns; storing one block's tiles
// while the next block's were multiplied measured no faster), so the fp32 steps, not the tile unit, set the pace.
template <int B, int K_STEP>
int64_t gemm_block(const int8_t* halves, const float* dxp, const int8_t* w, const float* dw, int64_t M, int64_t K,
                   int64_t blocks, int64_t rows, float* out, int64_t ldo) {
  const int64_t k32 = K / 32 * 32, m_tiles = (M + 15) / 16, full_rows = rows / 16 * 16, halves_per_tile = k32 / 32;
  const int64_t full_blocks = blocks::block_count(k32, B);
  if (full_rows == 0 || full_blocks == 0) return 0;
  amx::configure(K_STEP);
  alignas(64) int32_t c[4 * 256];  // [tile][weight row][activation row]
  alignas(64) float sums[4 * 256];
  for (int64_t n = 0; n < full_rows; n += 32) {
    const bool two_n = n + 32 <= full_rows;
    const int8_t* wn = w + n * K;
    for (int64_t mt = 0; mt < m_tiles; mt += 2) {
      const bool two_m = mt + 1 < m_tiles;
      const int8_t* b0 = halves + mt * halves_per_tile * 512;
      const int8_t* b1 = b0 + halves_per_tile * 512;
      std::fill(sums, sums + 4 * 256, 0.0f);
      for (int64_t b = 0; b < full_blocks; ++b) {
        const int64_t k0 = b * B, k1 = std::min(k0 + B, k32);
        if (two_n && two_m) amx::tiles<true, true, K_STEP>(wn, K, b0, b1, k0, k1, c);
        else if (two_n) amx::tiles<true, false, K_STEP>(wn, K, b0, b1, k0, k1, c);
        else if (two_m) amx::tiles<false, true, K_STEP>(wn, K, b0, b1, k0, k1, c);
        else amx::tiles<false, false, K_STEP>(wn, K, b0, b1, k0, k1, c);
        scale_add(c, dxp + mt * blocks * 16, dw + n * blocks, blocks, b, two_n ? 2 : 1, two_m ? 2 : 1, sums);
      }
      for (int tn = 0; tn < (two_n ? 2 : 1); ++tn)
        for (int tm = 0; tm < (two_m ? 2 : 1); ++tm) {
          const float* tile = sums + (2 * tn + tm) * 256;
          const int64_t m0 = (mt + tm) * 16, n0 = n + tn * 16;
          for (int64_t i = 0; i < 16 && m0 + i < M; ++i)
            for (int64_t j = 0; j < 16; ++j) out[(m0 + i) * ldo + n0 + j] = tile[j * 16 + i];
        }
    }
  }
  _tile_release();
  return full_rows;
}

using Gemm = int64_t (*)(const int8_t*, const float*, const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                         float*, int64_t);

// The block products are amx::tiles with K_STEP-column A and B tiles (amx::configure(K_STEP)), one block at a time (16
// weight rows x 16 activation rows, int32, exact). A tile product costs the same whether it multiplies 32 or 64
// columns (a 32-column one does half the work: 1.5 against 3.1 T multiply-adds/s on one core of the Xeon with AMX), so
// the steps are 64 columns where every block is whole 64-column steps (blocks of 64 or 128 and K / 32 * 32 a multiple
// of 64), else 32
inline Gemm gemm(int64_t B, int64_t K) {
  const bool steps_64 = B >= 64 && (K / 32 * 32) % 64 == 0;
  return B == 32 ? gemm_block<32, 32>
         : B == 64 ? (steps_64 ? gemm_block<64, 64> : gemm_block<64, 32>)
                   : (steps_64 ? gemm_block<128, 64> : gemm_block<128, 32>);
}

}  // namespace amx_blocks

#pragma GCC pop_options

namespace blocks {

// The whole block-scaled linear (steps 1-3) for `count` weights that multiply the same activation (q, k and v, say):
// X is quantized once and one parallel loop goes over the row blocks of all of them, so a group costs one call's
// fixed costs. Each output is what a call with its weight alone gives, bit for bit. `kernel`: kernel_for's.
inline void linear(const BlockActivation& a, const BlockWeight* weights, int64_t count, Kernel kernel) {
  const int64_t M = a.M, K = a.K, B = a.block_size, blocks = block_count(K, B), k32 = K / 32 * 32;
  const float limit = a.threshold > 0 ? a.threshold : INFINITY;
  const bool amx = kernel == Kernel::Amx && M >= AMX_MIN_ROWS, vnni = kernel != Kernel::Avx2 && !amx;
  const bool packed = vnni && M >= PACKED_MIN_ROWS, vnni_dots = vnni && !packed;
  const bool row_lanes = vnni_dots && M >= vnni_blocks::ROW_LANES_MIN_ROWS;
  const bool tiled = packed || amx;  // d_x by 16-row tiles, [tile][block][16]
  const int64_t tiles = (M + 15) / 16;
  const int64_t packed_bytes = packed ? tiles * 16 * (K / 4 * 4) : amx ? tiles * 16 * k32 : 0;
  const int64_t lanes = vnni_dots ? M * ((k32 + 63) / 64) * 16 : 0;  // lane_offsets' int32
  // the row blocks of all the weights, in order: row block r is rows [n0, n0 + NC) of weight row_weight[r]
  int64_t row_blocks = 0;
  for (int64_t i = 0; i < count; ++i) row_blocks += (weights[i].N + NC - 1) / NC;
  Scratch scratch(K * (1 + 4 + 4) + M * blocks * 4 * (packed || row_lanes ? 2 : 1) + M * K + packed_bytes +
                      (tiled ? tiles * 16 * blocks * 8 : 0) + lanes * 4 + row_blocks * 16,
                  0);
  uint8_t* is_outlier = scratch.take<uint8_t>(K);
  uint32_t* keep = scratch.take<uint32_t>(K);
  float* d_x = scratch.take<float>(M * blocks);
  int8_t* x_q = scratch.take<int8_t>(M * K);
  int32_t* code_sums = packed || row_lanes ? scratch.take<int32_t>(M * blocks) : nullptr;
  int64_t* row_weight = scratch.take<int64_t>(row_blocks);
  int64_t* row_start = scratch.take<int64_t>(row_blocks);
  for (int64_t i = 0, r = 0; i < count; ++i)
    for (int64_t n0 = 0; n0 < weights[i].N; n0 += NC, ++r) row_weight[r] = i, row_start[r] = n0;
  outlier_mask(a.x, a.x_dtype, M, K, limit, is_outlier, keep);
  quantize(a.x, a.x_dtype, M, K, B, is_outlier, keep, d_x, x_q, code_sums);
  int8_t* x_packed = tiled ? scratch.take<int8_t>(packed_bytes) : nullptr;
  float* dxp = tiled ? scratch.take<float>(tiles * 16 * blocks) : nullptr;
  int32_t* off = packed ? scratch.take<int32_t>(tiles * 16 * blocks) : nullptr;
  if (packed) vnni::pack_rows(x_q, M, K, reinterpret_cast<uint8_t*>(x_packed), 0);
  if (amx) pack_b_tiles(x_q, M, K, 32, x_packed);  // K / 32 tiles of 32 columns
  for (int64_t t = 0; tiled && t < tiles; ++t)  // [tile][block][16 rows], 0 past M
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t m = t * 16 + r;
        dxp[(t * blocks + b) * 16 + r] = m < M ? d_x[m * blocks + b] : 0.0f;
        if (packed) off[(t * blocks + b) * 16 + r] = m < M ? -128 * code_sums[m * blocks + b] : 0;
      }
  int32_t* lane_off = vnni_dots ? scratch.take<int32_t>(lanes) : nullptr;
  if (vnni_dots) vnni_blocks::lane_offsets(x_q, M, K, lane_off);
  int32_t* cols = scratch.take<int32_t>(K);
  const int64_t n_cols = outlier_list(is_outlier, K, cols);
  const std::vector<float> x_o = outlier_values(a.x, a.x_dtype, M, K, cols, n_cols);
  // Activation rows go a chunk at a time (a multiple of 16 rows), so that the chunk's codes stay in L2 while every
  // block of weight rows passes
  const int64_t m_chunk = std::min(M, std::max<int64_t>(32, CHUNK_BYTES / std::max<int64_t>(K, 1) / 32 * 32));
#pragma omp parallel
  {
    const int64_t m_chunk16 = (m_chunk + 15) / 16 * 16;
    Scratch block_scratch(m_chunk16 * NC * 4 * (packed ? 2 : 1) + (packed ? NC * vnni_blocks::PACKED_KC : 0) +
                          NC * blocks * 4 * (row_lanes ? 2 : 1) + (vnni ? 0 : 12 * blocks * 4) +
                          m_chunk * NC * 4 * (n_cols ? 1 : 0) + std::min(n_cols, OUTLIER_CHUNK) * NC * 4,
                          1);
    float* acc = block_scratch.take<float>(m_chunk16 * NC);
    float* c = block_scratch.take<float>(packed ? m_chunk16 * NC : 0);
    uint8_t* w_u8 = block_scratch.take<uint8_t>(packed ? NC * vnni_blocks::PACKED_KC : 0);
    float* dw = block_scratch.take<float>(NC * blocks);
    float* dwt = block_scratch.take<float>(row_lanes ? NC * blocks : 0);  // d_w transposed, [block][NC]
    float* scale = block_scratch.take<float>(vnni ? 0 : 12 * blocks);
    float* outliers = block_scratch.take<float>(n_cols ? m_chunk * NC : 0);
    float* w_o = block_scratch.take<float>(std::min(n_cols, OUTLIER_CHUNK) * NC);
    for (int64_t m0 = 0; m0 < M; m0 += m_chunk) {
      const int64_t mc = std::min(m_chunk, M - m0);
#pragma omp for schedule(static)
      for (int64_t rb = 0; rb < row_blocks; ++rb) {
        const BlockWeight& p = weights[row_weight[rb]];
        const int64_t N = p.N, n0 = row_start[rb], rows = std::min(N, n0 + NC) - n0;
        const int8_t* w = p.w + n0 * K;
        bf16_to_float(p.d_w + n0 * blocks, rows * blocks, dw);
        if (row_lanes) vnni_blocks::transpose_scales(dw, rows, blocks, dwt, NC);
        if (amx) {  // whole 16-row groups by tiles, the rest by dot products
          const int64_t done = amx_blocks::gemm(B, K)(x_packed + m0 * k32, dxp + m0 / 16 * blocks * 16, w, dw, mc, K,
                                                      blocks, rows, acc, NC);
          if (done < rows)
            dot_gemm_block(x_q + m0 * K, d_x + m0 * blocks, w + done * K, dw + done * blocks, mc, K, blocks, B,
                           rows - done, scale, acc + done, NC);
        } else if (packed)
          vnni_blocks::packed_gemm(B)(x_packed + m0 * (K / 4 * 4), dxp + m0 / 16 * blocks * 16,
                                      off + m0 / 16 * blocks * 16, w, dw, mc, K, blocks, rows, c, w_u8, acc, NC);
        else if (vnni_dots) {  // one chunk (M < PACKED_MIN_ROWS): 16-row groups by row lanes, the rest by dots
          const int64_t done =
              row_lanes ? vnni_blocks::row_lanes_gemm(B)(x_q, d_x, code_sums, w, dwt, NC, mc, K, blocks, rows, acc, NC)
                        : 0;
          if (done < rows)
            vnni_blocks::dot_gemm(B)(x_q, d_x, lane_off, w + done * K, dw + done * blocks, mc, K, blocks, rows - done,
                                     acc + done, NC);
        } else
          dot_gemm_block(x_q + m0 * K, d_x + m0 * blocks, w, dw, mc, K, blocks, B, rows, scale, acc, NC);
        if (k32 < K)  // the last K % 32 columns, all in the last block
          for (int64_t m = 0; m < mc; ++m)
            for (int64_t n = 0; n < rows; ++n) {
              int32_t sum = 0;
              for (int64_t k = k32; k < K; ++k) sum += int32_t(x_q[(m0 + m) * K + k]) * int32_t(w[n * K + k]);
              acc[m * NC + n] += float(sum) * (d_x[(m0 + m) * blocks + blocks - 1] * dw[n * blocks + blocks - 1]);
            }
        if (n_cols) {
          const OutlierWeight outlier_weight{p.w, nullptr, 0, p.d_w, blocks, B};
          (kernel == Kernel::Avx2 ? outlier_block : vnni::outlier_block)(x_o.data() + m0 * n_cols, cols, n_cols,
                                                                          outlier_weight, n0, outliers, mc, K, rows, w_o);
        }
        float b_n[NC] = {};
        for (int64_t n = 0; p.bias && n < rows; ++n) b_n[n] = load(p.bias, n0 + n, p.bias_dtype);
        for (int64_t m = 0; m < mc; ++m) {  // the reference's order: int8 part + outlier product + b
          float* value = acc + m * NC;
          for (int64_t n = 0; n < NC; n += 8) {
            __m256 v = _mm256_loadu_ps(value + n);
            if (n_cols) v = _mm256_add_ps(v, _mm256_loadu_ps(outliers + m * NC + n));
            if (p.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(b_n + n));
            _mm256_storeu_ps(value + n, v);
          }
          store_row(p.y, (m0 + m) * N + n0, value, rows, a.x_dtype);
        }
      }
    }
  }
}

}  // namespace blocks
}  // namespace int8pass
