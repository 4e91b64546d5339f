// Decoding attention on the CPU: a few queries against a KV cache as it lies (see
// qalora_jax/kernels/cpu_attention.py), out = softmax(q k^T / sqrt(d) + mask) v per query head, float32.
//
// q [b, t, h, d]; k, v [b, S, K, d], query head n reading KV head n / (h / K). Query i sits at slot index + i and
// sees key slot j iff key_mask[b, j], j <= index + i and (window == 0 or index + i - j < window). A query that
// sees no key gets the mean of all S values (what the dense form's uniform softmax over masked scores gives).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

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
