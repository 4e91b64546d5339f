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
#include <limits>
#include <vector>

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

constexpr int R = 6;  // rows a tile
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline __m512 fmadd(__m512 a, __m512 b, float c) { return _mm512_fmadd_ps(a, b, _mm512_set1_ps(c)); }

// exp(x) in 16 lanes, 0 where x < -87 (e^-87 = 1.6e-38, at the end of float32's normal range; the kernel's
// arguments, s - max s and s - lse, are <= 0): x = n ln 2 + r, |r| <= ln(2) / 2, exp(r) = 1 + r + r^2 P(r)
// (the Cephes expf polynomial), 2^n by vscalefps.
inline __m512 exp16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = fmadd(p, r, 1.3981999507e-3f);
  p = fmadd(p, r, 8.3334519073e-3f);
  p = fmadd(p, r, 4.1665795894e-2f);
  p = fmadd(p, r, 1.6666665459e-1f);
  p = fmadd(p, r, 5.0000001201e-1f);
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

// The lanes of the first min(n, 16) entries (none for n <= 0).
inline __mmask16 tail(int64_t n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1); }

// s[r, j0 + j] for j < 16 C: scale * rows[r] . xt[:, k0 + j0 + j] + bias[k0 + j0 + j] (see `products`).
template <int C>
void product_columns(const float* const* rows, const float* xt, int64_t ld, int64_t d, int64_t k0, int64_t j0,
                     int64_t n, float scale, const float* bias, float* s, int64_t lds) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* col = xt + k0 + j0;
  for (int64_t e = 0; e < d; ++e) {
    __m512 x[C];
    for (int c = 0; c < C; ++c) x[c] = _mm512_loadu_ps(col + e * ld + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(rows[r][e]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(a, x[c], acc[r][c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int c = 0; c < C; ++c) {
    const int64_t j = j0 + 16 * c;
    const __m512 b = bias ? _mm512_maskz_loadu_ps(tail(n - j), bias + k0 + j) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(s + r * lds + j, _mm512_fmadd_ps(acc[r][c], sc, b));
  }
}

// s[r, j] = scale * rows[r] . xt[:, k0 + j] + bias[k0 + j] for j < n (rounded up to 16), xt [d, ld] transposed keys
// (or values), zero-padded 32 columns past the last key; bias null for none. 32 columns a pass, the last 16 alone.
void products(const float* const* rows, const float* xt, int64_t ld, int64_t d, int64_t k0, int64_t n, float scale,
              const float* bias, float* s, int64_t lds) {
  int64_t j = 0;
  for (; n - j > 16; j += 32) product_columns<2>(rows, xt, ld, d, k0, j, n, scale, bias, s, lds);
  if (j < n) product_columns<1>(rows, xt, ld, d, k0, j, n, scale, bias, s, lds);
}

// out[r][c:c + 16 NV] = sum_{j < n} w[r, j] x_{k0 + j}[c:c + 16 NV], x_j = x + j * stride (rows of keys or values).
template <int NV>
void weighted_rows(const float* w, int64_t ldw, const float* x, int64_t stride, int64_t k0, int64_t n, int64_t c,
                   float* const* out) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* xj = x + (k0 + j) * stride + c;
    __m512 xv[NV];
    for (int u = 0; u < NV; ++u) xv[u] = _mm512_loadu_ps(xj + 16 * u);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(w[r * ldw + j]);
      for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_fmadd_ps(a, xv[u], acc[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(out[r] + c + 16 * u, acc[r][u]);
}

// acc[k0 + j][c:c + 16 NV] += sum_r w[r, j] rows[r][c:c + 16 NV] for j < n; acc [keys, d].
template <int NV>
void accumulate_keys(const float* w, int64_t ldw, const float* const* rows, int64_t k0, int64_t n, int64_t c,
                     int64_t d, float* acc) {
  __m512 xr[R][NV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) xr[r][u] = _mm512_loadu_ps(rows[r] + c + 16 * u);
  for (int64_t j = 0; j < n; ++j) {
    float* aj = acc + (k0 + j) * d + c;
    __m512 a[NV];
    for (int u = 0; u < NV; ++u) a[u] = _mm512_loadu_ps(aj + 16 * u);
    for (int r = 0; r < R; ++r) {
      const __m512 wr = _mm512_set1_ps(w[r * ldw + j]);
      for (int u = 0; u < NV; ++u) a[u] = _mm512_fmadd_ps(wr, xr[r][u], a[u]);
    }
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(aj + 16 * u, a[u]);
  }
}

// The two above over all of d, 64 columns (4 registers a row) at a time.
void weighted_rows_d(const float* w, int64_t ldw, const float* x, int64_t stride, int64_t k0, int64_t n, int64_t d,
                     float* const* out) {
  for (int64_t c = 0; c < d; c += 64) {
    switch (std::min<int64_t>(4, (d - c) / 16)) {
      case 1: weighted_rows<1>(w, ldw, x, stride, k0, n, c, out); break;
      case 2: weighted_rows<2>(w, ldw, x, stride, k0, n, c, out); break;
      case 3: weighted_rows<3>(w, ldw, x, stride, k0, n, c, out); break;
      default: weighted_rows<4>(w, ldw, x, stride, k0, n, c, out);
    }
  }
}

void accumulate_keys_d(const float* w, int64_t ldw, const float* const* rows, int64_t k0, int64_t n, int64_t d,
                       float* acc) {
  for (int64_t c = 0; c < d; c += 64) {
    switch (std::min<int64_t>(4, (d - c) / 16)) {
      case 1: accumulate_keys<1>(w, ldw, rows, k0, n, c, d, acc); break;
      case 2: accumulate_keys<2>(w, ldw, rows, k0, n, c, d, acc); break;
      case 3: accumulate_keys<3>(w, ldw, rows, k0, n, c, d, acc); break;
      default: accumulate_keys<4>(w, ldw, rows, k0, n, c, d, acc);
    }
  }
}

// One call's shapes and mask, its tiles, and the transposed keys and values.
struct Problem {
  int64_t b, t, h, d, S, K, group, index, window, ld;
  float scale;
  const float *q, *k, *v;
  std::vector<float> bias;  // [b, S]: 0 for a real key, -inf for a masked one

  Problem(const ffi::Buffer<ffi::F32>& qb, const ffi::Buffer<ffi::F32>& kb, const ffi::Buffer<ffi::F32>& vb,
          const ffi::Buffer<ffi::PRED>& key_mask, int64_t index_, int64_t window_) {
    const auto qd = qb.dimensions(), kd = kb.dimensions();
    b = qd[0], t = qd[1], h = qd[2], d = qd[3], S = kd[1], K = kd[2], group = h / K, index = index_, window = window_;
    ld = S + 32;
    scale = 1.f / std::sqrt(static_cast<float>(d));
    q = qb.typed_data(), k = kb.typed_data(), v = vb.typed_data();
    bias.resize(b * S);
    for (int64_t e = 0; e < b * S; ++e) bias[e] = key_mask.typed_data()[e] ? 0.f : NEG_INF;
  }

  // [b, K, d, ld]: x [b, S, K, d] transposed per unit, zero past S.
  std::vector<float> transposed(const float* x) const {
    std::vector<float> xt(b * K * d * ld, 0.f);
    for (int64_t bi = 0; bi < b; ++bi)
      for (int64_t j = 0; j < S; ++j)
        for (int64_t kh = 0; kh < K; ++kh) {
          const float* src = x + ((bi * S + j) * K + kh) * d;
          float* dst = xt.data() + (bi * K + kh) * d * ld + j;
          for (int64_t e = 0; e < d; ++e) dst[e * ld] = src[e];
        }
    return xt;
  }

  int64_t tiles_per_unit() const { return (t * group + R - 1) / R; }
  int64_t lo(int64_t i) const { return window ? std::max<int64_t>(0, index + i - window + 1) : 0; }
  int64_t hi(int64_t i) const { return std::min(S, index + i + 1); }

  // Tile `tile` of unit `unit`: its keys [k0, k0 + n) and, for each of its R rows, the row's offset in a
  // [b, t, h, *] array (rows past the end repeat the last; `rows` says how many are real).
  struct Tile {
    int64_t bi, kh, k0, n, rows;
    int64_t row[R], pos[R];
  };
  Tile tile(int64_t unit, int64_t index_in_unit) const {
    Tile tl;
    tl.bi = unit / K, tl.kh = unit % K;
    const int64_t r0 = index_in_unit * R;
    tl.rows = std::min<int64_t>(R, t * group - r0);
    for (int r = 0; r < R; ++r) {
      const int64_t flat = r0 + std::min<int64_t>(r, tl.rows - 1), i = flat / group;
      tl.pos[r] = i;
      tl.row[r] = (tl.bi * t + i) * h + tl.kh * group + flat % group;
    }
    tl.k0 = lo(tl.pos[0]);
    tl.n = std::max<int64_t>(0, hi(tl.pos[R - 1]) - tl.k0);
    return tl;
  }

  // Key 0's row of a tile's KV head in x [b, S, K, d] (k or v); key j's is j K d floats further on.
  const float* keys_of(const float* x, const Tile& tl) const { return x + (tl.bi * S * K + tl.kh) * d; }

  // Scores of a tile into s [R, lds]: masked entries, and those outside a row's causal window, are -inf.
  void scores(const Tile& tl, const float* kt, float* s, int64_t lds) const {
    const float* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = q + tl.row[r] * d;
    products(rows, kt + (tl.bi * K + tl.kh) * d * ld, ld, d, tl.k0, tl.n, scale, bias.data() + tl.bi * S, s, lds);
    for (int r = 0; r < R; ++r) {
      float* sr = s + r * lds;
      for (int64_t j = tl.k0; j < lo(tl.pos[r]); ++j) sr[j - tl.k0] = NEG_INF;
      for (int64_t j = hi(tl.pos[r]); j < tl.k0 + tl.n; ++j) sr[j - tl.k0] = NEG_INF;
    }
  }

  // Splits the tiles of all units between two threads by their keys: run(first, last) over flat tile indices.
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

// exp(s - shift) over n entries of a row, in place; returns their sum.
float exp_row(float* s, int64_t n, float shift) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 sh = _mm512_set1_ps(shift);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail(n - j);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(NEG_INF), m, s + j), sh));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

float max_row(const float* s, int64_t n) {
  __m512 m = _mm512_set1_ps(NEG_INF);
  for (int64_t j = 0; j < n; j += 16)
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(NEG_INF), tail(n - j), s + j));
  return _mm512_reduce_max_ps(m);
}

bool valid(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
           const ffi::Buffer<ffi::PRED>& key_mask) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = key_mask.dimensions();
  return qd.size() == 4 && kd.size() == 4 && vd.size() == 4 && md.size() == 2 && kd[0] == qd[0] && kd[3] == qd[3] &&
         qd[3] % 16 == 0 && qd[2] % kd[2] == 0 && vd[0] == kd[0] && vd[1] == kd[1] && vd[2] == kd[2] &&
         vd[3] == kd[3] && md[0] == qd[0] && md[1] == kd[1];
}

ffi::Error AttentionFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> key_mask, ffi::ResultBuffer<ffi::F32> out,
                        ffi::ResultBuffer<ffi::F32> lse, int64_t index, int64_t window) {
  if (!valid(q, k, v, key_mask))
    return ffi::Error::InvalidArgument("needs q [b, t, h, d], k, v [b, S, K, d] with h % K == 0 and d % 16 == 0");
  const Problem p(q, k, v, key_mask, index, window);
  const std::vector<float> kt = p.transposed(p.k);
  float* op = out->typed_data();
  float* lp = lse->typed_data();
  const int64_t per = p.tiles_per_unit(), lds = p.ld;
  p.split(pool, [&](int64_t first, int64_t last, int) {
    std::vector<float> s(R * lds), scrap(p.d);
    for (int64_t e = first; e < last; ++e) {
      const auto tl = p.tile(e / per, e % per);
      p.scores(tl, kt.data(), s.data(), lds);
      float l[R], m[R];
      float* outs[R];
      for (int r = 0; r < R; ++r) {
        m[r] = max_row(s.data() + r * lds, tl.n);
        const bool seen = m[r] != NEG_INF;
        l[r] = seen ? exp_row(s.data() + r * lds, tl.n, m[r]) : 0.f;
        if (!seen) std::fill(s.begin() + r * lds, s.begin() + r * lds + tl.n, 0.f);
        outs[r] = r < tl.rows ? op + tl.row[r] * p.d : scrap.data();
      }
      weighted_rows_d(s.data(), lds, p.keys_of(p.v, tl), p.K * p.d, tl.k0, tl.n, p.d, outs);
      for (int r = 0; r < tl.rows; ++r) {
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int64_t e = 0; e < p.d; ++e) outs[r][e] *= inv;
        lp[tl.row[r]] = l[r] > 0.f ? m[r] + std::log(l[r]) : 0.f;
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> key_mask, ffi::Buffer<ffi::F32> out,
                        ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                        ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, int64_t index,
                        int64_t window) {
  if (!valid(q, k, v, key_mask))
    return ffi::Error::InvalidArgument("needs q [b, t, h, d], k, v [b, S, K, d] with h % K == 0 and d % 16 == 0");
  const Problem p(q, k, v, key_mask, index, window);
  const std::vector<float> kt = p.transposed(p.k), vt = p.transposed(p.v);
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = dout.typed_data();
  float* dqp = dq->typed_data();
  const int64_t per = p.tiles_per_unit(), lds = p.ld, keys = p.b * p.K * p.S * p.d;
  // dk, dv of each thread, [b, K, S, d]
  std::vector<float> acc[2] = {std::vector<float>(2 * keys, 0.f), std::vector<float>()};
  p.split(pool, [&](int64_t first, int64_t last, int thread) {
    std::vector<float>& mine = acc[thread];
    if (mine.empty()) mine.assign(2 * keys, 0.f);
    std::vector<float> pr(R * lds), ds(R * lds), scrap(p.d);
    for (int64_t e = first; e < last; ++e) {
      const auto tl = p.tile(e / per, e % per);
      const int64_t unit = tl.bi * p.K + tl.kh;
      p.scores(tl, kt.data(), pr.data(), lds);
      const float* douts[R];
      const float* qs[R];
      float* dqs[R];
      for (int r = 0; r < R; ++r) {
        douts[r] = gp + tl.row[r] * p.d;
        qs[r] = p.q + tl.row[r] * p.d;
        dqs[r] = r < tl.rows ? dqp + tl.row[r] * p.d : scrap.data();
      }
      products(douts, vt.data() + unit * p.d * p.ld, p.ld, p.d, tl.k0, tl.n, 1.f, nullptr, ds.data(), lds);
      for (int r = 0; r < R; ++r) {
        float* prr = pr.data() + r * lds;
        float* dsr = ds.data() + r * lds;
        exp_row(prr, tl.n, lp[tl.row[r]]);
        if (r >= tl.rows) std::fill(prr, prr + tl.n, 0.f);  // a repeated row adds nothing to dk, dv
        const __m512 dl = _mm512_set1_ps(dot(gp + tl.row[r] * p.d, op + tl.row[r] * p.d, p.d)), sc = _mm512_set1_ps(p.scale);
        for (int64_t j = 0; j < tl.n; j += 16) {
          const __mmask16 m = tail(tl.n - j);
          const __m512 pj = _mm512_maskz_loadu_ps(m, prr + j), dpj = _mm512_maskz_loadu_ps(m, dsr + j);
          _mm512_mask_storeu_ps(dsr + j, m, _mm512_mul_ps(_mm512_mul_ps(pj, _mm512_sub_ps(dpj, dl)), sc));
        }
      }
      weighted_rows_d(ds.data(), lds, p.keys_of(p.k, tl), p.K * p.d, tl.k0, tl.n, p.d, dqs);
      accumulate_keys_d(ds.data(), lds, qs, tl.k0, tl.n, p.d, mine.data() + unit * p.S * p.d);
      accumulate_keys_d(pr.data(), lds, douts, tl.k0, tl.n, p.d, mine.data() + keys + unit * p.S * p.d);
    }
  });
  // dk, dv: the threads' sums, back to [b, S, K, d].
  float *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const bool two = !acc[1].empty();
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
                                  .Attr<int64_t>("window"));

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
                                  .Attr<int64_t>("window"));
