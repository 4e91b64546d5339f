// AMX tiles for the CPU kernels (cpu_attention.cc, cpu_gemm.cc): the process's permission to use them, and the
// tile configuration both use.
#pragma once

#ifdef __AMX_BF16__
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace qalora {

// Asks Linux, once, for this process's AMX tile state (XTILEDATA, feature 18); false where it refuses.
inline bool amx_permitted() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
  return granted;
}

// Eight tiles of 16 rows of 64 bytes on this thread while in scope. Configured by each user in turn: another
// library on the thread may have configured the tiles otherwise since.
struct Tiles {
  struct Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
  };
  Tiles() {
    Config c;
    for (int i = 0; i < 8; ++i) c.bytes_per_row[i] = 64, c.rows[i] = 16;
    _tile_loadconfig(&c);
  }
  ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

}  // namespace qalora
#endif
