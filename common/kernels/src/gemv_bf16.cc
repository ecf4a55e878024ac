#include "gemv_bf16.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>

namespace duet::kernels {

bool HasAvx512Bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return has;
}

namespace {

// K-pairs per K-chunk: 64 k-pairs x 64 columns of bf16 pairs = 16 KB of weights, which stays in
// L1 (48 KB) next to the prefetched next chunk while every row chunk reads it.
constexpr int64_t kKc = 64;
constexpr int64_t kMaxRows = 16;  // rows per call of the chunked kernel (3 row chunks)

// R rows x 64 columns over the `np` k-pairs of one K-chunk (np >= 1). Starts from zero (kFirst) or
// from the partial sums in `in` (R rows, stride 64), and stores to `out` (stride ld_out).
// Meanwhile prefetches `pf_lines` cache lines from `pf` onwards, `lpi` per k-pair: the weight
// stream one K-chunk ahead, so DRAM keeps streaming while later row chunks compute from L1.
template <int R, bool kFirst>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void Chunk(
    const int32_t* x, int64_t x_stride, const uint16_t* wb, int64_t np, const float* in,
    float* out, int64_t ld_out, const char* pf, int64_t pf_lines, int64_t lpi) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c)
      acc[r][c] = kFirst ? _mm512_setzero_ps() : _mm512_loadu_ps(in + r * 64 + 16 * c);
  int64_t p = 0;
  do {  // np >= 1
    if (p * lpi < pf_lines) {
      for (int64_t i = 0; i < lpi; ++i) _mm_prefetch(pf + (p * lpi + i) * 64, _MM_HINT_T0);
    }
    const uint16_t* wp = wb + p * 128;
    const __m512i w0 = _mm512_loadu_si512(wp);
    const __m512i w1 = _mm512_loadu_si512(wp + 32);
    const __m512i w2 = _mm512_loadu_si512(wp + 64);
    const __m512i w3 = _mm512_loadu_si512(wp + 96);
    for (int r = 0; r < R; ++r) {
      const __m512i xb = _mm512_set1_epi32(x[r * x_stride + p]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)xb, (__m512bh)w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)xb, (__m512bh)w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], (__m512bh)xb, (__m512bh)w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], (__m512bh)xb, (__m512bh)w3);
    }
  } while (++p < np);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + r * ld_out + 16 * c, acc[r][c]);
}

using ChunkFn = void (*)(const int32_t*, int64_t, const uint16_t*, int64_t, const float*, float*,
                         int64_t, const char*, int64_t, int64_t);
constexpr ChunkFn kChunks[2][7] = {
    {nullptr, Chunk<1, false>, Chunk<2, false>, Chunk<3, false>, Chunk<4, false>, Chunk<5, false>,
     Chunk<6, false>},
    {nullptr, Chunk<1, true>, Chunk<2, true>, Chunk<3, true>, Chunk<4, true>, Chunk<5, true>,
     Chunk<6, true>}};

using Clock = std::chrono::steady_clock;

}  // namespace

void GemvSplit::Bounds(int nt, int64_t n_blocks, int64_t* bounds) {
  if (nt != nt_) {
    nt_ = nt;
    for (int t = 0; t < nt; ++t) share_[t] = 1.0 / nt;
  }
  // Every thread gets at least one block when there are enough (a thread without blocks would
  // go unmeasured, and its share would never move again).
  const int64_t least = n_blocks >= nt ? 1 : 0;
  double cum = 0;
  bounds[0] = 0;
  for (int t = 1; t < nt; ++t) {
    cum += share_[t - 1];
    const int64_t lo = bounds[t - 1] + least, hi = n_blocks - least * (nt - t);
    bounds[t] = std::clamp<int64_t>(std::llround(cum * n_blocks), lo, std::max(lo, hi));
  }
  bounds[nt] = n_blocks;
}

void GemvSplit::Update(int nt, const int64_t* bounds, const double* seconds) {
  if (nt != nt_ || nt < 2) return;
  // Each measured thread's speed (blocks per second) says what share would have finished with
  // the others; move a quarter of the way there, so one noisy call moves the split little.
  double rate[kMaxThreads], measured = 0, unmeasured_share = 0;
  for (int t = 0; t < nt; ++t) {
    const int64_t blocks = bounds[t + 1] - bounds[t];
    rate[t] = blocks > 0 && seconds[t] > 0 ? blocks / seconds[t] : 0;
    if (!std::isfinite(rate[t])) rate[t] = 0;  // a time too small to divide by: unmeasured
    if (rate[t] > 0) {
      measured += rate[t];
    } else {
      unmeasured_share += share_[t];
    }
  }
  if (!(measured > 0) || !std::isfinite(measured)) return;
  double total = 0;
  for (int t = 0; t < nt; ++t) {
    if (rate[t] > 0) {
      const double target = (1 - unmeasured_share) * rate[t] / measured;
      share_[t] += 0.25 * (target - share_[t]);
    }
    total += share_[t];
  }
  for (int t = 0; t < nt; ++t) share_[t] /= total;
  // Every thread keeps at least a quarter of an even share (a thread that stalled once, say on
  // a neighbour's burst, still gets measured): lift those below, take it from the rest.
  const double floor = 0.25 / nt;
  for (int pass = 0; pass < nt; ++pass) {
    double lifted = 0, rest = 0;
    for (int t = 0; t < nt; ++t) {
      if (share_[t] < floor) {
        lifted += floor - share_[t];
        share_[t] = floor;
      } else if (share_[t] > floor) {
        rest += share_[t] - floor;
      }
    }
    if (lifted <= 0 || rest <= 0) break;
    for (int t = 0; t < nt; ++t)
      if (share_[t] > floor) share_[t] -= lifted * (share_[t] - floor) / rest;
  }
}

void GemvBf16(const uint16_t* x, int64_t m, int64_t kp, const uint16_t* w, int64_t n, float* y,
              GemvSplit* split) {
  const int64_t n_blocks = (n + 63) / 64;
  const int64_t block_elems = kp * 64;  // one N-block: all of K for 64 columns
  if (m > kMaxRows) {  // Linear sends at most 16 rows; more run as groups of 16
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows)
      GemvBf16(x + r0 * kp, std::min(kMaxRows, m - r0), kp, w, n, y + r0 * n, split);
    return;
  }
  // Each N-block's K is split into chunks of kKc k-pairs; every row chunk (<= 6 rows, 4 x rows
  // accumulators) runs over one K-chunk before the next, with the partial sums of all rows in a
  // per-thread tile. The first row chunk reads the K-chunk from memory (prefetched), the others
  // from L1, and all of them prefetch the next K-chunk, so reading the weights overlaps the dot
  // products instead of alternating with them (the old kernel ran each row chunk over all of K:
  // the first streamed from DRAM while the core waited, the others computed from L2 while DRAM
  // idled). Software prefetch also streams faster than the hardware prefetchers alone at M = 1.
  const int64_t n_chunks = (m + 5) / 6;  // balanced row chunks of at most 6 rows
  int64_t chunk_rows[3], chunk_r0[3];
  for (int64_t c = 0, r0 = 0; c < n_chunks; ++c) {
    chunk_rows[c] = m / n_chunks + (c < m % n_chunks ? 1 : 0);
    chunk_r0[c] = r0;
    r0 += chunk_rows[c];
  }
  const int64_t pairs = kp / 2;
  const auto* x32 = reinterpret_cast<const int32_t*>(x);
  // Contiguous ranges of N-blocks: each thread reads one stretch of the weights.
  const int nt_want = omp_get_max_threads();
  const bool steer = split != nullptr && nt_want >= 2 && nt_want <= GemvSplit::kMaxThreads;
  int64_t bounds[GemvSplit::kMaxThreads + 1];
  double busy[GemvSplit::kMaxThreads] = {};
  bool as_planned = steer;
  if (steer) split->Bounds(nt_want, n_blocks, bounds);
#pragma omp parallel
  {
    alignas(64) float tile[kMaxRows * 64];  // partial sums, [row][64 columns]
    alignas(64) float last[kMaxRows * 64];  // final sums of a partial N-block (< 64 columns)
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    const bool planned = steer && nt == nt_want;
    if (steer && !planned && t == 0) as_planned = false;
    const Clock::time_point t_begin = planned ? Clock::now() : Clock::time_point{};
    const int64_t nb0 = planned ? bounds[t] : n_blocks * t / nt;
    const int64_t nb1 = planned ? bounds[t + 1] : n_blocks * (t + 1) / nt;
    const int64_t stream_end = nb1 * block_elems;  // end of this thread's weights (elements)
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const uint16_t* wb = w + nb * block_elems;
      const int64_t n_cols = std::min<int64_t>(64, n - nb * 64);
      for (int64_t p0 = 0; p0 < pairs; p0 += kKc) {
        const int64_t np = std::min(kKc, pairs - p0);
        const bool first = p0 == 0, final_chunk = p0 + np == pairs;
        // N-blocks are contiguous, so "one K-chunk ahead" runs on into the next N-block; the
        // chunk's lines are split between the row chunks.
        const int64_t pf_at = nb * block_elems + (p0 + kKc) * 128;
        const int64_t lines = std::clamp<int64_t>((stream_end - pf_at) / 32, 0, np * 4);
        const char* pf = reinterpret_cast<const char*>(w + std::min(pf_at, stream_end));
        const int64_t per_chunk = (lines + n_chunks - 1) / n_chunks;
        const int64_t lpi = (per_chunk + np - 1) / np;
        for (int64_t c = 0; c < n_chunks; ++c) {
          const int64_t r0 = chunk_r0[c];
          float* out = tile + r0 * 64;
          int64_t ld = 64;
          if (final_chunk && n_cols == 64) {
            out = y + r0 * n + nb * 64;
            ld = n;
          } else if (final_chunk) {
            out = last + r0 * 64;
          }
          const int64_t pf_lines = std::clamp<int64_t>(lines - c * per_chunk, 0, per_chunk);
          kChunks[first][chunk_rows[c]](x32 + r0 * pairs + p0, pairs, wb + p0 * 128, np,
                                        tile + r0 * 64, out, ld, pf + c * per_chunk * 64,
                                        pf_lines, lpi);
        }
      }
      if (n_cols < 64)
        for (int64_t r = 0; r < m; ++r)
          std::copy(last + r * 64, last + r * 64 + n_cols, y + r * n + nb * 64);
    }
    if (planned) busy[t] = std::chrono::duration<double>(Clock::now() - t_begin).count();
  }
  if (as_planned) split->Update(nt_want, bounds, busy);
}

}  // namespace duet::kernels
