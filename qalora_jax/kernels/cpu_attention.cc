// Attention on the CPU, out = softmax(q k^T / sqrt(d) + mask) v per query head, float32 (see
// qalora_jax/kernels/cpu_attention.py):
//
// - qalora_cpu_attention: decoding, a few queries against a KV cache as it lies;
// - qalora_cpu_attention_fwd / _bwd: training and prompts, the whole sequence with its backward pass.
//
// q [b, t, h, d]; k, v [b, S, K, d], query head n reading KV head n / (h / K). Query i sits at slot index + i and
// sees key slot j iff key_mask[b, j], j <= index + i and (window == 0 or index + i - j < window). A query that
// sees no key gets, from the decoding kernel, the mean of all S values (what the dense form's uniform softmax
// over masked scores gives), and from the training kernel zeros.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_amx.h"
#include "cpu_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// a . b over n floats; n a multiple of 16 runs in 512-bit lanes (every CPU the library builds for has them).
inline float dot(const float* a, const float* b, int64_t n) {
  if (n % 16) {
    float s = 0.f;
    for (int64_t e = 0; e < n; ++e) s += a[e] * b[e];
    return s;
  }
  __m512 acc = _mm512_setzero_ps();
  for (int64_t e = 0; e < n; e += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + e), _mm512_loadu_ps(b + e), acc);
  return _mm512_reduce_add_ps(acc);
}

ffi::Error CpuAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::PRED> key_mask, ffi::BufferR0<ffi::S32> index,
                        ffi::ResultBuffer<ffi::F32> out, int64_t window) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || kd[3] != qd[3] || qd[2] % kd[2] || kd[0] != qd[0])
    return ffi::Error::InvalidArgument("needs q [b, t, h, d] and k, v [b, S, K, d] with h % K == 0");
  const int64_t b = qd[0], t = qd[1], h = qd[2], d = qd[3], S = kd[1], K = kd[2], group = h / K;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const int64_t first = static_cast<int64_t>(index.typed_data()[0]);
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const bool* mp = key_mask.typed_data();
  float* op = out->typed_data();
  std::vector<float> p(S);
  std::vector<char> seen(S);
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t i = 0; i < t; ++i) {
      const int64_t slot = first + i;
      int64_t visible = 0;
      for (int64_t j = 0; j < S; ++j) {
        seen[j] = mp[bi * S + j] && j <= slot && (window == 0 || slot - j < window);
        visible += seen[j];
      }
      for (int64_t n = 0; n < h; ++n) {
        const float* qn = qp + ((bi * t + i) * h + n) * d;
        const int64_t kv = n / group;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < S; ++j) {
          if (visible && !seen[j]) continue;
          p[j] = visible ? dot(qn, kp + ((bi * S + j) * K + kv) * d, d) * scale : 0.f;
          m = std::max(m, p[j]);
        }
        float l = 0.f;
        float* on = op + ((bi * t + i) * h + n) * d;
        std::fill(on, on + d, 0.f);
        for (int64_t j = 0; j < S; ++j) {
          if (visible && !seen[j]) continue;
          const float w = std::exp(p[j] - m);
          l += w;
          const float* vj = vp + ((bi * S + j) * K + kv) * d;
          for (int64_t e = 0; e < d; ++e) on[e] += w * vj[e];
        }
        for (int64_t e = 0; e < d; ++e) on[e] /= l;
      }
    }
  }
  return ffi::Error::Success();
}

// ---- Training: the whole sequence, forward and backward (the FlashAttention recipe, one row tile at a time) ----
//
// Each (batch row, KV head) is a unit whose query rows are the (position, head) pairs of its h / K query heads.
// Rows go R at a time; a tile's scores against every key it may see, [R, keys], are one buffer (never [t, S]):
//
//   forward:  s = q k^T / sqrt(d) (masked: -inf), m = rowmax s, p = exp(s - m), l = rowsum p,
//             out = p v / l,  lse = m + log l
//   backward: p = exp(s - lse), dp = dout v^T, ds = p (dp - rowsum(dout * out)) / sqrt(d),
//             dq = ds k,  dk += ds^T q,  dv += p^T dout
//
// The tiles of all units are split between two threads by their number of keys; each thread accumulates dk and
// dv in its own buffer, summed at the end.
//
// The five products take float32 operands (FMA), or with `bf16` bfloat16 ones (vdpbf16ps, which adds
// x0 y0 + x1 y1 to each float32 lane): q, k, v, dout, p and ds rounded to bfloat16 (to nearest even), sums,
// softmax and outputs in float32. A product's contraction runs over 32-bit units: one float32, or a bfloat16
// pair along the contraction; T is the operand type, PER<T> its elements a unit.

constexpr int R = 12;  // rows a tile (of the FMA and vdpbf16ps products)
constexpr int MAX_ROWS = 64;  // rows a tile of any path
constexpr int RB = 6;  // rows a block of `weighted_rows`
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
using bfloat16 = uint16_t;

template <typename T>
constexpr int PER = sizeof(float) / sizeof(T);

inline __m512 fmadd(__m512 a, __m512 b, float c) { return _mm512_fmadd_ps(a, b, _mm512_set1_ps(c)); }

// acc + a . b per float32 lane: over one float32 (T = float) or one bfloat16 pair (T = bfloat16).
template <typename T>
inline __m512 madd(__m512 acc, __m512 a, __m512 b) {
  if constexpr (PER<T> == 1) {
    return _mm512_fmadd_ps(a, b, acc);
  } else {
#ifdef __AVX512BF16__
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
    static_assert(PER<T> == 1, "bfloat16 products need AVX512-BF16");
#endif
  }
}

// 16 units from p; one unit at p in all 16 lanes.
inline __m512 units(const void* p) { return _mm512_loadu_ps(p); }
inline __m512 unit(const void* p) {
  int32_t u;
  std::memcpy(&u, p, sizeof(u));
  return _mm512_castsi512_ps(_mm512_set1_epi32(u));
}

#ifdef __AVX512BF16__
constexpr bool HAS_BF16 = true;

// 16 units (a_c, b_c): bfloat16 pairs of two float32 rows.
inline __m512i interleave(__m512 a, __m512 b) {
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(order), (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

// 16 floats as bfloat16 at dst.
inline void store_bf16(bfloat16* dst, __m512 x) { _mm256_storeu_si256((__m256i*)dst, (__m256i)_mm512_cvtneps_pbh(x)); }
#else
constexpr bool HAS_BF16 = false;
#endif

// exp(x) in 16 lanes, 0 where x < -87 (e^-87 = 1.6e-38, at the end of float32's normal range; the kernel's
// arguments, s - max s and s - lse, are <= 0): x = n ln 2 + r, |r| <= ln(2) / 2, 2^n by vscalefps, and exp(r)
// for float32 products 1 + r + r^2 P(r) (the Cephes expf polynomial), for bfloat16 ones, whose probabilities
// are rounded to 8 significant bits, a degree-3 polynomial fitted to exp on [-ln(2) / 2, ln(2) / 2] (relative
// error 7.5e-5; Zen 4 runs 512-bit FMAs at one a cycle, as many as bfloat16 dot products).
template <typename T>
inline __m512 exp16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 p;
  if constexpr (PER<T> == 1) {
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    p = _mm512_set1_ps(1.9875691500e-4f);
    p = fmadd(p, r, 1.3981999507e-3f);
    p = fmadd(p, r, 8.3334519073e-3f);
    p = fmadd(p, r, 4.1665795894e-2f);
    p = fmadd(p, r, 1.6666665459e-1f);
    p = fmadd(p, r, 5.0000001201e-1f);
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  } else {
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.69314718056f), x);
    p = fmadd(_mm512_set1_ps(0.16566738f), r, 0.50496206f);
    p = fmadd(p, r, 1.00016419f);
    p = fmadd(p, r, 0.99992811f);
  }
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

// The lanes of the first min(n, 16) entries (none for n <= 0).
inline __mmask16 tail(int64_t n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1); }

// s[r, j0 + j] for j < 16 C: scale * rows[r] . xt[:, k0 + j0 + j] + bias[k0 + j0 + j] (see `products`).
template <typename T, int C>
void product_columns(const T* const* rows, const T* xt, int64_t ld, int64_t d, int64_t k0, int64_t j0, int64_t n,
                     float scale, const float* bias, float* s, int64_t lds) {
  constexpr int per = PER<T>;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const T* col = xt + (k0 + j0) * per;
  for (int64_t e = 0; e < d / per; ++e) {
    __m512 x[C];
    for (int c = 0; c < C; ++c) x[c] = units(col + (e * ld + 16 * c) * per);
    for (int r = 0; r < R; ++r) {
      const __m512 a = unit(rows[r] + e * per);
      for (int c = 0; c < C; ++c) acc[r][c] = madd<T>(acc[r][c], a, x[c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int c = 0; c < C; ++c) {
    const int64_t j = j0 + 16 * c;
    const __m512 b = bias ? _mm512_maskz_loadu_ps(tail(n - j), bias + k0 + j) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(s + r * lds + j, _mm512_fmadd_ps(acc[r][c], sc, b));
  }
}

// s[r, j] = scale * rows[r] . xt[:, k0 + j] + bias[k0 + j] for j < n (rounded up to 16), xt [d / per, ld] units
// (`transposed` keys or values), zero past the last key; bias null for none. 32 columns a pass, the last 16 alone.
template <typename T>
void products(const T* const* rows, const T* xt, int64_t ld, int64_t d, int64_t k0, int64_t n, float scale,
              const float* bias, float* s, int64_t lds) {
  int64_t j = 0;
  for (; n - j > 16; j += 32) product_columns<T, 2>(rows, xt, ld, d, k0, j, n, scale, bias, s, lds);
  if (j < n) product_columns<T, 1>(rows, xt, ld, d, k0, j, n, scale, bias, s, lds);
}

// out[r][c:c + 16 NV] = sum_{j < n} w[r, j] x_{k0 + j}[c:c + 16 NV] for r < RB: w [RB, ldw] (entries past n zero
// up to the next unit), x the rows of keys or values, a unit of keys every `stride` units (`Operands::pairs`); k0
// a multiple of the units' size.
template <typename T, int NV>
void weighted_rows(const T* w, int64_t ldw, const T* x, int64_t stride, int64_t k0, int64_t n, int64_t c,
                   float* const* out) {
  constexpr int per = PER<T>;
  __m512 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t j = 0; j < (n + per - 1) / per; ++j) {
    const T* xj = x + ((k0 / per + j) * stride + c) * per;
    __m512 xv[NV];
    for (int u = 0; u < NV; ++u) xv[u] = units(xj + 16 * u * per);
    for (int r = 0; r < RB; ++r) {
      const __m512 a = unit(w + r * ldw + j * per);
      for (int u = 0; u < NV; ++u) acc[r][u] = madd<T>(acc[r][u], a, xv[u]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(out[r] + c + 16 * u, acc[r][u]);
}

// acc[k0 + j][c:c + 16 NV] += sum_r w[r, j] rows[r][c:c + 16 NV] for j < n; acc [keys, d] float32. The sum over
// the R rows runs over R / per units: w [R / per, ldw] and rows[i] (R / per of them) hold, for T = bfloat16, the
// pairs of rows 2i and 2i + 1 (`Operands::row_pairs`).
template <typename T, int NV>
void accumulate_keys(const T* w, int64_t ldw, const T* const* rows, int64_t k0, int64_t n, int64_t c, int64_t d,
                     float* acc) {
  constexpr int per = PER<T>, terms = R / per;
  __m512 xr[terms][NV];
  for (int i = 0; i < terms; ++i)
    for (int u = 0; u < NV; ++u) xr[i][u] = units(rows[i] + (c + 16 * u) * per);
  for (int64_t j = 0; j < n; ++j) {
    float* aj = acc + (k0 + j) * d + c;
    __m512 a[NV];
    for (int u = 0; u < NV; ++u) a[u] = _mm512_loadu_ps(aj + 16 * u);
    for (int i = 0; i < terms; ++i) {
      const __m512 wi = unit(w + (i * ldw + j) * per);
      for (int u = 0; u < NV; ++u) a[u] = madd<T>(a[u], wi, xr[i][u]);
    }
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(aj + 16 * u, a[u]);
  }
}

// f(std::integral_constant<int, NV>(), c) over all of d, c a multiple of 16, NV <= `most` 16-lane registers.
template <int most, typename F>
void over_columns(int64_t d, F&& f) {
  for (int64_t c = 0; c < d; c += 16 * most) {
    const int64_t left = std::min<int64_t>(most, (d - c) / 16);
    if constexpr (most >= 4) if (left == 4) { f(std::integral_constant<int, 4>(), c); continue; }
    if constexpr (most >= 3) if (left == 3) { f(std::integral_constant<int, 3>(), c); continue; }
    if constexpr (most >= 2) if (left == 2) { f(std::integral_constant<int, 2>(), c); continue; }
    f(std::integral_constant<int, 1>(), c);
  }
}

// The two above over all of d (and `weighted_rows` over all R rows), as many columns at a time as 24
// accumulating registers hold.
template <typename T>
void weighted_rows_d(const T* w, int64_t ldw, const T* x, int64_t stride, int64_t k0, int64_t n, int64_t d,
                     float* const* out) {
  for (int r = 0; r < R; r += RB)
    over_columns<4>(d, [&](auto nv, int64_t c) {
      weighted_rows<T, decltype(nv)::value>(w + r * ldw, ldw, x, stride, k0, n, c, out + r);
    });
}

template <typename T>
void accumulate_keys_d(const T* w, int64_t ldw, const T* const* rows, int64_t k0, int64_t n, int64_t d, float* acc) {
  over_columns<std::min(4, 24 * PER<T> / R)>(d, [&](auto nv, int64_t c) {
    accumulate_keys<T, decltype(nv)::value>(w, ldw, rows, k0, n, c, d, acc);
  });
}

// One call's shapes and mask, and its tiles of `rows` query rows.
struct Problem {
  int64_t b, t, h, d, S, K, group, index, window, ld, rows;
  float scale;
  const float *q, *k, *v;
  std::vector<float> bias;  // [b, S]: 0 for a real key, -inf for a masked one

  Problem(const ffi::Buffer<ffi::F32>& qb, const ffi::Buffer<ffi::F32>& kb, const ffi::Buffer<ffi::F32>& vb,
          const ffi::Buffer<ffi::PRED>& key_mask, int64_t index_, int64_t window_, int64_t rows_ = R) {
    const auto qd = qb.dimensions(), kd = kb.dimensions();
    b = qd[0], t = qd[1], h = qd[2], d = qd[3], S = kd[1], K = kd[2], group = h / K, index = index_, window = window_;
    rows = rows_;
    ld = (S + 1) / 2 * 2 + 32;
    scale = 1.f / std::sqrt(static_cast<float>(d));
    q = qb.typed_data(), k = kb.typed_data(), v = vb.typed_data();
    bias.resize(b * S);
    for (int64_t e = 0; e < b * S; ++e) bias[e] = key_mask.typed_data()[e] ? 0.f : NEG_INF;
  }

  int64_t tiles_per_unit() const { return (t * group + rows - 1) / rows; }
  int64_t lo(int64_t i) const { return window ? std::max<int64_t>(0, index + i - window + 1) : 0; }
  int64_t hi(int64_t i) const { return std::min(S, index + i + 1); }

  // Tile `tile` of unit `unit`: its keys [k0, k0 + n), k0 even, and, for each of its `rows` rows, the row's offset
  // in a [b, t, h, *] array (rows past the end repeat the last; the tile's `rows` says how many are real).
  struct Tile {
    int64_t bi, kh, unit, k0, n, rows;
    int64_t row[MAX_ROWS], pos[MAX_ROWS];
  };
  Tile tile(int64_t unit, int64_t index_in_unit) const {
    Tile tl;
    tl.bi = unit / K, tl.kh = unit % K, tl.unit = unit;
    const int64_t r0 = index_in_unit * rows;
    tl.rows = std::min<int64_t>(rows, t * group - r0);
    for (int r = 0; r < rows; ++r) {
      const int64_t flat = r0 + std::min<int64_t>(r, tl.rows - 1), i = flat / group;
      tl.pos[r] = i;
      tl.row[r] = (tl.bi * t + i) * h + tl.kh * group + flat % group;
    }
    tl.k0 = lo(tl.pos[0]) / 2 * 2;
    tl.n = std::max<int64_t>(0, hi(tl.pos[rows - 1]) - tl.k0);
    return tl;
  }

  // -inf in row r of a tile's scores (sr[j] for key k0 + j, j < n) where its query may not see the key: before
  // lo and from hi on.
  void hide(const Tile& tl, int r, float* sr) const { hide(tl.pos[r], tl.k0, tl.n, sr); }

  // The same for query position i and keys [k0, k0 + n).
  void hide(int64_t i, int64_t k0, int64_t n, float* sr) const {
    for (int64_t j = k0; j < std::min(lo(i), k0 + n); ++j) sr[j - k0] = NEG_INF;
    for (int64_t j = std::max(hi(i), k0); j < k0 + n; ++j) sr[j - k0] = NEG_INF;
  }

  // Splits the tiles of all units between two threads by their keys: run(first, last, thread) over flat tile
  // indices.
  template <typename F>
  void split(ffi::ThreadPool& pool, F run) const {
    const int64_t per = tiles_per_unit(), total = b * K * per;
    std::vector<int64_t> cost(total + 1, 0);
    for (int64_t e = 0; e < total; ++e) cost[e + 1] = cost[e] + tile(e / per, e % per).n + 8;
    int64_t half = std::lower_bound(cost.begin(), cost.end(), cost[total] / 2) - cost.begin();
    half = std::min(half, total);
    if (pool.num_threads() > 1 && total > 1 && cost[total] * d >= (1 << 16)) {
      qalora::both(pool, [&] { run(0, half, 0); }, [&] { run(half, total, 1); });
    } else {
      run(0, total, 0);
    }
  }
};

// The operands of one call's products in T: rows of q (and dout) in [b, t, h, d], keys and values transposed
// for the scores, and keys or values in pairs for `weighted_rows`; float32 ones are read where they lie.
template <typename T>
struct Operands {
  static constexpr int per = PER<T>;
  const Problem& p;
  std::vector<T> own_q, own_g, kt, vt, pairs_;
  const T *q = nullptr, *g = nullptr;

  // With `dout`: the backward pass's (kt, vt, keys in pairs); without: the forward's (kt, values in pairs).
  Operands(const Problem& p_, const float* dout) : p(p_) {
    q = rows(p.q, own_q);
    if (dout) g = rows(dout, own_g);
    kt = transposed(p.k);
    if (dout) vt = transposed(p.v);
    if (per > 1) pairs_ = paired(dout ? p.k : p.v);
  }

  // x [b, t, h, d] in T.
  const T* rows(const float* x, std::vector<T>& own) const {
    if constexpr (per == 1) {
      return x;
    } else {
#ifdef __AVX512BF16__
      const int64_t n = p.b * p.t * p.h * p.d;
      own.resize(n);
      for (int64_t e = 0; e < n; e += 16) store_bf16(own.data() + e, _mm512_loadu_ps(x + e));
#endif
      return own.data();
    }
  }

  // [b, K, d / per, ld, per]: unit (e, j) holds x_j[e per : (e + 1) per], x [b, S, K, d]; zero past S.
  std::vector<T> transposed(const float* x) const {
    std::vector<T> xt(p.b * p.K * p.d * p.ld, 0);
    std::vector<T> row(p.d);
    for (int64_t bi = 0; bi < p.b; ++bi)
      for (int64_t j = 0; j < p.S; ++j)
        for (int64_t kh = 0; kh < p.K; ++kh) {
          const float* src = x + ((bi * p.S + j) * p.K + kh) * p.d;
          if constexpr (per == 1) {
            std::copy(src, src + p.d, row.begin());
          } else {
#ifdef __AVX512BF16__
            for (int64_t e = 0; e < p.d; e += 16) store_bf16(row.data() + e, _mm512_loadu_ps(src + e));
#endif
          }
          T* dst = xt.data() + (bi * p.K + kh) * p.d * p.ld + j * per;
          for (int64_t e = 0; e < p.d / per; ++e) std::copy_n(row.data() + e * per, per, dst + e * p.ld * per);
        }
    return xt;
  }

  // bfloat16 only, [b, K, ld / 2, d, 2]: unit (i, c) holds (x_2i[c], x_2i+1[c]); zero past S.
  std::vector<T> paired(const float* x) const {
    std::vector<T> out(p.b * p.K * p.ld * p.d);
#ifdef __AVX512BF16__
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t bi = 0; bi < p.b; ++bi)
      for (int64_t kh = 0; kh < p.K; ++kh)
        for (int64_t i = 0; i < p.ld / 2; ++i) {
          const float* x0 = 2 * i < p.S ? x + ((bi * p.S + 2 * i) * p.K + kh) * p.d : nullptr;
          const float* x1 = 2 * i + 1 < p.S ? x0 + p.K * p.d : nullptr;
          T* dst = out.data() + (((bi * p.K + kh) * p.ld / 2 + i) * p.d) * 2;
          for (int64_t c = 0; c < p.d; c += 16)
            _mm512_storeu_si512(dst + 2 * c, interleave(x0 ? _mm512_loadu_ps(x0 + c) : zero,
                                                        x1 ? _mm512_loadu_ps(x1 + c) : zero));
        }
#endif
    return out;
  }

  // The keys (backward) or values (forward) of a tile's KV head as `weighted_rows` reads them, and their stride.
  const T* pairs(const float* x, const Problem::Tile& tl) const {
    if constexpr (per == 1) return x + (tl.bi * p.S * p.K + tl.kh) * p.d;
    return pairs_.data() + tl.unit * p.ld * p.d;
  }
  int64_t stride() const { return per == 1 ? p.K * p.d : p.d; }

  // A tile's transposed keys (or values).
  const T* of_unit(const std::vector<T>& xt, const Problem::Tile& tl) const { return xt.data() + tl.unit * p.d * p.ld; }

  // Scores of a tile into s [R, lds] float32: masked entries, and those outside a row's causal window, are -inf.
  void scores(const Problem::Tile& tl, float* s, int64_t lds) const {
    const T* rows_[R];
    for (int r = 0; r < R; ++r) rows_[r] = q + tl.row[r] * p.d;
    products<T>(rows_, of_unit(kt, tl), p.ld, p.d, tl.k0, tl.n, p.scale, p.bias.data() + tl.bi * p.S, s, lds);
    for (int r = 0; r < R; ++r) p.hide(tl, r, s + r * lds);
  }

  // The forward pass's weights from a tile's scores s ([R, lds] float32, n of each row): p = exp(s - m), as
  // `weighted_rows` reads them: in place, or bfloat16 in `own` [R, lds], zero past n; l[r] = sum_j p[r, j]. A
  // row with m = -inf sees no key: p = 0.
  const T* probabilities(float* s, int64_t lds, int64_t n, const float* m, float* l, std::vector<T>& own) const {
    if constexpr (per > 1) own.resize(R * lds);
    const __m512 none = _mm512_set1_ps(NEG_INF);
    for (int r = 0; r < R; ++r) {
      const __m512 shift = _mm512_set1_ps(m[r] == NEG_INF ? std::numeric_limits<float>::infinity() : m[r]);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 mask = tail(n - j);
        const __m512 e = exp16<T>(_mm512_sub_ps(_mm512_mask_loadu_ps(none, mask, s + r * lds + j), shift));
        sum = _mm512_add_ps(sum, e);
        if constexpr (per == 1) {
          _mm512_mask_storeu_ps(s + r * lds + j, mask, e);
        } else {
#ifdef __AVX512BF16__
          store_bf16(own.data() + r * lds + j, e);
#endif
        }
      }
      l[r] = _mm512_reduce_add_ps(sum);
    }
    if constexpr (per == 1) return s;
    return own.data();
  }

  // The backward pass's weights from a tile's s and dp = dout v^T ([R, lds] float32 each, n of each row, both
  // overwritten): p = exp(s - lse), ds = p (dp - delta) scale, as `weighted_rows` reads ds and as
  // `accumulate_keys` reads ds and p: in place, or bfloat16 in `own` (ds [R, lds], ds and p in row pairs
  // [R / 2, lds, 2]), zero past n.
  struct Gradients {
    const T *ds, *ds_pairs, *p_pairs;
  };
  Gradients score_gradients(float* s, float* dp, int64_t lds, int64_t n, const float* lse, const float* delta,
                            std::vector<T>& own) const {
    const __m512 sc = _mm512_set1_ps(p.scale), none = _mm512_set1_ps(NEG_INF);
    // p and ds of row r at columns j.. (tail mask m)
    const auto at = [&](int r, int64_t j, __mmask16 m, __m512& pj, __m512& dsj) {
      pj = exp16<T>(_mm512_sub_ps(_mm512_mask_loadu_ps(none, m, s + r * lds + j), _mm512_set1_ps(lse[r])));
      dsj = _mm512_mul_ps(_mm512_mul_ps(pj, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp + r * lds + j),
                                                          _mm512_set1_ps(delta[r]))), sc);
    };
    if constexpr (per == 1) {
      for (int r = 0; r < R; ++r)
        for (int64_t j = 0; j < n; j += 16) {
          const __mmask16 m = tail(n - j);
          __m512 pj, dsj;
          at(r, j, m, pj, dsj);
          _mm512_mask_storeu_ps(s + r * lds + j, m, pj);
          _mm512_mask_storeu_ps(dp + r * lds + j, m, dsj);
        }
      return {dp, dp, s};
    } else {
      own.resize(3 * R * lds);
      T *ds = own.data(), *ds_pairs = ds + R * lds, *p_pairs = ds_pairs + R * lds;
#ifdef __AVX512BF16__
      for (int i = 0; i < R / 2; ++i)
        for (int64_t j = 0; j < n; j += 16) {
          const __mmask16 m = tail(n - j);
          __m512 p0, p1, ds0, ds1;
          at(2 * i, j, m, p0, ds0);
          at(2 * i + 1, j, m, p1, ds1);
          store_bf16(ds + 2 * i * lds + j, ds0);
          store_bf16(ds + (2 * i + 1) * lds + j, ds1);
          _mm512_storeu_si512(ds_pairs + (i * lds + j) * 2, interleave(ds0, ds1));
          _mm512_storeu_si512(p_pairs + (i * lds + j) * 2, interleave(p0, p1));
        }
#endif
      return {ds, ds_pairs, p_pairs};
    }
  }

  // R rows of d float32 as `accumulate_keys` reads them: the rows, or bfloat16 row pairs in `own` [R / 2, d, 2].
  void row_pairs(const float* const* rows_, int64_t d, std::vector<T>& own, const T** out) const {
    if constexpr (per == 1) {
      std::copy(rows_, rows_ + R, out);
    } else {
#ifdef __AVX512BF16__
      own.resize(R * d);
      for (int i = 0; i < R / 2; ++i) {
        for (int64_t c = 0; c < d; c += 16)
          _mm512_storeu_si512(own.data() + (i * d + c) * 2,
                              interleave(_mm512_loadu_ps(rows_[2 * i] + c), _mm512_loadu_ps(rows_[2 * i + 1] + c)));
        out[i] = own.data() + i * d * 2;
      }
#endif
    }
  }
};

float max_row(const float* s, int64_t n) {
  __m512 m = _mm512_set1_ps(NEG_INF);
  for (int64_t j = 0; j < n; j += 16)
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(NEG_INF), tail(n - j), s + j));
  return _mm512_reduce_max_ps(m);
}

ffi::Error check(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                 const ffi::Buffer<ffi::PRED>& key_mask, int64_t bf16) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = key_mask.dimensions();
  if (!(qd.size() == 4 && kd.size() == 4 && vd.size() == 4 && md.size() == 2 && kd[0] == qd[0] && kd[3] == qd[3] &&
        qd[3] % 16 == 0 && qd[2] % kd[2] == 0 && vd[0] == kd[0] && vd[1] == kd[1] && vd[2] == kd[2] &&
        vd[3] == kd[3] && md[0] == qd[0] && md[1] == kd[1]))
    return ffi::Error::InvalidArgument("needs q [b, t, h, d], k, v [b, S, K, d] with h % K == 0 and d % 16 == 0");
  if (bf16 && !HAS_BF16) return ffi::Error::InvalidArgument("bf16 needs a CPU with AVX512-BF16");
  if (bf16 < 0 || bf16 > 2) return ffi::Error::InvalidArgument("bf16 must be 0, 1 or 2");
  return ffi::Error::Success();
}

// ---- AMX tiles: the bfloat16 products as tdpbf16ps (a 16 x 16 float32 tile += a [16, 32] bfloat16 tile times a
// [16, 16] tile of bfloat16 pairs along the contraction) ----
//
// Tiles of RT = 32 query rows forward, RT_BACKWARD = 64 backward. Per tile, with the keys it sees [k0, k0 + n) and
// n32 = n rounded up to 32 (the backward pass takes them CHUNK at a time):
//
//   forward:  s = q_rows k^T  [RT, n32],   p = exp(scale s + bias - m) in bfloat16,   out_rows = p v  [RT, d]
//   backward: s, dp = dout_rows v^T,  p = exp(scale s + bias - lse),  ds = p (dp - delta) scale,
//             dq_rows = ds k,  dk^T += q_rows^T ds  [d, n32],  dv^T += dout_rows^T p  [d, n32]
//
// each a `tile_product` of bfloat16 rows and bfloat16 pairs: k^T and v^T as `Operands::transposed`, k and v
// as `Operands::paired`, ds and p in row pairs, q_rows^T and dout_rows^T gathered per tile. dk and dv collect
// transposed, [d, keys] per unit, so that no product needs ds^T. Zeros pad every contraction to 32.
#ifdef __AMX_BF16__
constexpr int RT = 32;

using qalora::amx_permitted;
using qalora::Tiles;

// c [m, n] float32 = (with `add`: +=) a [m, k] bfloat16 rows times b [k, n] in bfloat16 pairs along k ([k / 2, n,
// 2]); strides lda, ldb (in pairs), ldc in elements; m, n and k multiples of 32. 32 x 32 of c at a time: tiles 0-3
// hold c, 4-5 rows of a, 6-7 columns of b.
void tile_product(const bfloat16* a, int64_t lda, const bfloat16* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
                  int64_t n, int64_t k, bool add) {
  for (int64_t i = 0; i < m; i += 32)
    for (int64_t j = 0; j < n; j += 32) {
      float* c0 = c + i * ldc + j;
      float* c1 = c0 + 16 * ldc;
      if (add) {
        _tile_loadd(0, c0, ldc * 4);
        _tile_loadd(1, c0 + 16, ldc * 4);
        _tile_loadd(2, c1, ldc * 4);
        _tile_loadd(3, c1 + 16, ldc * 4);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t e = 0; e < k; e += 32) {
        _tile_loadd(4, a + i * lda + e, lda * 2);
        _tile_loadd(5, a + (i + 16) * lda + e, lda * 2);
        _tile_loadd(6, b + (e / 2 * ldb + j) * 2, ldb * 4);
        _tile_loadd(7, b + (e / 2 * ldb + j + 16) * 2, ldb * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c0, ldc * 4);
      _tile_stored(1, c0 + 16, ldc * 4);
      _tile_stored(2, c1, ldc * 4);
      _tile_stored(3, c1 + 16, ldc * 4);
    }
}

inline int64_t up32(int64_t n) { return (n + 31) / 32 * 32; }

// A tile's `rows` rows of x (bfloat16 [b, t, h, d]) into a [rows, d], and with `at` transposed into at [d, rows].
void gather(const bfloat16* x, const Problem::Tile& tl, int64_t d, int rows, bfloat16* a, bfloat16* at) {
  for (int r = 0; r < rows; ++r) {
    const bfloat16* xr = x + tl.row[r] * d;
    std::copy_n(xr, d, a + r * d);
    if (at)
      for (int64_t c = 0; c < d; ++c) at[c * rows + r] = xr[c];
  }
}

// The logits of a row from its products sr against keys [k0, k0 + n), x = scale s + bias (of batch row bi), -inf
// past n (and where sr already holds -inf): in 16 lanes at column j.
inline __m512 logits(const Problem& p, int64_t bi, int64_t k0, int64_t n, const float* sr, int64_t j) {
  const __mmask16 m = tail(n - j);
  const float* bias = p.bias.data() + bi * p.S + k0;
  return _mm512_mask_blend_ps(m, _mm512_set1_ps(NEG_INF),
                              _mm512_fmadd_ps(_mm512_loadu_ps(sr + j), _mm512_set1_ps(p.scale),
                                              _mm512_maskz_loadu_ps(m, bias + j)));
}

void forward_amx(ffi::ThreadPool& pool, const Problem& p, float* op, float* lp) {
  const Operands<bfloat16> o(p, nullptr);
  const int64_t per = p.tiles_per_unit(), lds = p.ld, d = p.d;
  p.split(pool, [&](int64_t first, int64_t last, int) {
    const Tiles tiles;
    std::vector<float> s(RT * lds), out(RT * d);
    std::vector<bfloat16> qa(RT * d), w(RT * lds);
    for (int64_t e = first; e < last; ++e) {
      const auto tl = p.tile(e / per, e % per);
      const int64_t n32 = up32(tl.n);
      gather(o.q, tl, d, RT, qa.data(), nullptr);
      tile_product(qa.data(), d, o.of_unit(o.kt, tl) + tl.k0 * 2, p.ld, s.data(), lds, RT, n32, d, false);
      float m[RT], l[RT];
      for (int r = 0; r < RT; ++r) {
        float* sr = s.data() + r * lds;
        p.hide(tl, r, sr);
        __m512 top = _mm512_set1_ps(NEG_INF);
        for (int64_t j = 0; j < n32; j += 16) {
          const __m512 x = logits(p, tl.bi, tl.k0, tl.n, sr, j);
          _mm512_storeu_ps(sr + j, x);
          top = _mm512_max_ps(top, x);
        }
        m[r] = _mm512_reduce_max_ps(top);
        const __m512 shift = _mm512_set1_ps(m[r] == NEG_INF ? std::numeric_limits<float>::infinity() : m[r]);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n32; j += 16) {
          const __m512 x = exp16<bfloat16>(_mm512_sub_ps(_mm512_loadu_ps(sr + j), shift));
          sum = _mm512_add_ps(sum, x);
          store_bf16(w.data() + r * lds + j, x);
        }
        l[r] = _mm512_reduce_add_ps(sum);
      }
      tile_product(w.data(), lds, o.pairs(p.v, tl) + tl.k0 * d, d, out.data(), d, RT, d, n32, false);
      for (int r = 0; r < tl.rows; ++r) {
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        float* dst = op + tl.row[r] * d;
        for (int64_t c = 0; c < d; ++c) dst[c] = out[r * d + c] * inv;
        lp[tl.row[r]] = l[r] > 0.f ? m[r] + std::log(l[r]) : 0.f;
      }
    }
  });
}

// dk^T, dv^T of each thread [b K, d, ld] into acc[thread] (dk^T first); returns whether thread 1 ran. Tiles of
// RT_BACKWARD = 64 rows (`Problem` built so), their keys CHUNK at a time: a chunk's s, dp, p and ds stay in the core's
// cache, and dk^T, dv^T sum over 64 rows a product. dq sums over the chunks.
constexpr int RT_BACKWARD = 64, CHUNK = 128;

bool backward_amx(ffi::ThreadPool& pool, const Problem& p, const float* op, const float* lp, const float* gp,
                  float* dqp, std::vector<float>* acc) {
  const Operands<bfloat16> o(p, gp);
  const int64_t per = p.tiles_per_unit(), d = p.d, keys = p.b * p.K * d * p.ld;
  acc[0].assign(2 * keys, 0.f);
  p.split(pool, [&](int64_t first, int64_t last, int thread) {
    const Tiles tiles;
    std::vector<float>& mine = acc[thread];
    if (mine.empty()) mine.assign(2 * keys, 0.f);
    constexpr int rows = RT_BACKWARD;
    std::vector<float> s(rows * CHUNK), dp(rows * CHUNK), dq(rows * d);
    std::vector<bfloat16> qa(rows * d), qt(d * rows), ga(rows * d), gt(d * rows), ds(rows * CHUNK),
        ds_pairs(rows * CHUNK), p_pairs(rows * CHUNK);
    const __m512 sc = _mm512_set1_ps(p.scale);
    for (int64_t e = first; e < last; ++e) {
      const auto tl = p.tile(e / per, e % per);
      gather(o.q, tl, d, rows, qa.data(), qt.data());
      gather(o.g, tl, d, rows, ga.data(), gt.data());
      float lse[rows], delta[rows];
      for (int r = 0; r < rows; ++r) {
        lse[r] = r < tl.rows ? lp[tl.row[r]] : std::numeric_limits<float>::infinity();  // a repeated row: p = 0
        delta[r] = dot(gp + tl.row[r] * d, op + tl.row[r] * d, d);
      }
      std::fill(dq.begin(), dq.end(), 0.f);
      for (int64_t c0 = 0; c0 < tl.n; c0 += CHUNK) {
        const int64_t k0 = tl.k0 + c0, n = std::min<int64_t>(CHUNK, tl.n - c0), n32 = up32(n);
        tile_product(qa.data(), d, o.of_unit(o.kt, tl) + k0 * 2, p.ld, s.data(), CHUNK, rows, n32, d, false);
        tile_product(ga.data(), d, o.of_unit(o.vt, tl) + k0 * 2, p.ld, dp.data(), CHUNK, rows, n32, d, false);
        for (int r = 0; r < rows; ++r) p.hide(tl.pos[r], k0, n, s.data() + r * CHUNK);
        for (int i = 0; i < rows / 2; ++i) {
          const float *s0 = s.data() + 2 * i * CHUNK, *s1 = s0 + CHUNK, *dp0 = dp.data() + 2 * i * CHUNK,
                      *dp1 = dp0 + CHUNK;
          const __m512 lse0 = _mm512_set1_ps(lse[2 * i]), lse1 = _mm512_set1_ps(lse[2 * i + 1]),
                       delta0 = _mm512_set1_ps(delta[2 * i]), delta1 = _mm512_set1_ps(delta[2 * i + 1]);
          for (int64_t j = 0; j < n32; j += 16) {
            const __m512 p0 = exp16<bfloat16>(_mm512_sub_ps(logits(p, tl.bi, k0, n, s0, j), lse0));
            const __m512 p1 = exp16<bfloat16>(_mm512_sub_ps(logits(p, tl.bi, k0, n, s1, j), lse1));
            const __m512 ds0 = _mm512_mul_ps(_mm512_mul_ps(p0, _mm512_sub_ps(_mm512_loadu_ps(dp0 + j), delta0)), sc);
            const __m512 ds1 = _mm512_mul_ps(_mm512_mul_ps(p1, _mm512_sub_ps(_mm512_loadu_ps(dp1 + j), delta1)), sc);
            store_bf16(ds.data() + 2 * i * CHUNK + j, ds0);
            store_bf16(ds.data() + (2 * i + 1) * CHUNK + j, ds1);
            _mm512_storeu_si512(ds_pairs.data() + (i * CHUNK + j) * 2, interleave(ds0, ds1));
            _mm512_storeu_si512(p_pairs.data() + (i * CHUNK + j) * 2, interleave(p0, p1));
          }
        }
        tile_product(ds.data(), CHUNK, o.pairs(p.k, tl) + k0 * d, d, dq.data(), d, rows, d, n32, c0 > 0);
        float* dkt = mine.data() + tl.unit * d * p.ld + k0;
        tile_product(qt.data(), rows, ds_pairs.data(), CHUNK, dkt, p.ld, d, n32, rows, true);
        tile_product(gt.data(), rows, p_pairs.data(), CHUNK, dkt + keys, p.ld, d, n32, rows, true);
      }
      for (int r = 0; r < tl.rows; ++r) std::copy_n(dq.data() + r * d, d, dqp + tl.row[r] * d);
    }
  });
  return !acc[1].empty();
}

// Whether a call runs on AMX tiles: `bf16` 2 asks for them; they need the process's permission and a head size
// that is a multiple of 32 (one tile's contraction); else it runs as `bf16` 1.
bool amx(int64_t bf16, const ffi::Buffer<ffi::F32>& q) {
  return bf16 == 2 && q.dimensions()[3] % 32 == 0 && amx_permitted();
}
#else
bool amx_permitted() { return false; }
#endif

template <typename T>
void forward(ffi::ThreadPool& pool, const Problem& p, float* op, float* lp) {
  const Operands<T> o(p, nullptr);
  const int64_t per = p.tiles_per_unit(), lds = p.ld;
  p.split(pool, [&](int64_t first, int64_t last, int) {
    std::vector<float> s(R * lds), scrap(p.d);
    std::vector<T> own;
    for (int64_t e = first; e < last; ++e) {
      const auto tl = p.tile(e / per, e % per);
      o.scores(tl, s.data(), lds);
      float l[R], m[R];
      float* outs[R];
      for (int r = 0; r < R; ++r) {
        m[r] = max_row(s.data() + r * lds, tl.n);
        outs[r] = r < tl.rows ? op + tl.row[r] * p.d : scrap.data();
      }
      weighted_rows_d<T>(o.probabilities(s.data(), lds, tl.n, m, l, own), lds, o.pairs(p.v, tl), o.stride(), tl.k0,
                         tl.n, p.d, outs);
      for (int r = 0; r < tl.rows; ++r) {
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int64_t e = 0; e < p.d; ++e) outs[r][e] *= inv;
        lp[tl.row[r]] = l[r] > 0.f ? m[r] + std::log(l[r]) : 0.f;
      }
    }
  });
}

ffi::Error AttentionFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> key_mask, ffi::ResultBuffer<ffi::F32> out,
                        ffi::ResultBuffer<ffi::F32> lse, int64_t index, int64_t window, int64_t bf16) {
  if (auto error = check(q, k, v, key_mask, bf16); error.failure()) return error;
#ifdef __AMX_BF16__
  if (amx(bf16, q)) {
    forward_amx(pool, Problem(q, k, v, key_mask, index, window, RT), out->typed_data(), lse->typed_data());
    return ffi::Error::Success();
  }
#endif
  const Problem p(q, k, v, key_mask, index, window);
#ifdef __AVX512BF16__
  if (bf16) {
    forward<bfloat16>(pool, p, out->typed_data(), lse->typed_data());
    return ffi::Error::Success();
  }
#endif
  forward<float>(pool, p, out->typed_data(), lse->typed_data());
  return ffi::Error::Success();
}

// dk, dv of each thread [b, K, S, d] into acc[thread] (dk first, then dv); returns whether thread 1 ran.
template <typename T>
bool backward(ffi::ThreadPool& pool, const Problem& p, const float* op, const float* lp, const float* gp, float* dqp,
              std::vector<float>* acc) {
  const Operands<T> o(p, gp);
  const int64_t per = p.tiles_per_unit(), lds = p.ld, keys = p.b * p.K * p.S * p.d;
  acc[0].assign(2 * keys, 0.f);
  p.split(pool, [&](int64_t first, int64_t last, int thread) {
    std::vector<float>& mine = acc[thread];
    if (mine.empty()) mine.assign(2 * keys, 0.f);
    std::vector<float> pr(R * lds), ds(R * lds), scrap(p.d);
    std::vector<T> own_w, own_rows;
    for (int64_t e = first; e < last; ++e) {
      const auto tl = p.tile(e / per, e % per);
      o.scores(tl, pr.data(), lds);
      const T* douts[R];
      const float *gs[R], *qs[R];
      float* dqs[R];
      for (int r = 0; r < R; ++r) {
        douts[r] = o.g + tl.row[r] * p.d;
        gs[r] = gp + tl.row[r] * p.d;
        qs[r] = p.q + tl.row[r] * p.d;
        dqs[r] = r < tl.rows ? dqp + tl.row[r] * p.d : scrap.data();
      }
      products<T>(douts, o.of_unit(o.vt, tl), p.ld, p.d, tl.k0, tl.n, 1.f, nullptr, ds.data(), lds);
      float lse[R], delta[R];
      for (int r = 0; r < R; ++r) {
        lse[r] = r < tl.rows ? lp[tl.row[r]] : std::numeric_limits<float>::infinity();  // a repeated row: p = 0
        delta[r] = dot(gs[r], op + tl.row[r] * p.d, p.d);
      }
      const auto w = o.score_gradients(pr.data(), ds.data(), lds, tl.n, lse, delta, own_w);
      weighted_rows_d<T>(w.ds, lds, o.pairs(p.k, tl), o.stride(), tl.k0, tl.n, p.d, dqs);
      const T* rows[R];
      o.row_pairs(qs, p.d, own_rows, rows);
      accumulate_keys_d<T>(w.ds_pairs, lds, rows, tl.k0, tl.n, p.d, mine.data() + tl.unit * p.S * p.d);
      o.row_pairs(gs, p.d, own_rows, rows);
      accumulate_keys_d<T>(w.p_pairs, lds, rows, tl.k0, tl.n, p.d, mine.data() + keys + tl.unit * p.S * p.d);
    }
  });
  return !acc[1].empty();
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> key_mask, ffi::Buffer<ffi::F32> out,
                        ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                        ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, int64_t index,
                        int64_t window, int64_t bf16) {
  if (auto error = check(q, k, v, key_mask, bf16); error.failure()) return error;
  std::vector<float> acc[2];
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = dout.typed_data();
  float *dkp = dk->typed_data(), *dvp = dv->typed_data();
#ifdef __AMX_BF16__
  if (amx(bf16, q)) {
    const Problem p(q, k, v, key_mask, index, window, RT_BACKWARD);
    const bool two = backward_amx(pool, p, op, lp, gp, dq->typed_data(), acc);
    // dk, dv: the threads' sums of dk^T, dv^T [b K, d, ld], back to [b, S, K, d].
    const int64_t keys = p.b * p.K * p.d * p.ld;
    for (int64_t unit = 0; unit < p.b * p.K; ++unit) {
      const int64_t bi = unit / p.K, kh = unit % p.K;
      for (int64_t c = 0; c < p.d; ++c) {
        const int64_t src = (unit * p.d + c) * p.ld;
        for (int64_t j = 0; j < p.S; ++j) {
          const int64_t dst = ((bi * p.S + j) * p.K + kh) * p.d + c;
          dkp[dst] = acc[0][src + j] + (two ? acc[1][src + j] : 0.f);
          dvp[dst] = acc[0][keys + src + j] + (two ? acc[1][keys + src + j] : 0.f);
        }
      }
    }
    return ffi::Error::Success();
  }
#endif
  const Problem p(q, k, v, key_mask, index, window);
#ifdef __AVX512BF16__
  const bool two = bf16 ? backward<bfloat16>(pool, p, op, lp, gp, dq->typed_data(), acc)
                        : backward<float>(pool, p, op, lp, gp, dq->typed_data(), acc);
#else
  const bool two = backward<float>(pool, p, op, lp, gp, dq->typed_data(), acc);
#endif
  // dk, dv: the threads' sums, back to [b, S, K, d].
  const int64_t keys = p.b * p.K * p.S * p.d;
  for (int64_t unit = 0; unit < p.b * p.K; ++unit) {
    const int64_t bi = unit / p.K, kh = unit % p.K;
    for (int64_t j = 0; j < p.S; ++j) {
      const int64_t src = (unit * p.S + j) * p.d, dst = ((bi * p.S + j) * p.K + kh) * p.d;
      for (int64_t c = 0; c < p.d; ++c) {
        dkp[dst + c] = acc[0][src + c] + (two ? acc[1][src + c] : 0.f);
        dvp[dst + c] = acc[0][keys + src + c] + (two ? acc[1][keys + src + c] : 0.f);
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

// 1 where the sequence kernels can run on AMX tiles (the library was built with AMX-BF16 and Linux grants the
// process the tile state), else 0.
extern "C" int qalora_amx_ready() { return amx_permitted(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(qalora_cpu_attention, CpuAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(qalora_cpu_attention_fwd, AttentionFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("index")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(qalora_cpu_attention_bwd, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("index")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("bf16"));
