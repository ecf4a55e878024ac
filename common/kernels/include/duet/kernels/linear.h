// y[M,N] = x[M,K] · W[K,N] (+ bias[N]) as a oneDNN matmul with weights prepacked once.
//
// Activations are f32 on both sides. In bf16 precision the weights are held in oneDNN's blocked
// bf16 layout and x is rounded to bf16 before the matmul (f32 accumulation); in f32 precision
// everything is f32, for exactness tests. Primitives are built once per M and cached. Up to 16
// rows in bf16 run duet's own kernels on the same packed weights (small_m_kernel()).
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "duet/tensor/dtype.h"

namespace duet::kernels {

enum class Precision : uint8_t { kF32, kBF16 };

// How the source weight matrix is stored in memory.
enum class WeightLayout : uint8_t {
  kKN,  // row-major [K, N] (GPT-2 Conv1D: [in, out])
  kNK,  // row-major [N, K] (nn.Linear: [out, in])
};

class Linear {
 public:
  // Packs `weights` (f32, in `layout`) for the matmul. `bias` may be null; it is copied.
  // Fails with INVALID_ARGUMENT for non-positive sizes, INTERNAL when oneDNN refuses.
  static absl::StatusOr<std::unique_ptr<Linear>> Create(int64_t k, int64_t n, const float* weights,
                                                        WeightLayout layout, const float* bias,
                                                        Precision precision);
  ~Linear();

  // y = x · W (+ bias). x: f32 [m, k] row-major, y: f32 [m, n] row-major. Not thread-safe:
  // a Linear is used by one engine thread at a time (primitives and scratch are cached inside).
  absl::Status Forward(const float* x, int64_t m, float* y);

  int64_t k() const;
  int64_t n() const;
  // Bytes of packed weights (what one M=1 forward must read).
  size_t weight_bytes() const;
  // What runs m <= 16 rows (decode): "amx" (duet's AMX tile kernel, where the CPU has AMX-BF16
  // and ONEDNN_MAX_CPU_ISA does not rule it out), "avx512-bf16" (duet's dot-product kernel) or
  // "onednn" (f32 precision, or a CPU without AVX-512-BF16).
  const char* small_m_kernel() const;

 private:
  struct Impl;
  explicit Linear(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace duet::kernels
