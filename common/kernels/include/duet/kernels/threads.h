// The engine's thread count: oneDNN and duet's own kernels share one OpenMP pool.
#pragma once

namespace duet::kernels {

// Sets the number of threads used by every kernel. n <= 0 keeps the default (all cores).
void SetNumThreads(int n);
int NumThreads();

}  // namespace duet::kernels
