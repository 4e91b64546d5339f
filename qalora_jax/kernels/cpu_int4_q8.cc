// y = x W on the CPU for a group-wise INT4 W, reading the packed codes (see qalora_jax/kernels/cpu_int4.py).
//
// W[i, o] = scale[g, o] * q[i, o] + offset[g, o] for input i in group g; q is packed 8 codes per uint32 word along
// the input axis, code k of word j (input 8j + k) in bits [4k, 4k + 4). Each row of x is quantized to int8 per
// group (x_i ~ a_g xq_i, a_g = max_{i in g} |x_i| / 127, the llama.cpp Q8 scheme), so that
//
//   y_o = sum_g ( a_g scale[g, o] sum_{i in g} xq_i q[i, o] + offset[g, o] sum_{i in g} x_i )
//
// and the inner sums are AVX512-VNNI byte dot products: the low nibbles of a word are the codes of the even
// inputs, the high nibbles those of the odd inputs, each a [4 x u8] lane against a broadcast [4 x s8] quad of xq.
// A wide layer's columns are split in two halves, the second offered to XLA's intra-op thread pool.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "needs AVX512F, AVX512BW and AVX512-VNNI"
#endif

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // 16 float16 values
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One row of x quantized to int8 per group: the byte quads of the even and the odd inputs of each word (the
// order the codes' low and high nibbles hold them), the steps a_g and the float sums of each group.
struct Quantized {
  std::vector<int32_t> even, odd;
  std::vector<float> step, sum;
};

Quantized quantize_row(const float* x, int64_t n_in, int64_t group) {
  const int64_t n_groups = n_in / group, words = group / 8;
  Quantized q{std::vector<int32_t>(n_in / 8), std::vector<int32_t>(n_in / 8), std::vector<float>(n_groups),
              std::vector<float>(n_groups)};
  for (int64_t g = 0; g < n_groups; ++g) {
    float amax = 0.f, sum = 0.f;
    for (int64_t i = g * group; i < (g + 1) * group; ++i) {
      amax = std::max(amax, std::fabs(x[i]));
      sum += x[i];
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    q.step[g] = amax / 127.f;
    q.sum[g] = sum;
    for (int64_t j = g * words; j < (g + 1) * words; ++j) {
      int8_t e[4], o[4];
      for (int k = 0; k < 4; ++k) {
        e[k] = static_cast<int8_t>(std::nearbyint(x[8 * j + 2 * k] * inv));
        o[k] = static_cast<int8_t>(std::nearbyint(x[8 * j + 2 * k + 1] * inv));
      }
      std::memcpy(&q.even[j], e, 4);
      std::memcpy(&q.odd[j], o, 4);
    }
  }
  return q;
}

// y[c] for the columns c in [c0, c1) (multiples of 16).
template <typename S>
void columns(const Quantized& q, const uint32_t* codes, const S* scale, const S* offset, float* y, int64_t n_in,
             int64_t n_out, int64_t group, int64_t c0, int64_t c1) {
  const int64_t n_groups = n_in / group, words = group / 8;
  const __m512i nibble = _mm512_set1_epi32(0x0F0F0F0F);
  std::fill(y + c0, y + c1, 0.f);
  for (int64_t g = 0; g < n_groups; ++g) {
    const __m512 ag = _mm512_set1_ps(q.step[g]), sg = _mm512_set1_ps(q.sum[g]);
    for (int64_t c = c0; c < c1; c += 16) {  // 16 columns: the group's rows of words, the dot product in a register
      __m512i dot = _mm512_setzero_si512();
      for (int64_t j = g * words; j < (g + 1) * words; ++j) {
        const __m512i w = _mm512_loadu_si512(codes + j * n_out + c);
        dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(w, nibble), _mm512_set1_epi32(q.even[j]));
        dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi32(w, 4), nibble), _mm512_set1_epi32(q.odd[j]));
      }
      __m512 r = _mm512_loadu_ps(y + c);
      r = _mm512_fmadd_ps(_mm512_mul_ps(load16(scale + g * n_out + c), ag), _mm512_cvtepi32_ps(dot), r);
      r = _mm512_fmadd_ps(load16(offset + g * n_out + c), sg, r);
      _mm512_storeu_ps(y + c, r);
    }
  }
}

// Runs first() here and offers second() to XLA's thread pool; whichever thread claims second() first runs it.
// The caller claims it itself if no pool thread has by the time first() is done, so a busy pool cannot
// deadlock the call.
template <typename F, typename G>
void both(ffi::ThreadPool& pool, F first, G second) {
  struct Claim {
    std::atomic<bool> taken{false}, done{false};
  };
  auto claim = std::make_shared<Claim>();
  pool.Schedule([claim, second]() {
    if (!claim->taken.exchange(true)) {
      second();
      claim->done.store(true, std::memory_order_release);
    }
  });
  first();
  if (!claim->taken.exchange(true)) {
    second();
  } else {
    while (!claim->done.load(std::memory_order_acquire)) _mm_pause();
  }
}

template <ffi::DataType T, typename S>
ffi::Error Int4MatmulQ8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> codes,
                        ffi::Buffer<T> scale, ffi::Buffer<T> offset, ffi::ResultBuffer<ffi::F32> y, int64_t group) {
  const auto xd = x.dimensions(), cd = codes.dimensions();
  if (xd.size() != 2 || cd.size() != 2) return ffi::Error::InvalidArgument("x and codes must be 2-D");
  const int64_t rows = xd[0], n_in = xd[1], n_out = cd[1];
  if (group % 8 || n_in % group || cd[0] * 8 != n_in || n_out % 16)
    return ffi::Error::InvalidArgument("needs group % 8 == 0, in % group == 0, codes [in / 8, out], out % 16 == 0");
  const S* s = reinterpret_cast<const S*>(scale.typed_data());
  const S* o = reinterpret_cast<const S*>(offset.typed_data());
  const uint32_t* c = codes.typed_data();
  // Split only wide layers: a small one is not worth a task.
  const int64_t half = n_in * n_out >= (1 << 18) && pool.num_threads() > 1 ? 16 * (n_out / 32) : 0;
  for (int64_t r = 0; r < rows; ++r) {
    const Quantized q = quantize_row(x.typed_data() + r * n_in, n_in, group);
    float* yr = y->typed_data() + r * n_out;
    if (half) {
      both(pool, [&] { columns<S>(q, c, s, o, yr, n_in, n_out, group, 0, half); },
           [&q, c, s, o, yr, n_in, n_out, group, half] { columns<S>(q, c, s, o, yr, n_in, n_out, group, half, n_out); });
    } else {
      columns<S>(q, c, s, o, yr, n_in, n_out, group, 0, n_out);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

#define QALORA_BIND(T)                                                                                         \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::U32>>().Arg<       \
      ffi::Buffer<T>>().Arg<ffi::Buffer<T>>().Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("group")

XLA_FFI_DEFINE_HANDLER_SYMBOL(qalora_int4_q8_f32, (Int4MatmulQ8<ffi::F32, float>), QALORA_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(qalora_int4_q8_f16, (Int4MatmulQ8<ffi::F16, uint16_t>), QALORA_BIND(ffi::F16));
