// Float32 training products with a group-wise INT4 or INT8 weight on the CPU: y = x W~ and dx = dy W~^T, the
// weight dequantized while it is packed (see qalora_jax/kernels/cpu_gemm.py).
//
// W~[i, o] = scale[g, o] * q[i, o] + offset[g, o] for input i in group g, q packed along the input axis, 8
// four-bit or 4 eight-bit codes a uint32 word (input 8j + k in bits [4k, 4k + 4) of word j, or 4j + k in byte
// k): codes [in / (32 / bits), out], scale and offset [groups, out] in float32. A product C [M, N] = A [M, K]
// B [K, N] runs as a blocked GEMM in the manner of Goto and van de Geijn: B is packed (dequantized) a block of
// KC rows at a time into panels [KC][32] of 32 columns, A into panels [KC][14] of 14 rows, and a 14 x 32 tile of
// C is 28 AVX512 accumulators, each step k one broadcast of A's 14 values against B's two vectors. For y = x W~,
// B[k, n] = W~[k, n] (a panel row is 32 outputs of one input, one shift of 32 code words); for dx = dy W~^T,
// B[k, n] = W~[n, k] (a panel row is 32 inputs of one output, the bytes of its 4 or 8 code words spread to 32
// values). The work goes out as tasks (blocks of A's rows to pack, then about eight blocks of C's columns) that
// this thread and XLA's intra-op pool take in turn, so that a pool thread busy with another op delays nothing.
// Where the CPU has AMX and the call asks for it (`tiles`), `gemm_amx` runs the same products on AMX's bfloat16
// tiles at float32 precision.
#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "needs AVX512F and AVX512BW"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_amx.h"
#include "cpu_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t MR = 14, NR = 32;  // a tile of C: 14 rows, 32 columns (two vectors)
constexpr int64_t KC = 256;          // B is packed about KC rows at a time (a panel: 32 KB)
constexpr int64_t MB = 518;          // rows whose packed A is shared by the column tasks (37 panels)

struct Weight {
  const uint32_t* codes;  // [in / (32 / bits), out]
  const float *scale, *offset;  // [groups, out]
  int64_t in, out, group;
};

// 64-byte aligned float buffers that stay with their thread (XLA's pool threads live as long as the process):
// 0 a task's B panels, 1 the A panels a call's tasks share.
float* scratch(int which, int64_t floats) {
  thread_local std::vector<float> buffers[2];
  auto& b = buffers[which];
  if (static_cast<int64_t>(b.size()) < floats + 16) b.resize(floats + 16);
  return b.data() + (-reinterpret_cast<uintptr_t>(b.data()) / sizeof(float) & 15);
}

// Columns [n0, n0 + 32) of W~'s rows [k0, k0 + kc), row k given as row(k, its columns 0-15, 16-31); columns
// past `out` are zeros.
template <int BITS, typename Row>
void weight_rows(const Weight& w, int64_t k0, int64_t kc, int64_t n0, Row&& row) {
  constexpr int per_word = 32 / BITS;
  const int64_t valid = std::min<int64_t>(NR, w.out - n0);
  const __mmask16 m0 = valid >= 16 ? 0xFFFF : (1u << valid) - 1;
  const __mmask16 m1 = valid >= 32 ? 0xFFFF : valid > 16 ? (1u << (valid - 16)) - 1 : 0;
  const __m512i code = _mm512_set1_epi32((1 << BITS) - 1);
  for (int64_t k = 0; k < kc; ++k) {
    const int64_t i = k0 + k, g = i / w.group;
    const uint32_t* c = w.codes + (i / per_word) * w.out + n0;
    const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(BITS * (i % per_word)));
    const float *s = w.scale + g * w.out + n0, *o = w.offset + g * w.out + n0;
    const __m512i u0 = _mm512_maskz_loadu_epi32(m0, c), u1 = _mm512_maskz_loadu_epi32(m1, c + 16);
    const __m512 q0 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(u0, shift), code));
    const __m512 q1 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(u1, shift), code));
    row(k, _mm512_fmadd_ps(q0, _mm512_maskz_loadu_ps(m0, s), _mm512_maskz_loadu_ps(m0, o)),
        _mm512_fmadd_ps(q1, _mm512_maskz_loadu_ps(m1, s + 16), _mm512_maskz_loadu_ps(m1, o + 16)));
  }
}

// Four code words of output o from word row r on, `out` apart, as 16 bytes.
inline __m128i words4(const uint32_t* c, int64_t out, int64_t o) {
  return _mm_set_epi32(static_cast<int>(c[3 * out + o]), static_cast<int>(c[2 * out + o]),
                       static_cast<int>(c[out + o]), static_cast<int>(c[o]));
}

// Inputs [n0, n0 + 32) of W~'s columns (outputs) [k0, k0 + kc) as rows: row k is W~[n0 : n0 + 32, k0 + k], from
// the 16 bytes of four 4-bit code words (a byte: inputs 2b, 2b + 1 in its low and high nibble) or the 32 bytes of
// eight 8-bit ones, given as row(k, inputs 0-15, 16-31). Needs in % 32 == 0 and group % 16 == 0.
template <int BITS, typename Row>
void weight_rows_transposed(const Weight& w, int64_t k0, int64_t kc, int64_t n0, Row&& row) {
  const uint32_t* c = w.codes + n0 / (32 / BITS) * w.out;
  const int64_t g0 = n0 / w.group, g1 = (n0 + 16) / w.group;
  const __m128i low = _mm_set1_epi8(15);
  for (int64_t k = 0; k < kc; ++k) {
    const int64_t o = k0 + k;
    __m128i first, second;  // the codes of inputs 0-15 and 16-31 as bytes
    if constexpr (BITS == 4) {
      const __m128i bytes = words4(c, w.out, o);
      const __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
      first = _mm_unpacklo_epi8(lo, hi);
      second = _mm_unpackhi_epi8(lo, hi);
    } else {
      first = words4(c, w.out, o);
      second = words4(c + 4 * w.out, w.out, o);
    }
    const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(first));
    const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(second));
    row(k, _mm512_fmadd_ps(q0, _mm512_set1_ps(w.scale[g0 * w.out + o]), _mm512_set1_ps(w.offset[g0 * w.out + o])),
        _mm512_fmadd_ps(q1, _mm512_set1_ps(w.scale[g1 * w.out + o]), _mm512_set1_ps(w.offset[g1 * w.out + o])));
  }
}

// r[j] <- column j of the 16 x 16 block r (rows in order), in four rounds of shuffles.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    for (int j = 0; j < 2; ++j) {
      const __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + j + 2]);
      r[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// Rows [m0, m1) of a [.., lda] and its columns [k0, k0 + kc) into panels [kc][14], rows past m1 zeros.
void pack_rows(const float* a, int64_t lda, int64_t m0, int64_t m1, int64_t k0, int64_t kc, float* dst) {
  for (int64_t p = m0; p < m1; p += MR, dst += kc * MR) {
    const int64_t rows = std::min(MR, m1 - p);
    int64_t k = 0;
    for (; k + 16 <= kc; k += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_loadu_ps(a + (p + i) * lda + k0 + k) : _mm512_setzero_ps();
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_mask_storeu_ps(dst + (k + j) * MR, (1u << MR) - 1, r[j]);
    }
    for (; k < kc; ++k)
      for (int64_t i = 0; i < MR; ++i) dst[k * MR + i] = i < rows ? a[(p + i) * lda + k0 + k] : 0.f;
  }
}

// c[14 x 32] (+)= a[kc][14] b[kc][32], c's rows ldc floats apart.
template <bool ACCUMULATE>
inline void tile(const float* __restrict a, const float* __restrict b, int64_t kc, float* c, int64_t ldc) {
  __m512 acc[MR][2];
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, a += MR, b += NR) {
    _mm_prefetch(reinterpret_cast<const char*>(a + 16 * MR), _MM_HINT_T0);  // A streams from L2, B stays in L1
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 14
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (ACCUMULATE) {
      acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_loadu_ps(ci));
      acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_loadu_ps(ci + 16));
    }
    _mm512_storeu_ps(ci, acc[i][0]);
    _mm512_storeu_ps(ci + 16, acc[i][1]);
  }
}

// One tile of C at (r, n), `rows` x `cols` of it inside C: a whole tile in place, a partial one through a copy.
void tile_at(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, int64_t rows, int64_t cols,
             bool accumulate) {
  if (rows == MR && cols == NR) {
    accumulate ? tile<true>(a, b, kc, c, ldc) : tile<false>(a, b, kc, c, ldc);
    return;
  }
  alignas(64) float t[MR * NR];
  for (int64_t i = 0; i < rows && accumulate; ++i) std::memcpy(t + i * NR, c + i * ldc, cols * sizeof(float));
  accumulate ? tile<true>(a, b, kc, t, NR) : tile<false>(a, b, kc, t, NR);
  for (int64_t i = 0; i < rows; ++i) std::memcpy(c + i * ldc, t + i * NR, cols * sizeof(float));
}

// C [M, N] = A [M, K] B for B's rows [k0, k0 + kc), columns [n, n + 32) given by `b_rows(k0, kc, n, row)`. Rows go
// MB at a time: their A is packed (row panels shared out as tasks), then each task computes a block of columns for
// all of them, packing its B a block of kc rows at a time into panels [kc][32], so no B panel is packed twice for
// the same rows.
template <typename Pool, typename Rows>
void gemm(Pool& pool, const float* a, int64_t M, int64_t K, int64_t N, float* c, const Rows& b_rows) {
  const int64_t blocks = (K + KC - 1) / KC, kc_max = (K + blocks - 1) / blocks;
  const int64_t width = std::max(NR, ((N + 7) / 8 + NR - 1) / NR * NR);  // about 8 column tasks
  const int64_t n_tasks = (N + width - 1) / width;
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t rows = std::min(MB, M - mb), panels = (rows + MR - 1) / MR;
    float* pa = scratch(1, panels * MR * K);
    qalora::tasks(pool, (panels + 3) / 4, [&](int64_t t) {  // [K block][panel][kc][14]: a block's panels in turn
      const int64_t m0 = mb + 4 * t * MR, m1 = std::min(mb + rows, m0 + 4 * MR);
      for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, K - k0);
        pack_rows(a, K, m0, m1, k0, kc, pa + k0 * panels * MR + 4 * t * MR * kc);
      }
    });
    qalora::tasks(pool, n_tasks, [&](int64_t t) {
      const int64_t n0 = t * width, n1 = std::min(N, n0 + width);
      float* pb = scratch(0, width * kc_max);
      for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, K - k0);
        for (int64_t n = n0; n < n1; n += NR) {
          float* panel = pb + (n - n0) * kc;
          b_rows(k0, kc, n, [panel](int64_t k, __m512 r0, __m512 r1) {
            _mm512_store_ps(panel + k * NR, r0);
            _mm512_store_ps(panel + k * NR + 16, r1);
          });
        }
        for (int64_t n = n0; n < n1; n += NR)  // a B panel stays in L1 while every A panel goes by
          for (int64_t p = 0; p < panels; ++p)
            tile_at(pa + k0 * panels * MR + p * MR * kc, pb + (n - n0) * kc, kc, c + (mb + p * MR) * N + n, N,
                    std::min(MR, rows - p * MR), std::min(NR, n1 - n), k0 > 0);
      }
    });
  }
}

#ifdef __AMX_BF16__
// The same products on AMX's bfloat16 tiles, at float32 precision. A float32 value splits exactly into three
// bfloat16 ones, a = a0 + a1 + a2, each the nearest bfloat16 to what is left (|a1| <= 2^-8 |a|, |a2| <= 2^-16 |a|;
// a2 has at most 8 significant bits), and a b is the sum of the six products a_i b_j with i + j <= 2 up to
// |a1 b2 + a2 b1 + a2 b2| <= 2^-23 |a b|, two units of float32's rounding of one product. A tile product multiplies
// bfloat16 pairs exactly and sums in float32, so C = A0 B0 + A0 B1 + A1 B0 + A0 B2 + A2 B0 + A1 B1 is a float32
// GEMM's result up to that term and the order of its sums, each part product rounding into them (against float64:
// tests/test_cpu_gemm.py, experiments/perf/matmul_shapes.md), at six tile products where AVX512 does one FMA a
// value. A is packed a 16 x 32 tile at a time [16 rows][32-step][part][16][32], B a 32-column panel at a
// time [16-column half][32-step][part][16 pairs of rows][16][2] (AMX's layout for B) from the rows `weight_rows`
// gives; C is computed 32 x 32 at a time in four accumulator tiles, over the whole K: storing the tiles waits for
// every product in flight (at K blocks of 128 that cost half the rate).
constexpr int64_t A_BYTES = 1 << 21;  // the packed A of a block of rows (the whole K, three parts): in L2
// The longest sum the tiles take (longer ones run with AVX512 FMAs): each of the six part products rounds into it,
// and B is packed again for each block of rows. The head's input gradient (K = 8192) ran both slower and with 4x
// the error on the tiles.
constexpr int64_t AMX_K = 2048;

// x as float32 rounded to the nearest bfloat16 (ties to even).
inline __m512 bf16_round(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// x = part[0] + part[1] + part[2], each a bfloat16 value held as float32.
inline void split3(__m512 x, __m512 part[3]) {
  part[0] = bf16_round(x);
  const __m512 rest = _mm512_sub_ps(x, part[0]);
  part[1] = bf16_round(rest);
  part[2] = _mm512_sub_ps(rest, part[1]);  // at most 8 significant bits: a bfloat16 already
}

// The 32 bfloat16 words of two vectors of bfloat16-valued floats: `index` picks their high halves.
inline __m512i bf16_words(__m512 a, __m512 b, __m512i index) {
  return _mm512_permutex2var_epi16(_mm512_castps_si512(a), index, _mm512_castps_si512(b));
}

// Rows [m0, m_end) of a [.., lda] and its columns [0, kc) as tiles [16 rows][kc / 32][part][16][32]; rows from m1
// on and columns from k1 on are zeros (kc and m_end - m0 multiples of 32 and 16).
void pack_rows_amx(const float* a, int64_t lda, int64_t m0, int64_t m_end, int64_t m1, int64_t kc, int64_t k1,
                   uint16_t* dst) {
  alignas(64) static const uint16_t order[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                                 33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  const __m512i index = _mm512_load_si512(order);
  const int64_t steps = kc / 32;
  for (int64_t r = m0; r < m_end; r += 16, dst += 16 * kc * 3) {
    for (int64_t i = 0; i < 16; ++i) {
      const float* row = a + (r + i) * lda;
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t k = 32 * s, left = r + i < m1 ? std::max<int64_t>(0, k1 - k) : 0;
        const __mmask16 m_lo = left >= 16 ? 0xFFFF : (1u << left) - 1;
        const __mmask16 m_hi = left >= 32 ? 0xFFFF : left > 16 ? (1u << (left - 16)) - 1 : 0;
        __m512 lo[3], hi[3];
        split3(_mm512_maskz_loadu_ps(m_lo, row + k), lo);
        split3(_mm512_maskz_loadu_ps(m_hi, row + k + 16), hi);
        for (int p = 0; p < 3; ++p)
          _mm512_store_si512(dst + ((s * 3 + p) * 16 + i) * 32, bf16_words(lo[p], hi[p], index));
      }
    }
  }
}

// Rows 2j and 2j + 1 of step s of a B panel (each as its columns 0-15 and 16-31) into its tiles [16-column half]
// [step][part][16 pairs][16][2] at dst.
inline void pair_to_amx(const __m512 even[2], const __m512 odd[2], int64_t s, int64_t steps, int64_t j,
                        uint16_t* dst) {
  alignas(64) static const uint16_t order[32] = {1,  33, 3,  35, 5,  37, 7,  39, 9,  41, 11, 43, 13, 45, 15, 47,
                                                 17, 49, 19, 51, 21, 53, 23, 55, 25, 57, 27, 59, 29, 61, 31, 63};
  const __m512i index = _mm512_load_si512(order);  // pairs: column n of row 2j, then of row 2j + 1
  for (int64_t h = 0; h < 2; ++h) {
    __m512 e[3], o[3];
    split3(even[h], e);
    split3(odd[h], o);
    uint16_t* out = dst + ((h * steps + s) * 3 * 16 + j) * 32;
    for (int p = 0; p < 3; ++p) _mm512_store_si512(out + p * 16 * 32, bf16_words(e[p], o[p], index));
  }
}

// c[32 x 32] = the six part products of A's tiles (two 16-row blocks, `a_step` words apart) and B's (two
// 16-column halves, `b_half` words apart), over kc / 32 steps; c's rows ldc floats apart.
void block_amx(const uint16_t* a, int64_t a_step, const uint16_t* b, int64_t b_half, int64_t steps, float* c,
               int64_t ldc) {
  const int64_t stride = ldc * sizeof(float);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  constexpr int64_t tile = 16 * 32;  // words
  for (int64_t s = 0; s < steps; ++s, a += 3 * tile, b += 3 * tile) {
    // (i, j) pairs: (0, 0) (0, 1) (0, 2) (1, 0) (1, 1) (2, 0), the A part loaded once for its B parts
    for (int i = 0; i < 3; ++i) {
      _tile_loadd(4, a + i * tile, 64);
      _tile_loadd(5, a + a_step + i * tile, 64);
      for (int j = 0; j + i < 3; ++j) {
        _tile_loadd(6, b + j * tile, 64);
        _tile_loadd(7, b + b_half + j * tile, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, c, stride);
  _tile_stored(1, c + 16, stride);
  _tile_stored(2, c + 16 * ldc, stride);
  _tile_stored(3, c + 16 * ldc + 16, stride);
}

// `gemm` on the tiles for K <= AMX_K: rows `rows_max` at a time (their A packed as tasks), then the column tasks,
// each packing a 32-column panel of B over the whole K and running every 32-row block of A past it.
template <typename Pool, typename Rows>
void gemm_amx(Pool& pool, const float* a, int64_t M, int64_t K, int64_t N, float* c, const Rows& b_rows) {
  const int64_t kc = (K + 31) / 32 * 32, steps = kc / 32, tile_words = 16 * kc * 3;  // 16 rows (columns) of A (B)
  const int64_t width = std::max(NR, ((N + 7) / 8 + NR - 1) / NR * NR);
  const int64_t n_tasks = (N + width - 1) / width;
  constexpr int64_t RB = 32;  // rows of a C block
  const int64_t rows_max = std::clamp<int64_t>(A_BYTES / (6 * kc) / 32 * 32, 32, 512);
  for (int64_t mb = 0; mb < M; mb += rows_max) {
    const int64_t rows = std::min(rows_max, M - mb), blocks_m = (rows + RB - 1) / RB, padded = blocks_m * RB;
    uint16_t* pa = reinterpret_cast<uint16_t*>(scratch(1, padded * kc * 3 / 2));
    qalora::tasks(pool, (blocks_m + 1) / 2, [&](int64_t t) {  // [16 rows][step][part][16][32]
      const int64_t m0 = mb + 2 * t * RB, m_end = std::min(m0 + 2 * RB, mb + padded);
      pack_rows_amx(a, K, m0, m_end, mb + rows, kc, K, pa + (m0 - mb) * kc * 3);
    });
    qalora::tasks(pool, n_tasks, [&](int64_t t) {
      const int64_t n0 = t * width, n1 = std::min(N, n0 + width);
      uint16_t* pb = reinterpret_cast<uint16_t*>(scratch(0, tile_words));
      const qalora::Tiles configured;
      for (int64_t n = n0; n < n1; n += NR) {
        for (int64_t s = 0; s < steps; ++s) {
          const int64_t k0 = 32 * s, rows_b = std::min<int64_t>(K - k0, 32);
          if (rows_b < 32)  // rows past K are zeros
            for (int64_t h = 0; h < 2; ++h) std::memset(pb + (h * steps + s) * 3 * 512, 0, 3 * 1024);
          __m512 even[2];
          b_rows(k0, rows_b, n, [&](int64_t k, __m512 r0, __m512 r1) {
            const __m512 odd[2] = {r0, r1}, zeros[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
            if (k % 2) {
              pair_to_amx(even, odd, s, steps, k / 2, pb);
            } else {
              even[0] = r0, even[1] = r1;
              if (k + 1 == rows_b) pair_to_amx(even, zeros, s, steps, k / 2, pb);
            }
          });
        }
        const int64_t cols = std::min(NR, n1 - n);
        for (int64_t p = 0; p < blocks_m; ++p) {
          const uint16_t* ap = pa + p * RB * kc * 3;
          const int64_t r = std::min(RB, rows - p * RB);
          float* cp = c + (mb + p * RB) * N + n;
          if (r == RB && cols == NR) {
            block_amx(ap, tile_words, pb, tile_words, steps, cp, N);
          } else {
            alignas(64) float tmp[RB * NR];
            block_amx(ap, tile_words, pb, tile_words, steps, tmp, NR);
            for (int64_t i = 0; i < r; ++i) std::memcpy(cp + i * N, tmp + i * NR, cols * sizeof(float));
          }
        }
      }
    });
  }
}
#endif

// transpose 0: y [rows, out] = x [rows, in] W~; transpose 1: y [rows, in] = x [rows, out] W~^T. B's rows come
// from the codes as the products take them (`weight_rows`, `weight_rows_transposed`).
template <int BITS, typename Pool>
void product(Pool& pool, const float* x, int64_t rows, const Weight& w, bool transpose, float* y, bool tiles) {
  const auto b_rows = [&](int64_t k0, int64_t kc, int64_t n, auto&& row) {
    transpose ? weight_rows_transposed<BITS>(w, k0, kc, n, row) : weight_rows<BITS>(w, k0, kc, n, row);
  };
  const int64_t K = transpose ? w.out : w.in, N = transpose ? w.in : w.out;
#ifdef __AMX_BF16__
  if (tiles && K <= AMX_K && qalora::amx_permitted()) return gemm_amx(pool, x, rows, K, N, y, b_rows);
#endif
  gemm(pool, x, rows, K, N, y, b_rows);
}

ffi::Error IntGemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> codes,
                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> y,
                   int64_t group, int64_t bits, int64_t transpose, int64_t tiles) {
  const auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2) return ffi::Error::InvalidArgument("needs 2-D arrays");
  if (bits != 4 && bits != 8) return ffi::Error::InvalidArgument("bits must be 4 or 8");
  const Weight w{codes.typed_data(), scale.typed_data(), offset.typed_data(), cd[0] * (32 / bits), cd[1], group};
  if (w.in % 32 || group % 16 || sd[0] * group < w.in || sd[1] != w.out)
    return ffi::Error::InvalidArgument("needs in % 32 == 0, group % 16 == 0, scale [groups, out]");
  if (xd[1] != (transpose ? w.out : w.in)) return ffi::Error::InvalidArgument("x must be [rows, in] ([rows, out])");
  (bits == 4 ? product<4, ffi::ThreadPool> : product<8, ffi::ThreadPool>)(pool, x.typed_data(), xd[0], w, transpose,
                                                                           y->typed_data(), tiles != 0);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(qalora_cpu_gemm, IntGemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("transpose")
                                  .Attr<int64_t>("tiles"));
