// Splitting a kernel's work between the calling thread and XLA's intra-op thread pool (the CPU kernels of
// cpu_matmul.cc and cpu_attention.cc).
#pragma once

#include <immintrin.h>

#include <atomic>
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

}  // namespace qalora
