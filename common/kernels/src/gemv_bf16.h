// Small-M matmuls straight from oneDNN's packed bf16 weight layout BA16a64b2a: GemvBf16 with
// AVX-512-BF16 dot products, GemmAmxBf16 with AMX tiles. Decode steps (M = batch size) are bound
// by reading the weights once; oneDNN's brgemm reads them at a fraction of the machine's
// bandwidth at M=1, these kernels stream them.
#pragma once

#include <cstdint>

namespace duet::kernels {

// True when the CPU has AVX-512-BF16 (and so can run GemvBf16).
bool HasAvx512Bf16();

// True when the CPU has AMX-BF16 and the OS lets this process use the tile registers (and so
// GemmAmxBf16 can run).
bool HasAmxBf16();

// How one matrix's N-blocks are split between the threads: each thread's share, steered after
// every call toward equal busy times (each thread's time from its own start in the parallel
// region to its end; a late start is not seen). The threads of a 2-core VM do not stream one
// matrix's halves equally fast (measured in the model: one half 10-20% slower, the same half call
// after call), and with a fixed even split the faster thread waits at the barrier. Not
// thread-safe: one per matrix and size class, as Linear keeps them.
class GemvSplit {
 public:
  static constexpr int kMaxThreads = 16;
  // First N-block of each of nt threads, and n_blocks at bounds[nt]; at least one block each
  // when n_blocks >= nt. A new nt starts from even shares.
  void Bounds(int nt, int64_t n_blocks, int64_t* bounds);
  // After a call with those bounds: each thread's busy seconds.
  void Update(int nt, const int64_t* bounds, const double* seconds);
  // Thread t's current share (for tests): 1/nt from the first Bounds until the first Update.
  double share(int t) const { return share_[t]; }

 private:
  int nt_ = 0;
  double share_[kMaxThreads] = {};
};

// y[m, n] = sum_k x[m, k] w[k, n] for m < M, n < N.
// w: BA16a64b2a over (K, N): blocks of 32 K x 64 N, N-blocks outermost, each block stored as
//    [16 k-pairs][64 n][2]; padded to Kp = ceil(K/32)*32, Np = ceil(N/64)*64 with zeros.
// x: bf16 [M, Kp] with zero padding past K; y: f32 [M, N] (row stride N).
// Runs on the OpenMP pool, splitting N-blocks between threads in contiguous ranges: by `split`
// (which the call then updates) when it is given and the pool has 2 to kMaxThreads threads,
// evenly otherwise (no split, one thread, more than kMaxThreads, or a team smaller than
// omp_get_max_threads()).
void GemvBf16(const uint16_t* x, int64_t m, int64_t kp, const uint16_t* w, int64_t n,
              float* y, GemvSplit* split = nullptr);

// The same product with AMX tiles: m rows of x (up to 16 per tile; more run as groups of 16)
// against each 32 K x 16 N tile of the weights, with the same thread split. x comes packed by
// PackAmxRows, so that each tile of x is 1 KB of consecutive lines. Its dot products cost little
// at any M <= 16, where GemvBf16's bind from M = 5 on (on a 2-core Xeon with AMX-BF16, GPT-2's
// 768 x 3072 from DRAM: M = 16 in 188-213 us against 453-480; M = 1 in 169-180 us against
// 200-212). Needs HasAmxBf16(). Sums in f32 in another order than GemvBf16, so the two agree to
// rounding, not bit for bit.
// With `bias` (ceil(n / 64) * 64 floats, the columns past n ignored), y = x w + bias: the tiles
// start from the bias rather than from zero, which saves Linear a pass over y.
void GemmAmxBf16(const uint16_t* x_packed, int64_t m, int64_t kp, const uint16_t* w, int64_t n,
                 float* y, GemvSplit* split = nullptr, const float* bias = nullptr);

// x (f32 [m, k], row stride k) rounded to bf16 in GemmAmxBf16's order: groups of up to 16 rows,
// each group [kp / 32][rows][32] (K-slices outermost, zero padded from k to kp); m * kp values.
// Rounds as F32ToBf16 does except that denormal inputs become zeros of their sign (AVX-512-BF16's
// conversion; such values are below 1.2e-38). Needs HasAmxBf16() (which implies AVX-512-BF16).
void PackAmxRows(const float* x, int64_t m, int64_t k, int64_t kp, uint16_t* out);

}  // namespace duet::kernels
