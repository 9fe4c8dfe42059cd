// The CPU kernels of llmint8::cpu_linear (cpu_linear.cpp registers the op): all of docs/design.md §1 for X [M, K]
// and the dense row-major int8 codes W_q [N, K] (bitsandbytes' CB), on raw pointers. For x86-64 CPUs with AVX2,
// which the whole file is built for; the AVX512-VNNI and AMX kernels sit in regions built for those and run only
// where the CPU has them (kernel_for).
//
// One call:
//   1. the outlier columns O: those where some |x| is not below the threshold (NaN and Inf included);
//   2. per row, s_x = max |x| over the other columns, and X_q = round(x / s_x * 127) there (0 in O);
//   3. the exact int32 product X_q . W_q^T, and the fp32 product X[:, O] . W^[:, O]^T;
//   4. the epilogue acc * (s_x * (s_w / 127^2)) + outliers * (s_w / 127) + b, rounded once to X's dtype.
// Steps 3 and 4 go a block of NC weight rows at a time (each thread takes whole blocks), so the weight is streamed
// from memory once and nothing of size [M, N] is written but the output. The floating-point steps are those of the
// reference (int8pass/reference.py) in the same order; the file is built with -ffp-contract=off so none is fused.
//
// The int8 GEMM, by instruction set; each is exact, and each reads W_q as it is stored (no packed copy):
//   AVX2:        vpmaddubsw multiplies u8 x s8 and adds pairs into a *saturating* int16. Fed |w| (at most 128, as
//                u8) and x carrying w's sign (vpsignb; |x_q| <= 127), a pair is at most 2 * 128 * 127 < 2^15, so it
//                never saturates; vpmaddwd widens to int32. Tiles of 3 activation rows x 4 weight rows.
//   AVX512-VNNI: vpdpbusd adds four u8 x s8 products into int32 without saturating. Fed X_q + 128 (u8) and W_q,
//                it sums X_q . w + 128 * sum(w); sum(w) comes from the same instruction on a vector of ones and is
//                taken off at the end (int32 arithmetic modulo 2^32, exact since the result fits). Up to 4 rows,
//                dot products along K: tiles of up to 4 activation rows x 4 weight rows (for one activation row, a
//                weight row at a time: the weight stream is what counts), masked loads for the K tail. From 5 to 16
//                rows, X_q is packed 4 rows to a vector and each instruction takes 16 codes of one weight row
//                broadcast to the 4 rows' lanes. From 17 rows, X_q is packed in 16-row tiles and each instruction
//                takes 4 codes of one weight row broadcast: 16 outputs at once, no horizontal sums. The weight is
//                always read as it is stored.
//   AMX:         tdpbssd multiplies s8 x s8 tiles into int32 tiles. The weight is tile A as it is stored (16 rows of
//                64 codes, stride K); X_q, repacked once per call into tile B's layout (16 columns of 4 codes per
//                row), is tile B; so C = W_q . X_q^T, 2 x 2 tiles of 16 x 16 at a time. Rows beyond the last full
//                16 and columns beyond the last full 64 go through the VNNI kernel.
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace int8pass {

constexpr int64_t KC = 4096;  // columns per block: NC rows of KC int8 stay in L2 while all activation rows pass
constexpr int64_t NC = 64;    // weight rows per block (a multiple of the AMX kernel's 32)
constexpr float Q_MAX = 127.0f;
// Activation codes per chunk of rows (linear): they stay in L2 while the weight passes. The VNNI kernel's packed
// tiles take KC columns of 3 tiles at a time (vnni::PACKED_KC), which stay in L1 whatever the chunk, so its chunks are
// larger: the weight is streamed from memory once per chunk (Ice Lake Xeon, 4096 x 14336 at 512 rows: 102 ms in
// chunks of 64 rows, 62 in one)
constexpr int64_t CHUNK_BYTES = int64_t(1) << 20;
constexpr int64_t PACKED_CHUNK_BYTES = int64_t(1) << 23;
// Work below this many elements runs on the calling thread: waking the others costs more
constexpr int64_t PARALLEL_MIN_ELEMENTS = int64_t(1) << 16;

enum Dtype : int { F32 = 0, BF16 = 1, F16 = 2 };

// The GEMMs, fastest last. kernel_for picks the fastest the CPU has for a call.
enum class Kernel : int { Avx2 = 0, Avx512Vnni = 1, Amx = 2 };

inline const char* kernel_name(Kernel kernel) {
  switch (kernel) {
    case Kernel::Avx2: return "avx2";
    case Kernel::Avx512Vnni: return "avx512_vnni";
    default: return "amx";
  }
}

// ---- what the CPU has -------------------------------------------------------------------------------------------

inline uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

inline void cpuid(uint32_t leaf, uint32_t subleaf, uint32_t regs[4]) {
  __asm__ volatile("cpuid" : "=a"(regs[0]), "=b"(regs[1]), "=c"(regs[2]), "=d"(regs[3]) : "a"(leaf), "c"(subleaf));
}

// The fastest kernel this CPU and OS support (AMX needs the OS to give this process the tile state).
inline Kernel best_supported_kernel() {
  static const Kernel best = [] {
    uint32_t r[4];
    cpuid(1, 0, r);
    const bool osxsave = r[2] & (1u << 27);
    const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    cpuid(7, 0, r);
    const bool zmm_state = (xcr0 & 0xE6) == 0xE6;  // SSE, AVX, opmask, ZMM upper halves, ZMM16-31
    const bool vnni = zmm_state && (r[1] & (1u << 16)) && (r[1] & (1u << 30)) && (r[1] & (1u << 31)) &&
                      (r[2] & (1u << 11));  // AVX512F, BW, VL, VNNI
    const bool amx_cpu = (r[3] & (1u << 24)) && (r[3] & (1u << 25));  // AMX-TILE, AMX-INT8
    // Linux grants the tile data state per process on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    const bool amx = vnni && amx_cpu && syscall(SYS_arch_prctl, 0x1023, 18) == 0 && (xgetbv0() & 0x60000) == 0x60000;
    return amx ? Kernel::Amx : vnni ? Kernel::Avx512Vnni : Kernel::Avx2;
  }();
  return best;
}

// Whether the decode kernel collects the outlier columns' codes with vpcompressb (vbmi2::gemm_rows): the CPU has
// AVX512-VBMI2 and INT8PASS_CPU_VBMI2=0 does not turn it off (to compare the paths on one machine, as
// INT8PASS_CPU_KERNEL does for the GEMMs; read at every call)
inline bool uses_vbmi2() {
  static const bool vbmi2 = [] {
    uint32_t r[4];
    cpuid(7, 0, r);
    return best_supported_kernel() != Kernel::Avx2 && (r[2] & (1u << 6));
  }();
  const char* off = std::getenv("INT8PASS_CPU_VBMI2");
  return vbmi2 && !(off != nullptr && std::string(off) == "0");
}

// INT8PASS_CPU_KERNEL=avx2|avx512_vnni caps the choice (to measure or compare the paths on one machine), as
// ATEN_CPU_CAPABILITY does for ATen's kernels; it is read at every call.
inline Kernel kernel_cap() {
  const char* cap = std::getenv("INT8PASS_CPU_KERNEL");
  if (cap == nullptr) return Kernel::Amx;
  const std::string name(cap);
  return name == "avx2" ? Kernel::Avx2 : name == "avx512_vnni" ? Kernel::Avx512Vnni : Kernel::Amx;
}

// AMX tiles hold 16 activation rows, and from 5 rows up they beat the VNNI kernel even when mostly padding; below
// that, the VNNI kernel's dot products read the weight faster, and they collect the outlier columns' codes as they go
// (AMX tiles load the weight past the registers: its outlier codes are gathered again). Measured, the op with 0.5%
// outlier columns, 2 threads, four shapes, on the second AMX Xeon: at 4 rows VNNI took 0.89-0.92x AMX's time
// (0.88-0.97x with no outliers), at 5 rows 1.09-1.23x. (An Emerald Rapids Xeon, kernel against kernel before the
// collection: at 4 rows AMX took 0.77-0.95x VNNI's time, at 1-3 rows 1.04-1.55x.)
constexpr int64_t AMX_MIN_ROWS = 5;

inline Kernel kernel_for(int64_t M, int64_t K) {
  Kernel kernel = std::min(best_supported_kernel(), kernel_cap());
  if (kernel == Kernel::Amx && (M < AMX_MIN_ROWS || K < 64)) kernel = Kernel::Avx512Vnni;
  return kernel;
}

// ---- loads and stores in the activation dtype -------------------------------------------------------------------

inline float bf16_value(uint16_t bits) {  // the high half of a float
  const uint32_t word = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

inline float load(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case F32: return static_cast<const float*>(p)[i];
    case BF16: return bf16_value(static_cast<const uint16_t*>(p)[i]);
    default: return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
  }
}

inline void store(void* p, int64_t i, float value, int dtype) {
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
inline __m256 load8(const void* p, int64_t i, int dtype) {
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
inline void store8(void* p, int64_t i, __m256 v, int dtype) {
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

// count fp32 values into p from offset i in dtype, 8 at a time, then one by one
inline void store_row(void* p, int64_t i, const float* values, int64_t count, int dtype) {
  int64_t n = 0;
  for (; n + 8 <= count; n += 8) store8(p, i + n, _mm256_loadu_ps(values + n), dtype);
  for (; n < count; ++n) store(p, i + n, values[n], dtype);
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- AVX2 GEMM ----------------------------------------------------------------------------------------------------

namespace avx2 {

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
      if (MB == 1) _mm_prefetch(reinterpret_cast<const char*>(w + (j + NB) * ldw + k), _MM_HINT_T0);  // the next tile's rows
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
inline void gemm_block(const int8_t* x_q, const int8_t* w, int32_t* out, int64_t ldo, int64_t M, int64_t K,
                       int64_t rows) {
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

}  // namespace avx2

// ---- AVX512-VNNI GEMM ---------------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

namespace vnni {

// acc + in each int32 lane the sum of its four u8 x s8 products (vpdpbusd). Written as inline asm because GCC 12
// compiles the intrinsic, for accumulators held in arrays, with a register copy before and after each instruction,
// which the tiles' loops then spend their issue slots on (Ice Lake Xeon, one core, operands in L1: 4 x 4 dot-product
// tiles 2.2 G instructions/s against 3.0, 6 x 4 broadcast tiles 1.3 against 4.1).
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// offsets[j] = 128 * sum over k in [k0, k1) of w[j, k] for the `rows` weight rows at w: what multiplying x_u8 =
// x_q + 128 instead of x_q adds to row j's products, taken off at the end (int32 arithmetic modulo 2^32)
inline void code_offsets(const int8_t* w, int64_t ldw, int64_t rows, int64_t k0, int64_t k1, uint32_t* offsets) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t j = 0; j < rows; ++j) {
    __m512i sums = _mm512_setzero_si512();
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) sums = dpbusd(sums, ones, _mm512_loadu_si512(w + j * ldw + k));
    if (k < k1)
      sums = dpbusd(sums, ones, _mm512_maskz_loadu_epi8((__mmask64(1) << (k1 - k)) - 1, w + j * ldw + k));
    offsets[j] = 128u * uint32_t(_mm512_reduce_add_epi32(sums));
  }
}

// offsets[j] = 128 * sum over k in [0, k1) of the codes of weight row n0 + j, for the `rows` rows at w (row n0): from
// the weight's code sums (sum over all K columns, int32 [N]) less any columns from k1 on, or, without them (nullptr),
// summed here, a pass over the rows
inline void row_offsets(const int32_t* code_sums, const int8_t* w, int64_t K, int64_t n0, int64_t rows, int64_t k1,
                        uint32_t* offsets) {
  if (code_sums == nullptr) return code_offsets(w, K, rows, 0, k1, offsets);
  for (int64_t j = 0; j < rows; ++j) {
    uint32_t sum = uint32_t(code_sums[n0 + j]);
    for (int64_t k = k1; k < K; ++k) sum -= uint32_t(int32_t(w[j * K + k]));
    offsets[j] = 128u * sum;
  }
}

// out[i, j] += sum over k in [k0, k1) of x_u8[i, k] * w[j, k] for MB rows of x_u8 = x_q + 128 and NB rows of w, as
// dot products along k (modulo 2^32: gemm_block takes off 128 * sum(w) once all of k is in). The weight's code sums
// come with it, so a tile holds only its MB x NB sums: summing w here too took one more vpdpbusd per weight vector and
// spilled at 4 x 4 (Zen 4, 4096 x 4096 in L3: 1 x 4 tiles 0.19 ms against 0.14, 4 x 4 0.52 against 0.26).
// Decode streams the weight: each tile of up to STREAM_MAX_ROWS rows fetches the rows a tile or more ahead (PREFETCH_BYTES at
// least) into L2 at the columns it reads. Measured on a Zen 4 EPYC from memory, one core: 13-14 GB/s fetching into L1
// (T0), 20-22 into L2 (T1 or T2); 2 cores, 22-24 against 25-39, and on a 640-column weight 24 against 27 once it
// fetched 15 KB ahead rather than 2.5. On a Zen 5 EPYC, 1 x 4 tiles read a weight in L3 at 150-165 GB/s, 1 x 8 at
// 80-105.
constexpr int64_t PREFETCH_BYTES = 16384;
// Up to this many rows one tile covers them all, so the weight is streamed once (fetched ahead as above); beyond, the
// rows go 4 at a time over KC columns at a time, so that the block's columns stay in L2 between them.
constexpr int64_t STREAM_MAX_ROWS = 4;

template <int MB, int NB>
inline void tile(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int32_t* out, int64_t ldo,
                 int64_t k0, int64_t k1) {
  const int64_t ahead = NB * std::max<int64_t>(1, PREFETCH_BYTES / (NB * ldw)) * ldw;
  __m512i acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  int64_t k = k0;
  for (; k + 64 <= k1; k += 64) {
    __m512i xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_si512(x + i * ldx + k);
    for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_loadu_si512(w + j * ldw + k);
      if (MB <= STREAM_MAX_ROWS) _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + ahead + k), _MM_HINT_T1);
      for (int i = 0; i < MB; ++i) acc[i][j] = dpbusd(acc[i][j], xv[i], wv);
    }
  }
  if (k < k1) {  // the tail, zeros beyond it on both sides
    const __mmask64 mask = (__mmask64(1) << (k1 - k)) - 1;
    __m512i xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_maskz_loadu_epi8(mask, x + i * ldx + k);
    for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + j * ldw + k);
      for (int i = 0; i < MB; ++i) acc[i][j] = dpbusd(acc[i][j], xv[i], wv);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j)
      out[i * ldo + j] = int32_t(uint32_t(out[i * ldo + j]) + uint32_t(_mm512_reduce_add_epi32(acc[i][j])));
}

// out[j] (+)= sum over k in [k0, k1) of x_u8[k] * w[j, k] for one activation row: a weight row at a time, so the
// weight is read as one sequential stream (the rows are contiguous), with 4 sums along k to cover vpdpbusd's latency
// and the stream fetched PREFETCH_BYTES (or a row) ahead into L2. The 1 x 4 tiles read 4 rows a row apart at once;
// Zen 5 EPYC, one row, 2 threads, interleaved, two runs: from memory (distinct weights) 1.27-1.62x their rate in
// the first (4096 x 4096 31.0 -> 50.1 GB/s), 1.01-1.12x in the second; repeated calls of one weight 1.16-1.50x, then
// 0.98-1.06x. (The collecting kernel, vbmi2::gemm_rows, keeps 1 x 4 tiles: a row at a time with its compresses lost
// there on 640- and 2048-column weights, 0.80-0.85x.)
inline void stream_rows(const uint8_t* x, const int8_t* w, int32_t* out, int64_t K, int64_t rows, int64_t k0,
                        int64_t k1) {
  const int64_t ahead = std::max(PREFETCH_BYTES, K);
  for (int64_t j = 0; j < rows; ++j) {
    const int8_t* row = w + j * K;
    __m512i acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_setzero_si512();
    int64_t k = k0;
    for (; k + 256 <= k1; k += 256)
      for (int u = 0; u < 4; ++u) {
        _mm_prefetch(reinterpret_cast<const char*>(row + ahead + k + 64 * u), _MM_HINT_T1);
        acc[u] = dpbusd(acc[u], _mm512_loadu_si512(x + k + 64 * u), _mm512_loadu_si512(row + k + 64 * u));
      }
    for (; k + 64 <= k1; k += 64) acc[0] = dpbusd(acc[0], _mm512_loadu_si512(x + k), _mm512_loadu_si512(row + k));
    if (k < k1) {  // the tail, zeros beyond it on both sides
      const __mmask64 mask = (__mmask64(1) << (k1 - k)) - 1;
      acc[1] = dpbusd(acc[1], _mm512_maskz_loadu_epi8(mask, x + k), _mm512_maskz_loadu_epi8(mask, row + k));
    }
    const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3]));
    out[j] = int32_t(uint32_t(out[j]) + uint32_t(_mm512_reduce_add_epi32(sum)));
  }
}

template <int MB, int NB>
void row_block(const uint8_t* x, const int8_t* w, int32_t* out, int64_t ldo, int64_t K, int64_t rows, int64_t k0,
               int64_t k1) {
  int64_t n = 0;
  for (; n + NB <= rows; n += NB) tile<MB, NB>(x, K, w + n * K, K, out + n, ldo, k0, k1);
  for (; n < rows; ++n) tile<MB, 1>(x, K, w + n * K, K, out + n, ldo, k0, k1);
}

// out[m, j] (+)= sum over k in [k0, k1) of X_q[m, k] * w[j, k] for the `rows` (at most NC) weight rows at w, from
// x_u8 = X_q + 128 [M, K] and offsets[j] = 128 * the sum of w[j, k] over [k0, k1); `add` keeps what out holds (the AMX
// kernel's part). For few rows (decode, and AMX's tails).
__attribute__((noinline)) inline void gemm_block(const uint8_t* x_u8, const int8_t* w, int32_t* out, int64_t ldo,
                                                 int64_t M, int64_t K, int64_t rows, int64_t k0, int64_t k1,
                                                 bool add, const uint32_t* offsets) {
  if (!add)
    for (int64_t m = 0; m < M; ++m) std::fill(out + m * ldo, out + m * ldo + rows, 0);
  if (M <= STREAM_MAX_ROWS) {  // the weight streamed once over all of k
    if (M == 1) stream_rows(x_u8, w, out, K, rows, k0, k1);
    else if (M == 2) row_block<2, 6>(x_u8, w, out, ldo, K, rows, k0, k1);
    else if (M == 3) row_block<3, 4>(x_u8, w, out, ldo, K, rows, k0, k1);
    else row_block<4, 4>(x_u8, w, out, ldo, K, rows, k0, k1);
  } else {
    for (int64_t kc = k0; kc < k1; kc += KC) {
      const int64_t kc_end = std::min(kc + KC, k1);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) row_block<4, 4>(x_u8 + m * K, w, out + m * ldo, ldo, K, rows, kc, kc_end);
      switch (M - m) {
        case 3: row_block<3, 4>(x_u8 + m * K, w, out + m * ldo, ldo, K, rows, kc, kc_end); break;
        case 2: row_block<2, 6>(x_u8 + m * K, w, out + m * ldo, ldo, K, rows, kc, kc_end); break;
        case 1: row_block<1, 8>(x_u8 + m * K, w, out + m * ldo, ldo, K, rows, kc, kc_end); break;
        default: break;
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < rows; ++j) out[m * ldo + j] = int32_t(uint32_t(out[m * ldo + j]) - offsets[j]);
}

// ---- the same GEMM from 16 activation rows at a time, for prefill (more than QUAD_MAX_ROWS rows) --------------------
// Each zmm holds 4 consecutive codes of 16 activation rows (X_q + 128, packed once per call by pack_rows), and one
// vpdpbusd multiplies it by 4 codes of one weight row broadcast to every lane: 16 outputs per instruction with no
// horizontal sums, and the weight read as it is stored. (The dot products above spend a reduction per output and
// reach about a third of the instruction's throughput at these sizes.)

// From 5 rows the dot products lose to packed rows: up to QUAD_MAX_ROWS rows packed 4 to a vector (quad_gemm_block,
// below; Ice Lake Xeon, op time against the dot products at 5-11 rows 1.0-1.11x, against one 16-row tile at 12-16 rows
// 1.2-1.7x), beyond that 16 to a vector (Zen 4, 4096 x 4096 at 16 rows: 1.12 ms against the dot products' 1.44).
constexpr int64_t PACKED_MIN_ROWS = 5;
constexpr int64_t QUAD_MAX_ROWS = 16;
constexpr int64_t PACKED_KC = 512;  // columns per pass: 48 packed rows of them (24 KB) stay in L1 while 64 weight rows pass
constexpr int64_t PACKED_PREFETCH_LINES = 4;  // how far ahead each weight row is fetched

// X_q [M, K] as 16-row tiles of the first K / 4 * 4 columns: tile t holds, for each group of 4 columns, row 16t + r's
// 4 codes + 128 at dword r (rows past M hold code 0). flip = 0 packs the signed codes themselves (block mode).
inline void pack_rows(const int8_t* x_q, int64_t M, int64_t K, uint8_t* packed, uint32_t flip = 0x80808080u) {
  const int64_t tiles = (M + 15) / 16, groups = K / 4;
#pragma omp parallel for schedule(static) if (M * K >= PARALLEL_MIN_ELEMENTS)
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t r = 0; r < 16; ++r) {
      const int64_t m = t * 16 + r;
      uint32_t* dst = reinterpret_cast<uint32_t*>(packed + t * groups * 64) + r;
      for (int64_t g = 0; g < groups; ++g) {
        uint32_t quad = 0;
        if (m < M) std::memcpy(&quad, x_q + m * K + 4 * g, 4);
        dst[g * 16] = quad ^ flip;
      }
    }
}

// c[j][16v + l] (+)= products of V packed tiles' rows with NB weight rows over columns [k0, k1) (multiples of 4)
template <int V, int NB>
inline void packed_tile(const uint8_t* x, int64_t tile_bytes, const int8_t* w, int64_t K, int64_t k0, int64_t k1,
                        int32_t* c, int64_t ldc, bool add) {
  __m512i acc[NB][V];
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < V; ++v) acc[j][v] = add ? _mm512_loadu_si512(c + j * ldc + 16 * v) : _mm512_setzero_si512();
  for (int64_t k = k0; k < k1;) {
    const int64_t stop = std::min(k + 64, k1);
    // NB weight rows are read 4 bytes at a time, a line of each per 16 steps: fetch them ahead (measured alike with
    // and without on the Zen 5 EPYC, within its noise; kept for CPUs whose prefetchers track fewer streams)
    for (int j = 0; j < NB; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k + 64 * PACKED_PREFETCH_LINES), _MM_HINT_T0);
    for (; k < stop; k += 4) {
      __m512i xv[V];
      for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_si512(x + v * tile_bytes + k * 16);
      for (int j = 0; j < NB; ++j) {
        int32_t quad;
        std::memcpy(&quad, w + j * K + k, 4);
        const __m512i wv = _mm512_set1_epi32(quad);
        for (int v = 0; v < V; ++v) acc[j][v] = dpbusd(acc[j][v], xv[v], wv);
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < V; ++v) _mm512_storeu_si512(c + j * ldc + 16 * v, acc[j][v]);
}

// The 16 x 16 int32 transpose of r in registers: r[i] lane q becomes r[q] lane i
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // 32-bit pairs, 64-bit quads, then 128-bit lanes twice
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// the 16 x 16 int32 block at rows[i] (stride ld_in) minus offsets[i], transposed into out (stride ld_out)
inline void transpose_minus(const int32_t* in, int64_t ld_in, const uint32_t* offsets, int32_t* out, int64_t ld_out) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i)
    r[i] = _mm512_sub_epi32(_mm512_loadu_si512(in + i * ld_in), _mm512_set1_epi32(int32_t(offsets[i])));
  transpose16(r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + i * ld_out, r[i]);
}

// out[m, j] = X_q[m, :] . w[j, :] for the M rows of `packed` (pack_rows) and the `rows` (at most NC) weight rows at w,
// offsets[j] being 128 * the sum of w[j, k] over the first K / 4 * 4 columns (row_offsets); out has room for M rounded
// up to 16 rows and NC columns. `c` is scratch of NC x (M rounded up to 16) int32.
__attribute__((noinline)) inline void packed_gemm_block(const uint8_t* packed, const int8_t* x_q, const int8_t* w,
                                                        int32_t* out, int64_t ldo, int64_t M, int64_t K, int64_t rows,
                                                        const uint32_t* offsets, int32_t* c) {
  constexpr int NB = 8;  // 3 x 8 accumulators
  const int64_t tiles = (M + 15) / 16, ldc = tiles * 16, k4 = K / 4 * 4, tile_bytes = K / 4 * 64;
  const int64_t rows16 = (rows + 15) / 16 * 16;
  uint32_t padded[NC] = {};  // transpose_minus takes 16 rows at a time
  std::copy(offsets, offsets + rows, padded);
  if (rows < rows16) std::fill(c + rows * ldc, c + rows16 * ldc, 0);
  for (int64_t kc = 0; kc < k4; kc += PACKED_KC) {
    const int64_t kc_end = std::min(kc + PACKED_KC, k4);
    for (int64_t t = 0; t < tiles;) {  // 3 tiles at a time; 2 where 2 or 4 are left, 1 where 1 is
      const int64_t left = tiles - t, v = left == 1 ? 1 : left == 2 || left == 4 ? 2 : 3;
      const uint8_t* x = packed + t * tile_bytes;
      int32_t* ct = c + t * 16;
      int64_t j = 0;
      for (; j + NB <= rows; j += NB) {
        int32_t* cj = ct + j * ldc;
        if (v == 3) packed_tile<3, NB>(x, tile_bytes, w + j * K, K, kc, kc_end, cj, ldc, kc > 0);
        else if (v == 2) packed_tile<2, NB>(x, tile_bytes, w + j * K, K, kc, kc_end, cj, ldc, kc > 0);
        else packed_tile<1, NB>(x, tile_bytes, w + j * K, K, kc, kc_end, cj, ldc, kc > 0);
      }
      for (; j < rows; ++j) {
        int32_t* cj = ct + j * ldc;
        if (v == 3) packed_tile<3, 1>(x, tile_bytes, w + j * K, K, kc, kc_end, cj, ldc, kc > 0);
        else if (v == 2) packed_tile<2, 1>(x, tile_bytes, w + j * K, K, kc, kc_end, cj, ldc, kc > 0);
        else packed_tile<1, 1>(x, tile_bytes, w + j * K, K, kc, kc_end, cj, ldc, kc > 0);
      }
      t += v;
    }
  }
  if (k4 == 0) std::fill(c, c + rows16 * ldc, 0);
  for (int64_t j = 0; j < rows16; j += 16)
    for (int64_t t = 0; t < tiles; ++t) transpose_minus(c + j * ldc + t * 16, ldc, padded + j, out + t * 16 * ldo + j, ldo);
  for (int64_t m = 0; m < M; ++m)  // the last K % 4 columns
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t k = k4; k < K; ++k) out[m * ldo + j] += int32_t(x_q[m * K + k]) * int32_t(w[j * K + k]);
}

// ---- 5 to 16 activation rows: 4 rows to a vector ------------------------------------------------------------------
// One 16-row tile of the packed GEMM above takes a broadcast load for every vpdpbusd, and is bound by the loads (Ice
// Lake Xeon, one core, in L1: 2.2 G instructions/s). Here a zmm holds 16 consecutive codes (+ 128) of 4 rows, one
// row to a 128-bit lane, and one vpdpbusd multiplies it by 16 codes of one weight row broadcast to the 4 lanes
// (vbroadcasti32x4): each dword sums 4 of a row's products, and a row's 4 dwords in a lane are added at the end.
// 4 x 6 tiles take 10 loads per 24 instructions (same machine: 3.4-3.9 G/s).
constexpr int64_t QUAD_KC = 1024;  // columns per pass: the 16 rows' codes (16 KB) stay in L1 while 64 weight rows pass

// X_q [M, K] (M <= 16) for quad_gemm_block, over the first K / 16 * 16 columns: for each 16 columns c and each group
// g of 4 rows, 64 bytes at (c * groups + g) * 64 whose 16 bytes at 16i are row 4g + i's codes + 128 (rows past M: 0)
inline void pack_row_quads(const int8_t* x_q, int64_t M, int64_t K, uint8_t* packed) {
  const int64_t groups = (M + 3) / 4, chunks = K / 16;
  const __m128i top_bits = _mm_set1_epi8(char(0x80));
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t m = 0; m < groups * 4; ++m) {
      const __m128i codes = m < M ? _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x_q + m * K + 16 * c)), top_bits)
                                  : _mm_setzero_si128();
      _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + (c * groups + m / 4) * 64 + m % 4 * 16), codes);
    }
}

// raw[j][g] (+)= the lane products of G row groups with NB weight rows over 16-column chunks [c0, c1)
template <int G, int NB>
inline void quad_tile(const uint8_t* x, const int8_t* w, int64_t K, int64_t c0, int64_t c1, int32_t* raw, bool add) {
  __m512i acc[NB * G];
  for (int a = 0; a < NB * G; ++a) acc[a] = add ? _mm512_loadu_si512(raw + 16 * a) : _mm512_setzero_si512();
  for (int64_t c = c0; c < c1;) {
    const int64_t stop = std::min(c + 4, c1);  // a line of each weight row
    for (int j = 0; j < NB; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(w + j * K + 16 * c + 64 * PACKED_PREFETCH_LINES), _MM_HINT_T0);
    for (; c < stop; ++c) {
      __m512i xv[G];
      for (int g = 0; g < G; ++g) xv[g] = _mm512_loadu_si512(x + (c * G + g) * 64);
      for (int j = 0; j < NB; ++j) {
        const __m512i wv = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + 16 * c)));
        for (int g = 0; g < G; ++g) acc[j * G + g] = dpbusd(acc[j * G + g], xv[g], wv);
      }
    }
  }
  for (int a = 0; a < NB * G; ++a) _mm512_storeu_si512(raw + 16 * a, acc[a]);
}

template <int G, int NB>
void quad_rows(const uint8_t* x, const int8_t* w, int64_t K, int64_t rows, int32_t* raw) {
  const int64_t chunks = K / 16;
  for (int64_t c0 = 0; c0 < chunks; c0 += QUAD_KC / 16) {
    const int64_t c1 = std::min(c0 + QUAD_KC / 16, chunks);
    int64_t j = 0;
    for (; j + NB <= rows; j += NB) quad_tile<G, NB>(x, w + j * K, K, c0, c1, raw + j * G * 16, c0 > 0);
    for (; j < rows; ++j) quad_tile<G, 1>(x, w + j * K, K, c0, c1, raw + j * G * 16, c0 > 0);
  }
}

// out[m, j] = X_q[m, :] . w[j, :] for the M (PACKED_MIN_ROWS to QUAD_MAX_ROWS) rows of `packed` (pack_row_quads) and
// the `rows` (at most NC) weight rows at w, offsets[j] being 128 * the sum of w[j, k] over the first K / 16 * 16
// columns (row_offsets); out has room for 16 rows and NC columns. `raw` is scratch of NC x 64 int32.
__attribute__((noinline)) inline void quad_gemm_block(const uint8_t* packed, const int8_t* x_q, const int8_t* w,
                                                      int32_t* out, int64_t ldo, int64_t M, int64_t K, int64_t rows,
                                                      const uint32_t* offsets, int32_t* raw) {
  const int64_t groups = (M + 3) / 4, rows4 = (rows + 3) / 4 * 4;
  if (groups == 4) quad_rows<4, 6>(packed, w, K, rows, raw);
  else if (groups == 3) quad_rows<3, 8>(packed, w, K, rows, raw);
  else quad_rows<2, 12>(packed, w, K, rows, raw);
  if (K < 16) std::fill(raw, raw + rows * groups * 16, 0);
  std::fill(raw + rows * groups * 16, raw + rows4 * groups * 16, 0);
  uint32_t padded[NC + 3] = {};
  std::copy(offsets, offsets + rows, padded);
  for (int64_t j = 0; j < rows4; j += 4)  // 4 weight rows x 4 activation rows at a time: lane i's sums are row 4g + i's
    for (int64_t g = 0; g < groups; ++g) {
      const auto lanes = [&](int64_t t) { return _mm512_loadu_si512(raw + ((j + t) * groups + g) * 16); };
      const __m512i a0 = lanes(0), a1 = lanes(1), a2 = lanes(2), a3 = lanes(3);
      const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
      const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
      const __m512i sums = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
      const __m512i exact = _mm512_sub_epi32(
          sums, _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(padded + j))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (4 * g) * ldo + j), _mm512_extracti32x4_epi32(exact, 0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (4 * g + 1) * ldo + j), _mm512_extracti32x4_epi32(exact, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (4 * g + 2) * ldo + j), _mm512_extracti32x4_epi32(exact, 2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (4 * g + 3) * ldo + j), _mm512_extracti32x4_epi32(exact, 3));
    }
  for (int64_t m = 0; m < M; ++m)  // the last K % 16 columns
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t k = K / 16 * 16; k < K; ++k) out[m * ldo + j] += int32_t(x_q[m * K + k]) * int32_t(w[j * K + k]);
}

}  // namespace vnni

#pragma GCC pop_options

// ---- AMX GEMM -----------------------------------------------------------------------------------------------------

// X_q [M, K] (row-major) as AMX B tiles: for each block of 16 rows and each k_step (64 or 32) columns, a tile of
// k_step / 4 rows of 64 bytes whose row r holds, for each of the 16 activation rows c, its 4 codes at columns
// 4r..4r+3 (rows past M are zero). Two 32-column tiles in a row are the 64-column tile of those columns.
inline void pack_b_tiles(const int8_t* x_q, int64_t M, int64_t K, int64_t k_step, int8_t* tiles) {
  const int64_t m_tiles = (M + 15) / 16, k_tiles = K / k_step, tile_rows = k_step / 4;
#pragma omp parallel for schedule(static) collapse(2) if (M * K >= PARALLEL_MIN_ELEMENTS)
  for (int64_t mt = 0; mt < m_tiles; ++mt)
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      uint32_t* tile = reinterpret_cast<uint32_t*>(tiles + (mt * k_tiles + kt) * tile_rows * 64);
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t m = mt * 16 + c;
        for (int64_t r = 0; r < tile_rows; ++r) {
          uint32_t quad = 0;
          if (m < M) std::memcpy(&quad, x_q + m * K + kt * k_step + 4 * r, 4);
          tile[r * 16 + c] = quad;
        }
      }
    }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi2")

namespace vbmi2 {

// Whether the codes are collected for n_cols outlier columns of K, by CPU. On AMD, only where there is an outlier
// column per COLLECT_MIN_DENSITY columns or more on average (Zen 5 EPYC: below, gathering was faster, see tile). On
// Intel at any density (the AMX Xeon, the op at 1 and 2 rows with 0.5% outlier columns, 2 threads, four shapes:
// the outlier split cost 1-3% of the call collected, 8-11% gathered).
constexpr int64_t COLLECT_MIN_DENSITY = 64;

inline bool collects(int64_t n_cols, int64_t K) {
  static const bool amd = [] {
    uint32_t r[4];
    cpuid(0, 0, r);
    return r[1] == 0x68747541u && r[3] == 0x69746E65u && r[2] == 0x444D4163u;  // "AuthenticAMD" in ebx, edx, ecx
  }();
  return n_cols > 0 && (!amd || n_cols * COLLECT_MIN_DENSITY >= K) && uses_vbmi2();
}

// The decode GEMM (vnni::gemm_block for up to STREAM_MAX_ROWS activation rows) that also collects the outlier
// columns' codes of each weight row while its 64-column chunks are in registers (vpcompressb), rather than reading
// them again from L2 afterwards (vnni::outlier_pieces, outlier_block's gather): masks[c] has bit b set where column
// 64 c + b is an outlier column; weight row j's codes at those columns go, in column order, to codes + j * stride
// (stride: the outlier count + 64, for the whole-vector stores). Zen 5 EPYC, the op at one row, 2 threads: with 5%
// outlier columns 1.6-2.6x faster than gathering them afterwards (4096 x 4096: 560 -> 213 us, against 148 at
// threshold 0), 1-4 rows 1.09-1.78x over five shapes; with 0.5% (a third of the 64-column chunks holding one) it was
// 0.73-0.98x as fast as the gather at 14 of 15 shapes and row counts, hence COLLECT_MIN_DENSITY.
template <int MB, int NB>
inline void tile(const uint8_t* x, const int8_t* w, int64_t K, int32_t* out, int64_t ldo, const uint64_t* masks,
                 int8_t* codes, int64_t stride) {
  const int64_t ahead = NB * std::max<int64_t>(1, vnni::PREFETCH_BYTES / (NB * K)) * K;
  __m512i acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  int64_t k = 0, at = 0;
  for (; k + 64 <= K; k += 64) {
    __m512i xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_si512(x + i * K + k);
    const uint64_t mask = masks[k / 64];
    for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_loadu_si512(w + j * K + k);
      _mm_prefetch(reinterpret_cast<const char*>(w + j * K + ahead + k), _MM_HINT_T1);
      for (int i = 0; i < MB; ++i) acc[i][j] = vnni::dpbusd(acc[i][j], xv[i], wv);
      if (mask) _mm512_storeu_si512(codes + j * stride + at, _mm512_maskz_compress_epi8(mask, wv));
    }
    at += __builtin_popcountll(mask);
  }
  if (k < K) {
    const __mmask64 tail = (__mmask64(1) << (K - k)) - 1;
    __m512i xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_maskz_loadu_epi8(tail, x + i * K + k);
    const uint64_t mask = masks[k / 64];
    for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi8(tail, w + j * K + k);
      for (int i = 0; i < MB; ++i) acc[i][j] = vnni::dpbusd(acc[i][j], xv[i], wv);
      if (mask) _mm512_storeu_si512(codes + j * stride + at, _mm512_maskz_compress_epi8(mask, wv));
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out[i * ldo + j] = _mm512_reduce_add_epi32(acc[i][j]);
}

template <int MB, int NB>
void row_block(const uint8_t* x, const int8_t* w, int32_t* out, int64_t ldo, int64_t K, int64_t rows,
               const uint64_t* masks, int8_t* codes, int64_t stride) {
  int64_t n = 0;
  for (; n + NB <= rows; n += NB) tile<MB, NB>(x, w + n * K, K, out + n, ldo, masks, codes + n * stride, stride);
  for (; n < rows; ++n) tile<MB, 1>(x, w + n * K, K, out + n, ldo, masks, codes + n * stride, stride);
}

// out[m, j] = X_q[m] . w[j] for M (at most STREAM_MAX_ROWS) activation rows (x_u8 = X_q + 128) and the `rows` weight
// rows at w, less offsets[j], with vnni::gemm_block's tiles; the outlier columns' codes collected as in tile
inline void gemm_rows(const uint8_t* x_u8, const int8_t* w, int32_t* out, int64_t ldo, int64_t M, int64_t K,
                      int64_t rows, const uint32_t* offsets, const uint64_t* masks, int8_t* codes, int64_t stride) {
  if (M == 1) row_block<1, 4>(x_u8, w, out, ldo, K, rows, masks, codes, stride);
  else if (M == 2) row_block<2, 6>(x_u8, w, out, ldo, K, rows, masks, codes, stride);
  else if (M == 3) row_block<3, 4>(x_u8, w, out, ldo, K, rows, masks, codes, stride);
  else row_block<4, 4>(x_u8, w, out, ldo, K, rows, masks, codes, stride);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < rows; ++j) out[m * ldo + j] = int32_t(uint32_t(out[m * ldo + j]) - offsets[j]);
}

// out[m, j] = sum over i of x_o[m, i] * codes[j][i] (the collected codes, stride apart) for the M activation rows of
// x_o ([M, n_cols]) and the `rows` weight rows, 16 columns at a time, 4 weight rows at a time
template <int R>
inline void outlier_tile(const float* x_o, int64_t M, int64_t n_cols, const int8_t* codes, int64_t stride, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n_cols; i += 16) {
      const __mmask16 present = n_cols - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n_cols - i)) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(present, x_o + m * n_cols + i);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(
            xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(present, codes + r * stride + i))), acc[r]);
    }
    for (int r = 0; r < R; ++r) out[m * NC + r] = _mm512_reduce_add_ps(acc[r]);
  }
}

inline void outlier_rows(const float* x_o, int64_t M, int64_t n_cols, const int8_t* codes, int64_t stride,
                         int64_t rows, float* out) {
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) outlier_tile<4>(x_o, M, n_cols, codes + j * stride, stride, out + j);
  for (; j < rows; ++j) outlier_tile<1>(x_o, M, n_cols, codes + j * stride, stride, out + j);
}

}  // namespace vbmi2

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

namespace amx {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The tile config of this thread: tiles 0-3 of 16 rows x 64 bytes (C), 4-5 of 16 rows x k_step bytes (A), 6-7 of
// k_step / 4 rows x 64 bytes (B); k_step 64: all of them 16 x 64, as the bf16 tiles use them too. _tile_loadconfig's
// asm names only the first 8 bytes of the config as its input, so an optimizer may drop the stores to the rest (it
// did, at -O3, for a config filled just before the call: ldtilecfg then faults); the barrier keeps them.
inline void configure(int k_step) {
  TileConfig config;
  for (int t = 0; t < 4; ++t) config.rows[t] = 16, config.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) config.rows[t] = 16, config.colsb[t] = uint16_t(k_step);
  for (int t = 6; t < 8; ++t) config.rows[t] = uint8_t(k_step / 4), config.colsb[t] = 64;
  __asm__ volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// Tiles 0-3 accumulate C (16 weight rows x 16 activation rows of int32) over columns [k0, k1) (multiples of K_STEP),
// 4-5 hold A (16 weight rows x K_STEP codes), 6-7 hold B (K_STEP / 4 rows of a packed tile of X_q, pack_b_tiles:
// K_STEP columns at b0 + k / 32 * 512), as configure(K_STEP) sets them. TWO_N: two A tiles (32 weight rows);
// TWO_M: two B tiles (32 activation rows). c: [tile][weight row][activation row].
template <bool TWO_N, bool TWO_M, int K_STEP = 64>
inline void tiles(const int8_t* w, int64_t K, const int8_t* b0, const int8_t* b1, int64_t k0, int64_t k1, int32_t* c) {
  _tile_zero(0);
  if (TWO_M) _tile_zero(1);
  if (TWO_N) _tile_zero(2);
  if (TWO_N && TWO_M) _tile_zero(3);
  for (int64_t k = k0; k < k1; k += K_STEP) {
    _tile_loadd(4, w + k, K);
    _tile_loadd(6, b0 + k / 32 * 512, 64);
    _tile_dpbssd(0, 4, 6);
    if (TWO_M) {
      _tile_loadd(7, b1 + k / 32 * 512, 64);
      _tile_dpbssd(1, 4, 7);
    }
    if (TWO_N) {
      _tile_loadd(5, w + 16 * K + k, K);
      _tile_dpbssd(2, 5, 6);
      if (TWO_M) _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  if (TWO_M) _tile_stored(1, c + 256, 64);
  if (TWO_N) _tile_stored(2, c + 512, 64);
  if (TWO_N && TWO_M) _tile_stored(3, c + 768, 64);
}

// out[m, j] = sum over the first 64 * k_tiles columns of X_q[m, k] * w[j, k] for the first rows / 16 * 16 weight
// rows at w; returns how many rows that is.
__attribute__((noinline)) inline int64_t gemm_block(const int8_t* b_tiles, const int8_t* w, int32_t* out, int64_t ldo,
                                                    int64_t M, int64_t K, int64_t rows) {
  const int64_t k_tiles = K / 64, k_end = k_tiles * 64, m_tiles = (M + 15) / 16, full_rows = rows / 16 * 16;
  if (full_rows == 0) return 0;
  configure(64);
  alignas(64) int32_t c[4][16][16];  // [tile][weight row][activation row]
  for (int64_t n = 0; n < full_rows; n += 32) {
    const bool two_n = n + 32 <= full_rows;
    for (int64_t mt = 0; mt < m_tiles; mt += 2) {
      const bool two_m = mt + 1 < m_tiles;
      const int8_t* b0 = b_tiles + mt * k_tiles * 1024;
      const int8_t* b1 = b0 + k_tiles * 1024;
      if (two_n && two_m) tiles<true, true>(w + n * K, K, b0, b1, 0, k_end, &c[0][0][0]);
      else if (two_n) tiles<true, false>(w + n * K, K, b0, b1, 0, k_end, &c[0][0][0]);
      else if (two_m) tiles<false, true>(w + n * K, K, b0, b1, 0, k_end, &c[0][0][0]);
      else tiles<false, false>(w + n * K, K, b0, b1, 0, k_end, &c[0][0][0]);
      for (int tn = 0; tn < (two_n ? 2 : 1); ++tn)
        for (int tm = 0; tm < (two_m ? 2 : 1); ++tm) {
          const int32_t(*tile)[16] = c[tn * 2 + tm];
          const int64_t m0 = (mt + tm) * 16, n0 = n + tn * 16;
          for (int64_t i = 0; i < 16 && m0 + i < M; ++i)
            for (int64_t j = 0; j < 16; ++j) out[(m0 + i) * ldo + n0 + j] = tile[j][i];
        }
    }
  }
  _tile_release();
  return full_rows;
}

}  // namespace amx

#pragma GCC pop_options

// ---- scratch memory -----------------------------------------------------------------------------------------------

// A call's temporaries, carved from memory its thread keeps between calls (up to KEEP_BYTES; a larger call allocates
// and frees its own). Fresh large allocations are fresh pages, and faulting them in costs as much as a decode step's
// GEMM. `slot` tells apart the calling thread's arena from the one it uses as a worker of the parallel loop.
class Scratch {
 public:
  static constexpr size_t KEEP_BYTES = size_t(32) << 20;

  Scratch(size_t bytes, int slot) {
    static thread_local std::vector<uint8_t> kept[2];
    bytes += 64 * 16;  // room to align each piece
    if (bytes <= KEEP_BYTES) {
      if (kept[slot].size() < bytes) kept[slot].resize(bytes);
      base_ = kept[slot].data();
    } else {
      owned_.reset(new uint8_t[bytes]);
      base_ = owned_.get();
    }
  }

  template <class T>
  T* take(size_t count) {
    used_ = (used_ + 63) / 64 * 64;
    T* piece = reinterpret_cast<T*>(base_ + used_);
    used_ += count * sizeof(T);
    return piece;
  }

 private:
  std::unique_ptr<uint8_t[]> owned_;
  uint8_t* base_ = nullptr;
  size_t used_ = 0;
};

// ---- quantization, outliers, epilogue (AVX2) ------------------------------------------------------------------------

// Step 1: is_outlier [K] (1 in the outlier columns) and keep [K] (all ones in the others: where(is_outlier, +0, x)
// is x & keep).
inline void outlier_mask(const void* x, int dtype, int64_t M, int64_t K, float limit, uint8_t* is_outlier,
                         uint32_t* keep) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 limit8 = _mm256_set1_ps(limit);
  std::fill(is_outlier, is_outlier + K, 0);
#pragma omp parallel for schedule(static) if (M * K >= PARALLEL_MIN_ELEMENTS)
  for (int64_t k0 = 0; k0 < K; k0 += 256) {  // !(|x| < limit) in any row: NaN compares false, so it is an outlier
    const int64_t k1 = std::min(K, k0 + 256), k_vec = k0 + (k1 - k0) / 8 * 8;  // k0 is a multiple of 8
    uint8_t flags[32] = {};  // bit b of flags[g]: column k0 + 8 g + b, ORed over the rows without a branch (real
                             // activations have outliers in 13% of the columns, in most rows: branching per 8 values
                             // on them cost a sixth of a 1024-row call)
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = k0; k < k_vec; k += 8) {
        const __m256 a = _mm256_and_ps(load8(x, m * K + k, dtype), abs_mask);
        flags[(k - k0) / 8] |= uint8_t(_mm256_movemask_ps(_mm256_cmp_ps(a, limit8, _CMP_NLT_UQ)));
      }
      for (int64_t k = k_vec; k < k1; ++k) is_outlier[k] |= !(std::fabs(load(x, m * K + k, dtype)) < limit);
    }
    for (int64_t k = k0; k < k_vec; ++k) is_outlier[k] = (flags[(k - k0) / 8] >> ((k - k0) % 8)) & 1;
  }
  for (int64_t k = 0; k < K; ++k) keep[k] = is_outlier[k] ? 0u : 0xFFFFFFFFu;
}

// The outlier columns in ascending order into cols; returns their number
inline int64_t outlier_list(const uint8_t* is_outlier, int64_t K, int32_t* cols) {
  int64_t n_cols = 0;
  for (int64_t k0 = 0; k0 < K; k0 += 32) {  // 32 flags at a time: most are 0
    const int64_t k1 = std::min(K, k0 + 32);
    if (k1 - k0 == 32 && _mm256_testz_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(is_outlier + k0)),
                                            _mm256_set1_epi8(1)))
      continue;
    for (int64_t k = k0; k < k1; ++k)
      if (is_outlier[k]) cols[n_cols++] = int32_t(k);
  }
  return n_cols;
}

// Step 2: s_x [M] and x_q [M, K], from outlier_mask's is_outlier and keep
inline void quantize(const void* x, int dtype, int64_t M, int64_t K, const uint8_t* is_outlier, const uint32_t* keep,
                     float* s_x, int8_t* x_q) {
  const int64_t k_vec = K / 8 * 8;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
#pragma omp parallel for schedule(static) if (M * K >= PARALLEL_MIN_ELEMENTS && M > 1)
  for (int64_t m = 0; m < M; ++m) {
    const int64_t base = m * K;
    __m256 max8 = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_vec; k += 8) {
      const __m256 v = _mm256_and_ps(load8(x, base + k, dtype), _mm256_loadu_ps(reinterpret_cast<const float*>(keep + k)));
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
      const __m256 v = _mm256_and_ps(load8(x, base + k, dtype), _mm256_loadu_ps(reinterpret_cast<const float*>(keep + k)));
      const __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_div_ps(v, safe8), q_max8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i codes = _mm256_cvtps_epi32(q);  // in [-127, 127]: narrow to 8 bytes
      const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(x_q + base + k), _mm_packs_epi16(words, words));
    }
    for (int64_t k = k_vec; k < K; ++k) {
      const float value = is_outlier[k] ? 0.0f : load(x, base + k, dtype);
      x_q[base + k] = int8_t(std::nearbyint(value / safe * Q_MAX));
    }
  }
}

// X[:, O] as fp32 [M, |O|] (small: outlier columns are few)
inline std::vector<float> outlier_values(const void* x, int dtype, int64_t M, int64_t K, const int32_t* cols,
                                         int64_t n_cols) {
  std::vector<float> x_o(M * n_cols);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < n_cols; ++i) x_o[m * n_cols + i] = load(x, m * K + cols[i], dtype);
  return x_o;
}

// The outlier columns' weights: the codes (scaled by s_w / 127 in the epilogue), a floating-point weight, or the
// codes times their block scales (block mode: cpu_block_linear_kernels.h)
struct OutlierWeight {
  const int8_t* codes;
  const void* values;  // [N, K] in `dtype`, or nullptr: the codes
  int dtype;
  const uint16_t* block_scale = nullptr;  // [N, blocks] bf16: the codes are dequantized by it
  int64_t blocks = 0, block_size = 0;

  float at(int64_t n, int64_t K, int64_t k) const {
    if (values) return load(values, n * K + k, dtype);
    const float code = float(codes[n * K + k]);
    return block_scale ? code * bf16_value(block_scale[n * blocks + k / block_size]) : code;
  }
};

// w_o[i * NC + j] = w[n0 + j, cols[i]] for the `rows` weight rows from n0, a row at a time: the rows the GEMM has just
// read, in L2. Down a column instead, the loads are K apart and share L1 sets when K is a multiple of 4096 (on a Zen 5
// EPYC, 4096 rows x 20 columns: 44 us a row at a time, 117 us down the columns, 122 us by vpgatherdd)
inline void gather_columns(const OutlierWeight& weight, const int32_t* cols, int64_t n_cols, int64_t n0, int64_t rows,
                           int64_t K, float* w_o) {
  for (int64_t n = 0; n < rows; ++n) {
    if (weight.values == nullptr && weight.block_scale == nullptr) {
      const int8_t* row = weight.codes + (n0 + n) * K;
      for (int64_t i = 0; i < n_cols; ++i) w_o[i * NC + n] = float(row[cols[i]]);
    } else {
      for (int64_t i = 0; i < n_cols; ++i) w_o[i * NC + n] = weight.at(n0 + n, K, cols[i]);
    }
  }
}

// Outlier columns per pass of the outlier product: their gathered weights (OUTLIER_CHUNK x NC floats, 24 KB) stay in
// L1 while every activation row passes. Gathering all of them first wrote a buffer of |O| x NC floats a row at a time
// and read it back from L2 for every row (Ice Lake Xeon, 13% outlier columns: 4096 x 4096 at 256 rows 47-51 ms, with
// 16-wide FMAs 24, chunked 20)
constexpr int64_t OUTLIER_CHUNK = 96;

// out[m, j] = sum over i of x_o[m, i] * w[n0 + j, cols[i]] in fp32 for the `rows` (at most NC) weight rows from n0,
// x_o being X[:, O] ([M, |O|]). OUTLIER_CHUNK columns at a time are gathered into w_o (OUTLIER_CHUNK x NC floats)
// from the rows the GEMM has just read; each output row then adds |O| scaled copies of them, vectorized over n, the
// columns in ascending order (a chunk continues the sums the previous one stored).
inline void outlier_block(const float* x_o, const int32_t* cols, int64_t n_cols, const OutlierWeight& weight,
                          int64_t n0, float* out, int64_t M, int64_t K, int64_t rows, float* w_o) {
  for (int64_t i0 = 0; i0 < n_cols; i0 += OUTLIER_CHUNK) {
    const int64_t count = std::min(OUTLIER_CHUNK, n_cols - i0);
    gather_columns(weight, cols + i0, count, n0, rows, K, w_o);
    for (int64_t m = 0; m < M; ++m) {
      float* row = out + m * NC;
      const float* x_m = x_o + m * n_cols + i0;
      int64_t n = 0;
      for (; n + 32 <= rows; n += 32) {  // 4 independent accumulators: the FMA latency is hidden
        __m256 acc[4];
        for (int c = 0; c < 4; ++c) acc[c] = i0 ? _mm256_loadu_ps(row + n + 8 * c) : _mm256_setzero_ps();
        for (int64_t i = 0; i < count; ++i) {
          const __m256 x_mi = _mm256_set1_ps(x_m[i]);
          for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(x_mi, _mm256_loadu_ps(w_o + i * NC + n + 8 * c), acc[c]);
        }
        for (int c = 0; c < 4; ++c) _mm256_storeu_ps(row + n + 8 * c, acc[c]);
      }
      for (; n < rows; ++n) {
        float sum = i0 ? row[n] : 0.0f;
        for (int64_t i = 0; i < count; ++i) sum = std::fma(x_m[i], w_o[i * NC + n], sum);
        row[n] = sum;
      }
    }
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

namespace vnni {

// out rows [0, R) (stride NC) (+)= x_o's R rows (stride x_stride) times `count` gathered columns w_o, 16 outputs per
// FMA; `add`: continue the sums out holds (each output stays one chain of FMAs in column order)
template <int R>
inline void outlier_rows(const float* x_o, int64_t x_stride, const float* w_o, int64_t count, int64_t rows, float* out,
                         bool add) {
  int64_t n = 0;
  for (; n + 64 <= rows; n += 64) {  // R x 4 independent accumulators: the FMA latency is hidden
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = add ? _mm512_loadu_ps(out + r * NC + n + 16 * c) : _mm512_setzero_ps();
    for (int64_t i = 0; i < count; ++i) {
      __m512 w[4];
      for (int c = 0; c < 4; ++c) w[c] = _mm512_loadu_ps(w_o + i * NC + n + 16 * c);
      for (int r = 0; r < R; ++r) {
        const __m512 x = _mm512_set1_ps(x_o[r * x_stride + i]);
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(x, w[c], acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + r * NC + n + 16 * c, acc[r][c]);
  }
  for (; n + 16 <= rows; n += 16) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = add ? _mm512_loadu_ps(out + r * NC + n) : _mm512_setzero_ps();
    for (int64_t i = 0; i < count; ++i) {
      const __m512 w = _mm512_loadu_ps(w_o + i * NC + n);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x_o[r * x_stride + i]), w, acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * NC + n, acc[r]);
  }
  for (; n < rows; ++n)
    for (int r = 0; r < R; ++r) {
      float sum = add ? out[r * NC + n] : 0.0f;
      for (int64_t i = 0; i < count; ++i) sum = std::fma(x_o[r * x_stride + i], w_o[i * NC + n], sum);
      out[r * NC + n] = sum;
    }
}

// outlier_block with 16-wide FMAs, four activation rows at a time (each column's weights loaded once for them). Every
// output is the same chain of fused multiply-adds over the columns in ascending order, so the same value. Where
// outlier columns are many (real LMs: 13% of the columns at threshold 6), this product is a large part of a call.
inline void outlier_block(const float* x_o, const int32_t* cols, int64_t n_cols, const OutlierWeight& weight,
                          int64_t n0, float* out, int64_t M, int64_t K, int64_t rows, float* w_o) {
  for (int64_t i0 = 0; i0 < n_cols; i0 += OUTLIER_CHUNK) {
    const int64_t count = std::min(OUTLIER_CHUNK, n_cols - i0);
    gather_columns(weight, cols + i0, count, n0, rows, K, w_o);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) outlier_rows<4>(x_o + m * n_cols + i0, n_cols, w_o, count, rows, out + m * NC, i0 > 0);
    for (; m + 2 <= M; m += 2) outlier_rows<2>(x_o + m * n_cols + i0, n_cols, w_o, count, rows, out + m * NC, i0 > 0);
    if (m < M) outlier_rows<1>(x_o + m * n_cols + i0, n_cols, w_o, count, rows, out + m * NC, i0 > 0);
  }
}

// ---- the outlier product for decode: 16 columns at a time ---------------------------------------------------------
// For one or two activation rows, gathering the outlier columns' codes costs more than the product (one scalar load,
// conversion and store each: ~0.4 ns a code, Ice Lake Xeon). Here each weight row goes once over the 16-column pieces
// of K that hold an outlier column: its 16 codes widened to fp32 and multiplied by those columns of X, zero at the
// others (XPieces), 16 lanes at a time, then summed across the lanes. Real LMs have outliers in 13% of the columns at
// threshold 6, and 89% of their 16-column pieces then hold one. Measured on the op, the same machine, 13% outlier
// columns: 1 row 1.4-1.8x faster (4096 x 4096: 1.52 -> 0.96 ms), 2 rows 1.03-1.31x; 3 rows and more lost to the gather,
// which serves all of them, and so did pieces holding one outlier column on average (0.5% outlier columns). Each
// output sums the same products as the column-ordered chain of outlier_block, in another order (the reference's
// matmul fixes none). On CPUs with AVX512-VBMI2 up to STREAM_MAX_ROWS rows take vbmi2::gemm_rows instead, which
// collects the codes as the GEMM streams the rows.

constexpr int64_t PIECES_MAX_ROWS = 2;  // and the pieces hold 2 outlier columns or more on average

// The pieces: their first columns (multiples of 16), and for each piece and activation row the 16 values of X there,
// 0 outside the outlier columns ([piece][row][16])
struct XPieces {
  std::vector<int32_t> starts;
  std::vector<float> values;
};

inline XPieces x_pieces(const float* x_o, const int32_t* cols, int64_t n_cols, int64_t M) {
  XPieces pieces;
  for (int64_t i = 0; i < n_cols; ++i) {
    const int32_t start = cols[i] / 16 * 16;  // cols ascend
    if (pieces.starts.empty() || pieces.starts.back() != start) {
      pieces.starts.push_back(start);
      pieces.values.resize(pieces.values.size() + M * 16, 0.0f);
    }
    float* piece = pieces.values.data() + (pieces.starts.size() - 1) * M * 16;
    for (int64_t m = 0; m < M; ++m) piece[m * 16 + cols[i] % 16] = x_o[m * n_cols + i];
  }
  return pieces;
}

// out[m, j] for R weight rows from w (stride K), MR activation rows
template <int MR, int R>
inline void outlier_piece_rows(const XPieces& pieces, const int8_t* w, int64_t K, float* out) {
  __m512 acc[R][MR];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  const float* x = pieces.values.data();
  for (const int32_t start : pieces.starts) {
    const __mmask16 present = K - start >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - start)) - 1);
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_ps(x + m * 16);
    x += MR * 16;
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(present, w + r * K + start)));
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_fmadd_ps(xv[m], wv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MR; ++m) out[m * NC + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// out[m, j] = sum over the outlier columns k of x[m, k] * w[j, k] (the codes) for the `rows` weight rows at w and the
// MR (at most PIECES_MAX_ROWS) rows of `pieces`; 4 weight rows at a time, so 4 * MR independent sums hide the FMA
// latency
template <int MR>
void outlier_pieces(const XPieces& pieces, const int8_t* w, int64_t K, int64_t rows, float* out) {
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) outlier_piece_rows<MR, 4>(pieces, w + j * K, K, out + j);
  for (; j < rows; ++j) outlier_piece_rows<MR, 1>(pieces, w + j * K, K, out + j);
}

inline void outlier_pieces(const XPieces& pieces, const int8_t* w, int64_t K, int64_t M, int64_t rows, float* out) {
  if (M == 1) outlier_pieces<1>(pieces, w, K, rows, out);
  else outlier_pieces<2>(pieces, w, K, rows, out);
}

}  // namespace vnni

#pragma GCC pop_options

// The activation of a linear: X [M, K], contiguous, in x_dtype (fp32, bf16, fp16), and the outlier threshold
struct Activation {
  const void* x;
  int x_dtype;
  int64_t M, K;
  float threshold;  // <= 0: no magnitude outliers
};

// ---- AMX-BF16: the outlier product from amx_bf16::MIN_ROWS rows ---------------------------------------------------
// The outlier columns' values split into bf16 terms that sum to them exactly (bf16 activations: one; fp16: two; fp32:
// three, 8 significant bits each), and the codes (|w| <= 127) are bf16 too: tdpbf16ps multiplies them exactly and sums
// into fp32, the products of outlier_block summed in another order (the reference's matmul fixes none), 16 x 16 x 32
// of them per instruction where an AVX-512 FMA does 16. Real LMs have outliers in 13% of the columns at threshold 6,
// and there those FMAs cost more than the int8 GEMM (Gemma 3 270M in bf16, a compiled forward of 4 x 256 tokens on
// the AMX Xeon: 719 -> 602 ms, 509 at threshold 0). tdpbf16ps takes subnormal inputs as zero and flushes subnormal
// sums: errors below 2^-126 per product, inside the bound.

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace amx_bf16 {

inline bool supported() {  // AMX-BF16 and AVX512-BF16; best_supported_kernel() == Kernel::Amx has the tile state
  static const bool bf16 = [] {
    uint32_t r[4], r1[4];
    cpuid(7, 0, r);
    cpuid(7, 1, r1);
    return (r[3] & (1u << 22)) && (r1[0] & (1u << 5));
  }();
  return bf16;
}

// Columns of the outlier product per tile product (pairs of bf16 in 64-byte tile rows)
constexpr int64_t CHUNK = 32;

// The tiles pay from 32 activation rows and 2560 row-columns (M x |O|); below, gathering and transposing the codes
// and the padded tiles cost more than the FMAs (the op, bf16, AMX Xeon, FMAs' time / tiles': 4096 x 4096 with 20
// outlier columns 0.92-0.96 up to 32 rows, 1.02 at 64 and 256; 122 columns 0.92-0.99 up to 16 rows, 1.03 at 32, 1.19
// at 256; 532 columns 0.84-1.01 up to 16, 1.12-1.60 from 32; 2048 x 640 with 3 columns 0.54-0.93 at every M, 19
// columns 0.79-0.95 up to 64 rows, 1.04 at 256, 83 columns 1.01-1.31 from 32)
constexpr int64_t MIN_ROWS = 32, MIN_ROW_COLUMNS = 2560;

inline int64_t chunks(int64_t n_cols) { return (n_cols + CHUNK - 1) / CHUNK; }

// How many bf16 terms hold a value of the activation's dtype exactly
inline int terms(int dtype) { return dtype == BF16 ? 1 : dtype == F16 ? 2 : 3; }

// value = sum of its `count` terms (bf16 bits), each the value left by the ones before it cut to 8 significant bits
// (the remainders are exact in fp32); Inf and NaN are their first term, with NaN kept NaN
inline void split(float value, int count, uint16_t* out) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if (!std::isfinite(value)) {
    out[0] = std::isnan(value) ? uint16_t(0x7FC0 | (bits >> 16)) : uint16_t(bits >> 16);
    for (int t = 1; t < count; ++t) out[t] = 0;
    return;
  }
  for (int t = 0; t < count; ++t) {
    out[t] = uint16_t(bits >> 16);
    const uint32_t head_bits = bits & 0xFFFF0000u;
    float head;
    std::memcpy(&head, &head_bits, 4);
    value -= head;
    std::memcpy(&bits, &value, 4);
  }
}

// x_o [M, n_cols] as `count` planes of bf16 A tiles ([term][row][chunks(n_cols) * CHUNK], zero past n_cols and in the
// rows up to a multiple of 16)
inline std::vector<uint16_t> pack_x(const float* x_o, int64_t M, int64_t n_cols, int count) {
  const int64_t ld = chunks(n_cols) * CHUNK, rows16 = (M + 15) / 16 * 16;
  std::vector<uint16_t> planes(count * rows16 * ld, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < n_cols; ++i) {
      uint16_t term[3];
      split(x_o[m * n_cols + i], count, term);
      for (int t = 0; t < count; ++t) planes[(t * rows16 + m) * ld + i] = term[t];
    }
  return planes;
}

// out[m * NC + j] = sum over i of x_o[m, i] * w[j, cols[i]] for the M activation rows of `planes` (pack_x: `count`
// planes of `plane_rows` rows, from the chunk's first row) and the `rows` (at most NC) weight rows at w, as
// outlier_block computes it for codes; out has room for M rounded up to 16 rows, and columns up to `rows` rounded up to
// 16 are written. w_tiles: scratch of NC x chunks(n_cols) x CHUNK bf16, where the codes are gathered from the rows the
// GEMM has just read (a row at a time, as gather_columns), as B tiles: for each 16 weight rows and CHUNK columns, 16
// rows of 64 bytes whose row p holds, for each weight row j, its codes at columns 2p and 2p + 1 (a 16 x 16 transpose
// of the rows' bf16 pairs).
inline void outlier_block(const uint16_t* planes, int count, int64_t plane_rows, const int32_t* cols, int64_t n_cols,
                          const int8_t* w, int64_t K, int64_t M, int64_t rows, uint16_t* w_tiles, float* out) {
  const int64_t n_chunks = chunks(n_cols), ld = n_chunks * CHUNK, n_tiles = (rows + 15) / 16;
  const uint32_t zeros[16] = {};
  for (int64_t t = 0; t < n_tiles; ++t)
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      alignas(64) int32_t pairs[16][16];  // [weight row][pair]: two bf16 codes
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t row = t * 16 + j, i0 = ch * CHUNK, present = row < rows ? std::min(CHUNK, n_cols - i0) : 0;
        alignas(32) int8_t codes[CHUNK] = {};
        for (int64_t i = 0; i < present; ++i) codes[i] = w[row * K + cols[i0 + i]];
        const __m256i c = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes));
        const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
        const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1)));
        _mm512_store_si512(pairs[j], __m512i(_mm512_cvtne2ps_pbh(high, low)));  // exact: |code| <= 127
      }
      int32_t* tile = reinterpret_cast<int32_t*>(w_tiles + (t * n_chunks + ch) * 512);
      vnni::transpose_minus(&pairs[0][0], 16, zeros, tile, 16);
    }
  amx::configure(64);  // every tile 16 rows x 64 bytes: 32 bf16 a row
  // C tiles 0-3: 2 x 2 tiles of 16 activation rows x 16 weight rows; A tiles 4-5 (x, two row tiles), B tiles 6-7
  // (codes, two weight row tiles), each chunk's B tiles loaded once for all the terms
  for (int64_t m = 0; m < M; m += 32)
    for (int64_t n = 0; n < n_tiles; n += 2) {
      const bool two_m = m + 16 < M, two_n = n + 1 < n_tiles;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t ch = 0; ch < n_chunks; ++ch) {
        _tile_loadd(6, w_tiles + (n * n_chunks + ch) * 512, 64);
        if (two_n) _tile_loadd(7, w_tiles + ((n + 1) * n_chunks + ch) * 512, 64);
        for (int t = 0; t < count; ++t) {
          const uint16_t* a = planes + (t * plane_rows + m) * ld + ch * CHUNK;
          _tile_loadd(4, a, ld * 2);
          _tile_dpbf16ps(0, 4, 6);
          if (two_n) _tile_dpbf16ps(2, 4, 7);
          if (two_m) {
            _tile_loadd(5, a + 16 * ld, ld * 2);
            _tile_dpbf16ps(1, 5, 6);
            if (two_n) _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      float* o = out + m * NC + n * 16;
      _tile_stored(0, o, NC * 4);
      if (two_m) _tile_stored(1, o + 16 * NC, NC * 4);
      if (two_n) _tile_stored(2, o + 16, NC * 4);
      if (two_m && two_n) _tile_stored(3, o + 16 * NC + 16, NC * 4);
    }
  _tile_release();
}

}  // namespace amx_bf16

#pragma GCC pop_options

// One weight multiplying it, and its output y [M, N] in x_dtype
struct Weight {
  const int8_t* w;  // [N, K] codes, contiguous
  int64_t N;
  const int32_t* code_sums;  // [N], each row's sum of codes (what the VNNI and AMX kernels take off), or nullptr
  const float* s_w;  // [N]
  const void* bias;  // [N] in bias_dtype, or nullptr
  int bias_dtype;
  const void* outlier_weight;  // [N, K] floating point in outlier_dtype, or nullptr: the dequantized codes
  int outlier_dtype;
  void* y;
};

// The whole linear (steps 1-4) with the given GEMM kernel, for `count` weights that multiply the same activation (the
// q, k and v projections of an attention layer, say): X is quantized once, and one parallel loop goes over the row
// blocks of all of them, so a group costs one call's fixed costs and its threads stream the weights back to back.
// Each output is what a call with its weight alone gives, bit for bit.
inline void linear(const Activation& a, const Weight* weights, int64_t count, Kernel kernel) {
  const int64_t M = a.M, K = a.K;
  const float limit = a.threshold > 0 ? a.threshold : INFINITY;
  // X_q + 128 (u8), what vpdpbusd multiplies: as rows for the VNNI kernel's dot products (and the AMX kernel's
  // tails), from PACKED_MIN_ROWS rows 4 rows to a vector up to QUAD_MAX_ROWS, packed in 16-row tiles beyond
  const bool vnni_packs = kernel == Kernel::Avx512Vnni && M >= vnni::PACKED_MIN_ROWS;
  const bool quad_rows = vnni_packs && M <= vnni::QUAD_MAX_ROWS, packed_rows = vnni_packs && !quad_rows;
  bool amx_tails = false;
  for (int64_t i = 0; i < count; ++i) amx_tails |= weights[i].N % 16 != 0;
  const bool unsigned_codes = (kernel == Kernel::Avx512Vnni && !vnni_packs) || (kernel == Kernel::Amx && (K % 64 || amx_tails));
  const int64_t tile_bytes = kernel == Kernel::Amx ? (M + 15) / 16 * (K / 64) * 1024
                             : packed_rows         ? (M + 15) / 16 * 16 * (K / 4 * 4)
                             : quad_rows           ? (M + 3) / 4 * 4 * (K / 16 * 16)
                                                   : 0;
  // the row blocks of all the weights, in order: block b is rows [n0, n0 + NC) of weight block_weight[b]
  int64_t blocks = 0;
  for (int64_t i = 0; i < count; ++i) blocks += (weights[i].N + NC - 1) / NC;
  Scratch scratch(K * (1 + 4 + 4) + M * 4 + M * K * (unsigned_codes ? 2 : 1) + tile_bytes + blocks * 16, 0);
  uint8_t* is_outlier = scratch.take<uint8_t>(K);
  uint32_t* keep = scratch.take<uint32_t>(K);
  float* s_x = scratch.take<float>(M);
  int8_t* x_q = scratch.take<int8_t>(M * K);
  int64_t* block_weight = scratch.take<int64_t>(blocks);
  int64_t* block_row = scratch.take<int64_t>(blocks);
  for (int64_t i = 0, b = 0; i < count; ++i)
    for (int64_t n0 = 0; n0 < weights[i].N; n0 += NC, ++b) block_weight[b] = i, block_row[b] = n0;
  outlier_mask(a.x, a.x_dtype, M, K, limit, is_outlier, keep);
  quantize(a.x, a.x_dtype, M, K, is_outlier, keep, s_x, x_q);
  uint8_t* x_u8 = unsigned_codes ? scratch.take<uint8_t>(M * K) : nullptr;
  if (unsigned_codes) {
    const int64_t elements = M * K, vector_count = elements / 32 * 32;
    const __m256i top_bits = _mm256_set1_epi8(char(0x80));
#pragma omp parallel for schedule(static) if (elements >= PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < vector_count; i += 32) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_q + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x_u8 + i), _mm256_xor_si256(codes, top_bits));
    }
    for (int64_t i = vector_count; i < elements; ++i) x_u8[i] = uint8_t(x_q[i]) ^ 0x80;
  }
  int8_t* b_tiles = kernel == Kernel::Amx ? scratch.take<int8_t>(tile_bytes) : nullptr;
  if (b_tiles) pack_b_tiles(x_q, M, K, 64, b_tiles);
  uint8_t* x_packed = packed_rows ? scratch.take<uint8_t>(tile_bytes) : nullptr;
  if (x_packed) vnni::pack_rows(x_q, M, K, x_packed);
  uint8_t* x_quads = quad_rows ? scratch.take<uint8_t>(tile_bytes) : nullptr;
  if (x_quads) vnni::pack_row_quads(x_q, M, K, x_quads);
  int32_t* cols = scratch.take<int32_t>(K);
  const int64_t n_cols = outlier_list(is_outlier, K, cols);
  const std::vector<float> x_o = outlier_values(a.x, a.x_dtype, M, K, cols, n_cols);
  // decode with AVX512-VBMI2 (on AMD, with an outlier column per 64 columns or more on average): the outlier columns'
  // codes collected by the GEMM itself (vbmi2::gemm_rows; see vbmi2::collects), for the weights multiplied by their
  // codes
  const bool collect = kernel == Kernel::Avx512Vnni && M <= vnni::STREAM_MAX_ROWS && vbmi2::collects(n_cols, K);
  std::vector<uint64_t> chunk_masks(collect ? (K + 63) / 64 : 0, 0);
  for (int64_t i = 0; collect && i < n_cols; ++i) chunk_masks[cols[i] / 64] |= uint64_t(1) << (cols[i] % 64);
  const int64_t code_stride = n_cols + 64;
  // else decode: the outlier product by 16-column pieces, for the weights multiplied by their codes, where the
  // pieces hold two outlier columns or more on average (not built where the codes are collected: never used there)
  const bool few_rows = !collect && kernel != Kernel::Avx2 && n_cols > 0 && M <= vnni::PIECES_MAX_ROWS;
  const vnni::XPieces pieces = few_rows ? vnni::x_pieces(x_o.data(), cols, n_cols, M) : vnni::XPieces{};
  const bool by_pieces = few_rows && n_cols >= 2 * int64_t(pieces.starts.size());
  // the AMX kernel: the outlier product by bf16 tiles, for the weights multiplied by their codes
  const bool bf16_tiles = kernel == Kernel::Amx && M >= amx_bf16::MIN_ROWS && M * n_cols >= amx_bf16::MIN_ROW_COLUMNS &&
                          amx_bf16::supported();
  const int x_terms = amx_bf16::terms(a.x_dtype);
  const int64_t plane_rows = (M + 15) / 16 * 16;
  const std::vector<uint16_t> x_planes = bf16_tiles ? amx_bf16::pack_x(x_o.data(), M, n_cols, x_terms)
                                                    : std::vector<uint16_t>{};
  const int64_t w_bf16_count = bf16_tiles ? NC * amx_bf16::chunks(n_cols) * amx_bf16::CHUNK : 0;
  // Activation rows go a chunk at a time, so that the chunk's codes stay in L2 while every block of weight rows
  // passes (for AMX, its packed tiles: a multiple of 32 rows); the weight is read once per chunk
  const int64_t chunk_bytes = packed_rows ? PACKED_CHUNK_BYTES : CHUNK_BYTES;
  const int64_t m_chunk = std::min(M, std::max<int64_t>(32, chunk_bytes / std::max<int64_t>(K, 1) / 32 * 32));
#pragma omp parallel
  {
    const int64_t m_chunk16 = (m_chunk + 15) / 16 * 16;  // the packed GEMM writes whole 16-row tiles
    // the packed GEMMs' own scratch: 16-row tiles' sums before their transpose, or 4-row vectors' lane sums
    const int64_t gemm_scratch_ints = x_packed ? m_chunk16 * NC : x_quads ? NC * 64 : 0;
    Scratch block_scratch(m_chunk16 * NC * 4 + gemm_scratch_ints * 4 + m_chunk16 * NC * 4 * (n_cols ? 1 : 0) +
                              std::min(n_cols, OUTLIER_CHUNK) * NC * 4 + (collect ? NC * code_stride : 0) +
                              w_bf16_count * 2, 1);
    int32_t* acc = block_scratch.take<int32_t>(m_chunk16 * NC);
    int32_t* gemm_scratch = block_scratch.take<int32_t>(gemm_scratch_ints);
    float* outliers = block_scratch.take<float>(n_cols ? m_chunk16 * NC : 0);  // whole 16-row tiles (amx_bf16)
    float* w_o = block_scratch.take<float>(std::min(n_cols, OUTLIER_CHUNK) * NC);
    int8_t* collected = block_scratch.take<int8_t>(collect ? NC * code_stride : 0);  // the collected outlier codes
    uint16_t* w_bf16 = block_scratch.take<uint16_t>(w_bf16_count);
    for (int64_t m0 = 0; m0 < M; m0 += m_chunk) {
      const int64_t mc = std::min(m_chunk, M - m0);
      const int8_t* xq = x_q + m0 * K;
      const uint8_t* xu = x_u8 ? x_u8 + m0 * K : nullptr;
      const int8_t* tiles = b_tiles ? b_tiles + m0 / 16 * (K / 64) * 1024 : nullptr;
      const uint8_t* xp = x_packed ? x_packed + m0 * (K / 4 * 4) : nullptr;  // m0 is a multiple of 16
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        const Weight& p = weights[block_weight[b]];
        const int64_t N = p.N, n0 = block_row[b], rows = std::min(N, n0 + NC) - n0;
        const int8_t* w = p.w + n0 * K;
        uint32_t offsets[NC];
        if (kernel == Kernel::Amx) {  // full 16-row groups over full 64-column tiles; the rest by VNNI
          const int64_t k_main = K / 64 * 64;
          const int64_t done = amx::gemm_block(tiles, w, acc, NC, mc, K, rows);
          if (k_main < K && done) {
            vnni::code_offsets(w, K, done, k_main, K, offsets);
            vnni::gemm_block(xu, w, acc, NC, mc, K, done, k_main, K, true, offsets);
          }
          if (done < rows) {
            vnni::row_offsets(p.code_sums, w + done * K, K, n0 + done, rows - done, K, offsets);
            vnni::gemm_block(xu, w + done * K, acc + done, NC, mc, K, rows - done, 0, K, false, offsets);
          }
        } else if (xp) {
          vnni::row_offsets(p.code_sums, w, K, n0, rows, K / 4 * 4, offsets);
          vnni::packed_gemm_block(xp, xq, w, acc, NC, mc, K, rows, offsets, gemm_scratch);
        } else if (x_quads) {  // all M rows are one chunk
          vnni::row_offsets(p.code_sums, w, K, n0, rows, K / 16 * 16, offsets);
          vnni::quad_gemm_block(x_quads, xq, w, acc, NC, mc, K, rows, offsets, gemm_scratch);
        } else if (collect && p.outlier_weight == nullptr) {
          vnni::row_offsets(p.code_sums, w, K, n0, rows, K, offsets);
          vbmi2::gemm_rows(xu, w, acc, NC, mc, K, rows, offsets, chunk_masks.data(), collected, code_stride);
        } else if (kernel == Kernel::Avx512Vnni) {
          vnni::row_offsets(p.code_sums, w, K, n0, rows, K, offsets);
          vnni::gemm_block(xu, w, acc, NC, mc, K, rows, 0, K, false, offsets);
        } else {
          avx2::gemm_block(xq, w, acc, NC, mc, K, rows);
        }
        if (bf16_tiles && p.outlier_weight == nullptr) {
          amx_bf16::outlier_block(x_planes.data() + m0 * amx_bf16::chunks(n_cols) * amx_bf16::CHUNK, x_terms,
                                  plane_rows, cols, n_cols, w, K, mc, rows, w_bf16, outliers);
        } else if (collect && p.outlier_weight == nullptr) {
          vbmi2::outlier_rows(x_o.data() + m0 * n_cols, mc, n_cols, collected, code_stride, rows, outliers);
        } else if (by_pieces && p.outlier_weight == nullptr) {
          vnni::outlier_pieces(pieces, w, K, mc, rows, outliers);
        } else if (n_cols) {
          const OutlierWeight outlier_weight{p.w, p.outlier_weight, p.outlier_dtype};
          (kernel == Kernel::Avx2 ? outlier_block : vnni::outlier_block)(x_o.data() + m0 * n_cols, cols, n_cols,
                                                                          outlier_weight, n0, outliers, mc, K, rows, w_o);
        }
        float acc_scale[NC], outlier_scale[NC], b_n[NC];
        for (int64_t n = 0; n < rows; ++n) {
          acc_scale[n] = p.s_w[n0 + n] / (Q_MAX * Q_MAX);
          outlier_scale[n] = p.outlier_weight ? 1.0f : p.s_w[n0 + n] / Q_MAX;
          b_n[n] = p.bias ? load(p.bias, n0 + n, p.bias_dtype) : 0.0f;
        }
        for (int64_t n = rows; n < NC; ++n) acc_scale[n] = outlier_scale[n] = b_n[n] = 0.0f;
        float product[NC] = {};
        float value[NC];
        for (int64_t m = 0; m < mc; ++m) {
          if (n_cols)
            for (int64_t n = 0; n < rows; ++n) product[n] = outliers[m * NC + n] * outlier_scale[n];
          const __m256 s_x8 = _mm256_set1_ps(s_x[m0 + m]);
          for (int64_t n = 0; n < NC; n += 8) {  // the reference's order: acc * (s_x * (s_w / 127^2)) + product + b
            const __m256 acc8 = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + m * NC + n)));
            __m256 v = _mm256_add_ps(_mm256_mul_ps(acc8, _mm256_mul_ps(s_x8, _mm256_loadu_ps(acc_scale + n))),
                                     _mm256_loadu_ps(product + n));
            if (p.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(b_n + n));
            _mm256_storeu_ps(value + n, v);
          }
          store_row(p.y, (m0 + m) * N + n0, value, rows, a.x_dtype);
        }
      }
    }
  }
}

}  // namespace int8pass
