#include "duet/kernels/reference.h"

namespace duet::kernels::reference {

void Matmul(const float* x, const float* w, const float* bias, int64_t m, int64_t k, int64_t n,
            float* y) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = bias != nullptr ? bias[j] : 0.0;
      for (int64_t p = 0; p < k; ++p) acc += static_cast<double>(x[i * k + p]) * w[p * n + j];
      y[i * n + j] = static_cast<float>(acc);
    }
  }
}

}  // namespace duet::kernels::reference
