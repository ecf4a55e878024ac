#include "gemv_bf16.h"

#include <immintrin.h>

#include <algorithm>

namespace duet::kernels {

bool HasAvx512Bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return has;
}

namespace {

// One N-block of 64 columns for R rows (R <= 6): 4R accumulators of 16 floats in registers.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void Block(const uint16_t* x, int64_t kp,
                                                                   const uint16_t* wb, float* out,
                                                                   int64_t ld_out, int64_t n_cols) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t pairs = kp / 2;
  const auto* x32 = reinterpret_cast<const int32_t*>(x);  // bf16 pairs
  const int64_t x_stride = kp / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* wp = wb + p * 128;
    const __m512i w0 = _mm512_loadu_si512(wp);
    const __m512i w1 = _mm512_loadu_si512(wp + 32);
    const __m512i w2 = _mm512_loadu_si512(wp + 64);
    const __m512i w3 = _mm512_loadu_si512(wp + 96);
    for (int r = 0; r < R; ++r) {
      const __m512i xb = _mm512_set1_epi32(x32[r * x_stride + p]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)xb, (__m512bh)w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)xb, (__m512bh)w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], (__m512bh)xb, (__m512bh)w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], (__m512bh)xb, (__m512bh)w3);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = out + r * ld_out;
    if (n_cols == 64) {
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + 16 * c, acc[r][c]);
    } else {
      alignas(64) float tmp[64];
      for (int c = 0; c < 4; ++c) _mm512_store_ps(tmp + 16 * c, acc[r][c]);
      for (int64_t j = 0; j < n_cols; ++j) o[j] = tmp[j];
    }
  }
}

// One row (decode at batch 1): eight accumulators, two independent chains per output vector,
// so dot-product latency never limits the weight stream.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void Block1x2(const uint16_t* x, int64_t kp,
                                                                      const uint16_t* wb, float* out,
                                                                      int64_t /*ld_out*/,
                                                                      int64_t n_cols) {
  __m512 a[8];
  for (int c = 0; c < 8; ++c) a[c] = _mm512_setzero_ps();
  const int64_t pairs = kp / 2;
  const auto* x32 = reinterpret_cast<const int32_t*>(x);
  int64_t p = 0;
  for (; p + 1 < pairs; p += 2) {
    const uint16_t* wp = wb + p * 128;
    const __m512i x0 = _mm512_set1_epi32(x32[p]);
    const __m512i x1 = _mm512_set1_epi32(x32[p + 1]);
    a[0] = _mm512_dpbf16_ps(a[0], (__m512bh)x0, (__m512bh)_mm512_loadu_si512(wp));
    a[1] = _mm512_dpbf16_ps(a[1], (__m512bh)x0, (__m512bh)_mm512_loadu_si512(wp + 32));
    a[2] = _mm512_dpbf16_ps(a[2], (__m512bh)x0, (__m512bh)_mm512_loadu_si512(wp + 64));
    a[3] = _mm512_dpbf16_ps(a[3], (__m512bh)x0, (__m512bh)_mm512_loadu_si512(wp + 96));
    a[4] = _mm512_dpbf16_ps(a[4], (__m512bh)x1, (__m512bh)_mm512_loadu_si512(wp + 128));
    a[5] = _mm512_dpbf16_ps(a[5], (__m512bh)x1, (__m512bh)_mm512_loadu_si512(wp + 160));
    a[6] = _mm512_dpbf16_ps(a[6], (__m512bh)x1, (__m512bh)_mm512_loadu_si512(wp + 192));
    a[7] = _mm512_dpbf16_ps(a[7], (__m512bh)x1, (__m512bh)_mm512_loadu_si512(wp + 224));
  }
  for (; p < pairs; ++p) {
    const uint16_t* wp = wb + p * 128;
    const __m512i x0 = _mm512_set1_epi32(x32[p]);
    for (int c = 0; c < 4; ++c)
      a[c] = _mm512_dpbf16_ps(a[c], (__m512bh)x0, (__m512bh)_mm512_loadu_si512(wp + 32 * c));
  }
  alignas(64) float tmp[64];
  for (int c = 0; c < 4; ++c) _mm512_store_ps(tmp + 16 * c, _mm512_add_ps(a[c], a[c + 4]));
  for (int64_t j = 0; j < n_cols; ++j) out[j] = tmp[j];
}

using BlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, float*, int64_t, int64_t);
constexpr BlockFn kBlocks[] = {nullptr,   Block1x2, Block<2>, Block<3>,
                               Block<4>, Block<5>, Block<6>};

}  // namespace

void GemvBf16(const uint16_t* x, int64_t m, int64_t kp, const uint16_t* w, int64_t n, float* y) {
  const int64_t n_blocks = (n + 63) / 64;
  const int64_t block_elems = kp * 64;  // one N-block: all of K for 64 columns
#pragma omp parallel for schedule(static)
  for (int64_t nb = 0; nb < n_blocks; ++nb) {
    const uint16_t* wb = w + nb * block_elems;
    const int64_t n_cols = std::min<int64_t>(64, n - nb * 64);
    // Row chunks of up to 6 reuse this N-block's weights from L1/L2.
    for (int64_t r0 = 0; r0 < m; r0 += 6) {
      const int64_t rows = std::min<int64_t>(6, m - r0);
      kBlocks[rows](x + r0 * kp, kp, wb, y + r0 * n + nb * 64, n, n_cols);
    }
  }
}

}  // namespace duet::kernels
