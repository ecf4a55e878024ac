#include "duet/kernels/threads.h"

#include <omp.h>

namespace duet::kernels {

void SetNumThreads(int n) {
  if (n > 0) omp_set_num_threads(n);
}

int NumThreads() { return omp_get_max_threads(); }

}  // namespace duet::kernels
