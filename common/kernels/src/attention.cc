#include "duet/kernels/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fast_math.h"

#include <immintrin.h>

namespace duet::kernels {
namespace {

// A unit of work: one sequence, one kv head, a tile of consecutive new rows. All query heads of
// the kv head's group and all rows of the tile share each K/V block while it is in L1.
struct WorkItem {
  int32_t seq;
  int32_t kv_head0, kv_head1;  // kv heads [kv_head0, kv_head1)
  int32_t row0, row1;          // new rows [row0, row1) of the sequence
};

bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// GCC 12 reports the deliberately undefined vectors inside its own AVX-512 intrinsics
// (_mm512_undefined_ps, used by set1/reduce) as "used uninitialized" once they are inlined into
// a target("avx512f") function; the warning is about the header, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// One query against one K/V block of 16 slots (K transposed [d][16], V [16][d]), updating the
// online softmax state (m, l) and the accumulator acc[d]: all 16 scores in one register, four
// independent FMA chains for q.k (latency, not throughput, bounds a single chain), the V rows
// accumulated into head_dim/16 registers.
__attribute__((target("avx512f"))) void Block16(const float* qh, float scale, const float* kt,
                                                const float* vb, int32_t d, int32_t n_valid,
                                                float* m, float* l, float* acc) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int32_t t = 0; t < d; t += 4) {
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(qh[t]), _mm512_loadu_ps(kt + t * 16), a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(qh[t + 1]), _mm512_loadu_ps(kt + (t + 1) * 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(qh[t + 2]), _mm512_loadu_ps(kt + (t + 2) * 16), a2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(qh[t + 3]), _mm512_loadu_ps(kt + (t + 3) * 16), a3);
  }
  const __mmask16 valid = static_cast<__mmask16>((1u << n_valid) - 1u);
  __m512 sc = _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                            _mm512_set1_ps(scale));
  sc = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), sc);
  const float mb = std::max(*m, _mm512_reduce_max_ps(sc));
  const __m512 p = _mm512_maskz_mov_ps(valid, FastExp16(_mm512_sub_ps(sc, _mm512_set1_ps(mb))));
  const float alpha = FastExp(*m - mb);
  *l = *l * alpha + _mm512_reduce_add_ps(p);
  *m = mb;
  alignas(64) float pj[16];
  _mm512_store_ps(pj, p);
  const __m512 al = _mm512_set1_ps(alpha);
  if (d == 64) {
    __m512 o0 = _mm512_mul_ps(_mm512_loadu_ps(acc), al);
    __m512 o1 = _mm512_mul_ps(_mm512_loadu_ps(acc + 16), al);
    __m512 o2 = _mm512_mul_ps(_mm512_loadu_ps(acc + 32), al);
    __m512 o3 = _mm512_mul_ps(_mm512_loadu_ps(acc + 48), al);
    for (int32_t j = 0; j < n_valid; ++j) {
      const __m512 pv = _mm512_set1_ps(pj[j]);
      const float* v = vb + j * 64;
      o0 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v), o0);
      o1 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + 16), o1);
      o2 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + 32), o2);
      o3 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + 48), o3);
    }
    _mm512_storeu_ps(acc, o0);
    _mm512_storeu_ps(acc + 16, o1);
    _mm512_storeu_ps(acc + 32, o2);
    _mm512_storeu_ps(acc + 48, o3);
  } else {
    for (int32_t t = 0; t < d; t += 16) {
      __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc + t), al);
      for (int32_t j = 0; j < n_valid; ++j)
        o = _mm512_fmadd_ps(_mm512_set1_ps(pj[j]), _mm512_loadu_ps(vb + j * d + t), o);
      _mm512_storeu_ps(acc + t, o);
    }
  }
}

#pragma GCC diagnostic pop

}  // namespace

void PagedAttention(const float* q, int64_t q_stride, const PagedKvLayout& kv,
                    const AttentionSeq* seqs, int32_t n_seqs, int32_t n_heads, float scale,
                    float* out, int64_t out_stride) {
  const int32_t group = n_heads / kv.n_kv_heads;
  const int32_t d = kv.head_dim;
  const int32_t bs = kv.block_size;
  const int32_t tile_rows = std::max(1, 32 / group);
  const bool wide = bs == 16 && d % 16 == 0 && HasAvx512();

  std::vector<WorkItem> work;
  // Few tiles (decode): an item takes a run of adjacent kv heads, whose K (and V) lie next to each
  // other in every block, so each thread streams long contiguous ranges instead of 4 KiB pieces;
  // about two items per thread keep the threads balanced. Many tiles (prefill): one head each.
  int64_t n_tiles = 0;
  for (int32_t s = 0; s < n_seqs; ++s) n_tiles += (seqs[s].n_new + tile_rows - 1) / tile_rows;
  const int64_t per_thread = 2 * static_cast<int64_t>(std::max(1, omp_get_max_threads()));
  const int32_t heads_per_item = static_cast<int32_t>(
      std::clamp<int64_t>(n_tiles * kv.n_kv_heads / per_thread, 1, kv.n_kv_heads));
  for (int32_t s = 0; s < n_seqs; ++s)
    for (int32_t r0 = 0; r0 < seqs[s].n_new; r0 += tile_rows)
      for (int32_t g = 0; g < kv.n_kv_heads; g += heads_per_item)
        work.push_back({s, g, std::min(kv.n_kv_heads, g + heads_per_item), r0,
                        std::min(seqs[s].n_new, r0 + tile_rows)});
  const int64_t n_work = static_cast<int64_t>(work.size());

#pragma omp parallel if (n_work > 1)
  {
    const int32_t max_q = tile_rows * group * heads_per_item;
    // Per-thread scratch kept across calls (OpenMP's threads persist): no allocation per layer.
    thread_local std::vector<float> m, l, acc, sc;
    if (m.size() < static_cast<size_t>(max_q)) {
      m.resize(max_q);
      l.resize(max_q);
    }
    if (acc.size() < static_cast<size_t>(max_q) * d) acc.resize(static_cast<size_t>(max_q) * d);
    if (sc.size() < static_cast<size_t>(bs)) sc.resize(bs);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = n_work - 1; w >= 0; --w) {  // longest (latest rows) first
      const WorkItem& it = work[w];
      const AttentionSeq& seq = seqs[it.seq];
      const int32_t nq1 = (it.row1 - it.row0) * group;  // queries per kv head
      const int32_t nq = nq1 * (it.kv_head1 - it.kv_head0);
      std::fill(m.begin(), m.begin() + nq, -INFINITY);
      std::fill(l.begin(), l.begin() + nq, 0.f);
      std::fill(acc.begin(), acc.begin() + static_cast<int64_t>(nq) * d, 0.f);
      const int32_t last_pos = seq.n_past + it.row1 - 1;
      for (int32_t b = 0; b * bs <= last_pos; ++b) {
        const int32_t block = seq.block_table[b];
        for (int32_t g = it.kv_head0; g < it.kv_head1; ++g) {
          const float* kt = kv.KT(block, g);
          const float* vb = kv.V(block, g, 0);
          for (int32_t qi1 = 0; qi1 < nq1; ++qi1) {
            const int32_t qi = (g - it.kv_head0) * nq1 + qi1;
            const int32_t row = it.row0 + qi1 / group;
            const int32_t h = g * group + qi1 % group;
            const int32_t pos = seq.n_past + row;
            const int32_t n_valid = std::min(bs, pos - b * bs + 1);
            if (n_valid <= 0) continue;
            const float* qh = q + (seq.row_begin + row) * q_stride + static_cast<int64_t>(h) * d;
            if (wide) {
              Block16(qh, scale, kt, vb, d, n_valid, &m[qi], &l[qi],
                      acc.data() + static_cast<int64_t>(qi) * d);
              continue;
            }
            // Scores of this block's slots, as vectors over slots.
            float* s = sc.data();
            if (bs == 16) {
              __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
              for (int32_t t = 0; t < d; ++t) {
                const __m256 qt = _mm256_set1_ps(qh[t] * scale);
                s0 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(kt + t * 16), s0);
                s1 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(kt + t * 16 + 8), s1);
              }
              _mm256_storeu_ps(s, s0);
              _mm256_storeu_ps(s + 8, s1);
            } else {
              std::fill(s, s + bs, 0.f);
              for (int32_t t = 0; t < d; ++t) {
                const float qt = qh[t] * scale;
                const float* kr = kt + static_cast<int64_t>(t) * bs;
#pragma omp simd
                for (int32_t j = 0; j < bs; ++j) s[j] += qt * kr[j];
              }
            }
            float mb = m[qi];
            for (int32_t j = 0; j < n_valid; ++j) mb = std::max(mb, s[j]);
            // Online softmax: rescale what was accumulated to the new running max.
            const float alpha = FastExp(m[qi] - mb);
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int32_t j = 0; j < n_valid; ++j) {
              s[j] = FastExp(s[j] - mb);
              sum += s[j];
            }
            l[qi] = l[qi] * alpha + sum;
            m[qi] = mb;
            float* a = acc.data() + static_cast<int64_t>(qi) * d;
            if (d % 8 == 0) {
              // acc = acc * alpha + sum_j p_j v_j, eight lanes of head_dim at a time in a register.
              const __m256 al = _mm256_set1_ps(alpha);
              for (int32_t t = 0; t < d; t += 8) {
                __m256 x = _mm256_mul_ps(_mm256_loadu_ps(a + t), al);
                for (int32_t j = 0; j < n_valid; ++j)
                  x = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), _mm256_loadu_ps(vb + j * d + t), x);
                _mm256_storeu_ps(a + t, x);
              }
            } else {
#pragma omp simd
              for (int32_t t = 0; t < d; ++t) a[t] *= alpha;
              for (int32_t j = 0; j < n_valid; ++j) {
                const float p = s[j];
                const float* v = vb + static_cast<int64_t>(j) * d;
#pragma omp simd
                for (int32_t t = 0; t < d; ++t) a[t] += p * v[t];
              }
            }
          }
        }
      }
      for (int32_t qi = 0; qi < nq; ++qi) {
        const int32_t g = it.kv_head0 + qi / nq1;
        const int32_t row = it.row0 + (qi % nq1) / group;
        const int32_t h = g * group + (qi % nq1) % group;
        float* o = out + (seq.row_begin + row) * out_stride + static_cast<int64_t>(h) * d;
        const float* a = acc.data() + static_cast<int64_t>(qi) * d;
        const float inv = 1.f / l[qi];
        for (int32_t t = 0; t < d; ++t) o[t] = a[t] * inv;
      }
    }
  }
}

}  // namespace duet::kernels
