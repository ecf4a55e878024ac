// Naive reference ops: obviously correct, slow; tests hold the fast kernels against these.
#pragma once

#include <cstdint>

namespace duet::kernels::reference {

// y[m,n] = sum_k x[m,k] * w[k,n] (+ bias[n]), accumulated in double. w is row-major [K,N].
void Matmul(const float* x, const float* w, const float* bias, int64_t m, int64_t k, int64_t n,
            float* y);

}  // namespace duet::kernels::reference
