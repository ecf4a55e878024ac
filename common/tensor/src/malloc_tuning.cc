#include "duet/tensor/malloc_tuning.h"

#include <malloc.h>

#include <cstdlib>

namespace duet {

void KeepFreedMemory() {
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") == nullptr) mallopt(M_MMAP_THRESHOLD, 256 << 20);
  if (std::getenv("MALLOC_TRIM_THRESHOLD_") == nullptr) mallopt(M_TRIM_THRESHOLD, 512 << 20);
}

}  // namespace duet
