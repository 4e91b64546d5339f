// Splitting a kernel's work between the calling thread and XLA's intra-op thread pool (the CPU kernels of
// cpu_matmul.cc, cpu_attention.cc and cpu_gemm.cc).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace qalora {

// Runs first() here and offers second() to XLA's thread pool; whichever thread claims second() first runs it.
// The caller claims it itself if no pool thread has by the time first() is done, so a busy pool cannot
// deadlock the call.
template <typename F, typename G>
void both(xla::ffi::ThreadPool& pool, F first, G second) {
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

// Runs task(0) ... task(n - 1), each once, on this thread and on as many of the pool's as claim one: every thread
// takes the next unclaimed task until none is left, so a pool thread busy elsewhere delays nothing; returns when
// all have run. A pool thread that starts after the last task was claimed returns without touching `task`.
template <typename Pool, typename F>
void tasks(Pool& pool, int64_t n, const F& task) {
  struct Counter {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counter = std::make_shared<Counter>();
  auto work = [counter, n, &task]() {
    for (int64_t i; (i = counter->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      task(i);
      counter->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < std::min<int64_t>(pool.num_threads(), n - 1); ++t) pool.Schedule([work]() { work(); });
  work();
  while (counter->done.load(std::memory_order_acquire) < n) _mm_pause();
}

}  // namespace qalora
