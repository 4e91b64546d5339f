// y = x W on the CPU for a group-wise INT4 or INT8 W, reading the packed codes (see qalora_jax/kernels/cpu_matmul.py).
//
// W[i, o] = scale[g, o] * q[i, o] + offset[g, o] for input i in group g; q is packed along the input axis, 8 four-bit
// codes a uint32 word (code k of word j, input 8j + k, in bits [4k, 4k + 4)) or 4 eight-bit codes (input 4j + k in
// byte k). The arrays come in strips of 16 output columns (cpu_matmul.py's `Strips`): codes [out / 16, words, 16],
// scale and offset [out / 16, groups, 16], so that one strip's codes are one contiguous run. Each row of x is
// quantized to int8 per block b of 16 inputs (x_i ~ a_b xq_i, a_b = max_{i in b} |x_i| / 127; a group whose size is
// not a multiple of 16 is one block), so that
//
//   y_o = sum_g ( scale[g, o] sum_{b in g} a_b sum_{i in b} xq_i q[i, o] + offset[g, o] sum_{i in g} x_i )
//
// and the inner sums are AVX512-VNNI byte dot products, a [4 x u8] lane of codes against a broadcast [4 x s8] quad
// of xq: for 4-bit codes the low nibbles of a word are the codes of the even inputs and the high nibbles those of
// the odd inputs; 8-bit codes are the word's bytes. Rows go eight at a time through one pass over the codes, and a
// wide layer's strips (or a long prompt's) are split in two halves, the second offered to XLA's intra-op thread
// pool.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "needs AVX512F, AVX512BW and AVX512-VNNI"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using qalora::both;

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // 16 float16 values
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Inputs a block of the activations' int8 quantization: 16, or the whole group when 16 does not divide it.
inline int64_t block_size(int64_t group) { return group % 16 ? group : 16; }

// Rows of x quantized to int8 per block, each in one buffer: for row r and packed word j the int8 quad its codes
// meet, lo[r * words + j] (4-bit: the word's even inputs, the order the codes' low nibbles hold them; 8-bit: its
// four inputs) and hi (4-bit: the odd inputs, the high nibbles'); the steps a_b of each block, step
// [r * blocks + b], and the float sums of each group, sum [r * groups + g].
struct Quantized {
  int64_t words, blocks, groups;
  std::vector<int32_t> lo, hi;
  std::vector<float> step, sum;
};

// One row's pointers into a Quantized.
struct Row {
  const int32_t *lo, *hi;
  const float *step, *sum;
};

// Rows [r0, r1) of x [rows, n_in] into q. Blocks of 16 inputs go 16 lanes at a time, other blocks one input at a
// time; the rounding is the same (nearest, ties to even).
template <int BITS>
void quantize_rows(const float* x, int64_t n_in, int64_t group, int64_t r0, int64_t r1, Quantized& q) {
  constexpr int per_word = 32 / BITS;
  const int64_t n_groups = n_in / group, block = block_size(group), group_words = group / per_word;
  const __m128i evens_odds = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * n_in;
    int32_t *lo = q.lo.data() + r * q.words, *hi = BITS == 4 ? q.hi.data() + r * q.words : nullptr;
    float* step = q.step.data() + r * q.blocks;
    for (int64_t g = 0; g < n_groups; ++g) {
      const float* xg = xr + g * group;
      const int64_t w0 = g * group_words;
      if (block == 16) {
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t i = 0; i < group; i += 16) {
          const __m512 v = _mm512_loadu_ps(xg + i);
          vsum = _mm512_add_ps(vsum, v);
          const float amax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
          step[(g * group + i) / 16] = amax / 127.f;
          const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f)));
          __m128i b = _mm512_cvtepi32_epi8(qi);  // |qi| <= 127: no truncation
          if (BITS == 4) {
            b = _mm_shuffle_epi8(b, evens_odds);  // the 8 even inputs (two words' lo), then the 8 odd ones
            _mm_storel_epi64(reinterpret_cast<__m128i*>(lo + w0 + i / 8), b);
            _mm_storel_epi64(reinterpret_cast<__m128i*>(hi + w0 + i / 8), _mm_unpackhi_epi64(b, b));
          } else {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + w0 + i / 4), b);
          }
        }
        q.sum[r * q.groups + g] = _mm512_reduce_add_ps(vsum);
      } else {  // the group is one block
        float amax = 0.f, sum = 0.f;
        for (int64_t i = 0; i < group; ++i) {
          amax = std::max(amax, std::fabs(xg[i]));
          sum += xg[i];
        }
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        step[g] = amax / 127.f;
        q.sum[r * q.groups + g] = sum;
        for (int64_t j = 0; j < group_words; ++j) {
          int8_t a[4], b[4];
          for (int k = 0; k < 4; ++k) {
            if (BITS == 4) {
              a[k] = static_cast<int8_t>(std::nearbyint(xg[8 * j + 2 * k] * inv));
              b[k] = static_cast<int8_t>(std::nearbyint(xg[8 * j + 2 * k + 1] * inv));
            } else {
              a[k] = static_cast<int8_t>(std::nearbyint(xg[4 * j + k] * inv));
            }
          }
          std::memcpy(&lo[w0 + j], a, 4);
          if (BITS == 4) std::memcpy(&hi[w0 + j], b, 4);
        }
      }
    }
  }
}

// y[r] for R rows and the 16-column strips [s0, s1): each strip's codes are one contiguous run (the strip
// layout, codes [out / 16, words, 16], scale and offset [out / 16, groups, 16]), read once for all R rows; the
// strip's sums stay in registers across its groups. A group's blocks are summed in t = sum_b a_b dot_b, then
// scaled once. C dot-product chains a row: two for few rows (even and odd inputs, or words), so that one row alone
// does not wait on one chain; one for many, whose rows are chains enough.
template <typename S, int BITS, int R>
void strips(const Row* q, const uint32_t* codes, const S* scale, const S* offset, float* const* y, int64_t n_in,
            int64_t group, int64_t s0, int64_t s1) {
  constexpr int C = R >= 8 ? 1 : 2;
  const int64_t n_groups = n_in / group, block = block_size(group), blocks_a_group = group / block;
  const int64_t block_words = block / (32 / BITS), words = n_in / (32 / BITS);
  const __m512i nibble = _mm512_set1_epi32(0x0F0F0F0F);
  for (int64_t s = s0; s < s1; ++s) {
    const uint32_t* w_s = codes + s * words * 16;
    const S *scale_s = scale + s * n_groups * 16, *offset_s = offset + s * n_groups * 16;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; ++g) {
      __m512 t[R];
      for (int r = 0; r < R; ++r) t[r] = _mm512_setzero_ps();
      for (int64_t b = g * blocks_a_group; b < (g + 1) * blocks_a_group; ++b) {
        __m512i dot[R][C];
        for (int r = 0; r < R; ++r)
          for (int c = 0; c < C; ++c) dot[r][c] = _mm512_setzero_si512();
        for (int64_t j = b * block_words; j < (b + 1) * block_words; ++j) {
          const __m512i w = _mm512_loadu_si512(w_s + j * 16);
          if (BITS == 4) {
            const __m512i lo = _mm512_and_si512(w, nibble), hi = _mm512_and_si512(_mm512_srli_epi32(w, 4), nibble);
            for (int r = 0; r < R; ++r) {
              dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], lo, _mm512_set1_epi32(q[r].lo[j]));
              dot[r][C - 1] = _mm512_dpbusd_epi32(dot[r][C - 1], hi, _mm512_set1_epi32(q[r].hi[j]));
            }
          } else {
            for (int r = 0; r < R; ++r)
              dot[r][j % C] = _mm512_dpbusd_epi32(dot[r][j % C], w, _mm512_set1_epi32(q[r].lo[j]));
          }
        }
        for (int r = 0; r < R; ++r) {
          const __m512i d = C == 1 ? dot[r][0] : _mm512_add_epi32(dot[r][0], dot[r][C - 1]);
          t[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r].step[b]), _mm512_cvtepi32_ps(d), t[r]);
        }
      }
      const __m512 sc = load16(scale_s + g * 16), of = load16(offset_s + g * 16);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_fmadd_ps(sc, t[r], acc[r]);
        acc[r] = _mm512_fmadd_ps(of, _mm512_set1_ps(q[r].sum[g]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(y[r] + s * 16, acc[r]);
  }
}

// One weight of a call and its output: strips [first, first + n) of the call's strips.
template <typename S>
struct Weight {
  const uint32_t* codes;
  const S *scale, *offset;
  float* y;
  int64_t first, n;
};

// The call's strips [a, b) for rows [r0, r0 + R).
template <typename S, int BITS, int R>
void tile(const std::vector<Weight<S>>& weights, const Row* q, int64_t r0, int64_t n_in, int64_t group, int64_t a,
          int64_t b) {
  for (const Weight<S>& w : weights) {
    const int64_t lo = std::max(a, w.first) - w.first, hi = std::min(b, w.first + w.n) - w.first;
    if (lo >= hi) continue;
    float* ys[R];
    for (int r = 0; r < R; ++r) ys[r] = w.y + (r0 + r) * w.n * 16;
    strips<S, BITS, R>(q + r0, w.codes, w.scale, w.offset, ys, n_in, group, lo, hi);
  }
}

// y_w = x W_w for every weight w of the call (weights that read the same x, such as q/k/v: x is quantized
// once). The rows go eight, then four, then one at a time through each pass over a run of strips small enough
// to stay in the L1 cache. A wide call's strips, or a long prompt's, are split in two halves, the second
// offered to XLA's thread pool (a prompt's quantization too).
template <typename S, int BITS>
void matmul(ffi::ThreadPool& pool, const float* x, const std::vector<Weight<S>>& weights, int64_t rows,
            int64_t n_in, int64_t group) {
  constexpr int per_word = 32 / BITS;
  const int64_t words = n_in / per_word, blocks = n_in / block_size(group), groups = n_in / group;
  const bool threads = pool.num_threads() > 1;
  Quantized q{words, blocks, groups, std::vector<int32_t>(rows * words),
              std::vector<int32_t>(BITS == 4 ? rows * words : 0), std::vector<float>(rows * blocks),
              std::vector<float>(rows * groups)};
  if (threads && rows >= 16) {
    both(pool, [&] { quantize_rows<BITS>(x, n_in, group, 0, rows / 2, q); },
         [&] { quantize_rows<BITS>(x, n_in, group, rows / 2, rows, q); });
  } else {
    quantize_rows<BITS>(x, n_in, group, 0, rows, q);
  }
  std::vector<Row> row(rows);
  for (int64_t r = 0; r < rows; ++r)
    row[r] = {q.lo.data() + r * words, BITS == 4 ? q.hi.data() + r * words : nullptr, q.step.data() + r * blocks,
              q.sum.data() + r * groups};
  const int64_t n_strips = weights.back().first + weights.back().n;
  const int64_t run = std::max<int64_t>(1, 16384 / (words * 64));  // strips whose codes fit in 16 KB
  auto part = [&](int64_t a, int64_t b) {  // the call's strips [a, b), all rows
    for (int64_t s = a; s < b; s += run) {
      const int64_t e = std::min(b, s + run);
      int64_t r0 = 0;
      for (; r0 + 8 <= rows; r0 += 8) tile<S, BITS, 8>(weights, row.data(), r0, n_in, group, s, e);
      for (; r0 + 4 <= rows; r0 += 4) tile<S, BITS, 4>(weights, row.data(), r0, n_in, group, s, e);
      for (; r0 < rows; ++r0) tile<S, BITS, 1>(weights, row.data(), r0, n_in, group, s, e);
    }
  };
  // Split only calls worth a task: a wide weight, or many rows.
  if (threads && rows * n_in * n_strips * 16 >= (1 << 18)) {
    const int64_t half = n_strips / 2;
    both(pool, [&] { part(0, half); }, [&] { part(half, n_strips); });
  } else {
    part(0, n_strips);
  }
}

// x [rows, in] and, for each weight, its codes [out / 16, in / (32 / bits), 16], scale and offset [out / 16,
// groups, 16] (the remaining arguments, three a weight); one result [rows, out] a weight.
template <ffi::DataType T, typename S>
ffi::Error IntMatmulQ8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                       ffi::RemainingRets rets, int64_t group, int64_t bits) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D");
  if (bits != 4 && bits != 8) return ffi::Error::InvalidArgument("bits must be 4 or 8");
  const int64_t rows = xd[0], n_in = xd[1], per_word = 32 / bits;
  if (group % per_word || n_in % group)
    return ffi::Error::InvalidArgument("needs whole words a group, in % group == 0");
  if (args.size() == 0 || args.size() != 3 * rets.size())
    return ffi::Error::InvalidArgument("needs codes, scale and offset for each result");
  std::vector<Weight<S>> weights;
  int64_t first = 0;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto codes = args.get<ffi::Buffer<ffi::U32>>(3 * i);
    auto scale = args.get<ffi::Buffer<T>>(3 * i + 1);
    auto offset = args.get<ffi::Buffer<T>>(3 * i + 2);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (!codes || !scale || !offset || !y) return ffi::Error::InvalidArgument("a weight's arrays have the wrong type");
    const auto cd = codes->dimensions();
    if (cd.size() != 3 || cd[1] * per_word != n_in || cd[2] != 16)
      return ffi::Error::InvalidArgument("codes must be [out / 16, in / (32 / bits), 16]");
    weights.push_back({codes->typed_data(), reinterpret_cast<const S*>(scale->typed_data()),
                       reinterpret_cast<const S*>(offset->typed_data()), (*y)->typed_data(), first, cd[0]});
    first += cd[0];
  }
  if (bits == 4) {
    matmul<S, 4>(pool, x.typed_data(), weights, rows, n_in, group);
  } else {
    matmul<S, 8>(pool, x.typed_data(), weights, rows, n_in, group);
  }
  return ffi::Error::Success();
}

}  // namespace

#define QALORA_BIND(T)                                                                                         \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets().Attr<   \
      int64_t>("group").Attr<int64_t>("bits")

XLA_FFI_DEFINE_HANDLER_SYMBOL(qalora_cpu_matmul_f32, (IntMatmulQ8<ffi::F32, float>), QALORA_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(qalora_cpu_matmul_f16, (IntMatmulQ8<ffi::F16, uint16_t>), QALORA_BIND(ffi::F16));
