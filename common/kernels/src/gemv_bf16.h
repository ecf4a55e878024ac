// Small-M matmul straight from oneDNN's packed bf16 weight layout BA16a64b2a, with AVX-512-BF16
// dot products. Decode steps (M = batch size) are bound by reading the weights once; oneDNN's
// brgemm reads them at a fraction of the machine's bandwidth at M=1, this kernel streams them.
#pragma once

#include <cstdint>

namespace duet::kernels {

// True when the CPU has AVX-512-BF16 (and so can run GemvBf16).
bool HasAvx512Bf16();

// y[m, n] = sum_k x[m, k] w[k, n] for m < M, n < N.
// w: BA16a64b2a over (K, N): blocks of 32 K x 64 N, N-blocks outermost, each block stored as
//    [16 k-pairs][64 n][2]; padded to Kp = ceil(K/32)*32, Np = ceil(N/64)*64 with zeros.
// x: bf16 [M, Kp] with zero padding past K; y: f32 [M, N] (row stride N).
// Runs on the OpenMP pool, splitting N-blocks between threads.
void GemvBf16(const uint16_t* x, int64_t m, int64_t kp, const uint16_t* w, int64_t n,
              float* y);

}  // namespace duet::kernels
