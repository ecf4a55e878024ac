#include "duet/kernels/attention.h"

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
  int32_t kv_head;
  int32_t row0, row1;  // new rows [row0, row1) of the sequence
};

}  // namespace

void PagedAttention(const float* q, int64_t q_stride, const PagedKvLayout& kv,
                    const AttentionSeq* seqs, int32_t n_seqs, int32_t n_heads, float scale,
                    float* out, int64_t out_stride) {
  const int32_t group = n_heads / kv.n_kv_heads;
  const int32_t d = kv.head_dim;
  const int32_t bs = kv.block_size;
  const int32_t tile_rows = std::max(1, 32 / group);

  std::vector<WorkItem> work;
  for (int32_t s = 0; s < n_seqs; ++s)
    for (int32_t r0 = 0; r0 < seqs[s].n_new; r0 += tile_rows)
      for (int32_t g = 0; g < kv.n_kv_heads; ++g)
        work.push_back({s, g, r0, std::min(seqs[s].n_new, r0 + tile_rows)});
  const int64_t n_work = static_cast<int64_t>(work.size());

#pragma omp parallel if (n_work > 1)
  {
    const int32_t max_q = tile_rows * group;
    std::vector<float> m(max_q), l(max_q), acc(static_cast<size_t>(max_q) * d), sc(bs);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = n_work - 1; w >= 0; --w) {  // longest (latest rows) first
      const WorkItem& it = work[w];
      const AttentionSeq& seq = seqs[it.seq];
      const int32_t nq = (it.row1 - it.row0) * group;
      std::fill(m.begin(), m.begin() + nq, -INFINITY);
      std::fill(l.begin(), l.begin() + nq, 0.f);
      std::fill(acc.begin(), acc.begin() + static_cast<int64_t>(nq) * d, 0.f);
      const int32_t last_pos = seq.n_past + it.row1 - 1;
      for (int32_t b = 0; b * bs <= last_pos; ++b) {
        const int32_t block = seq.block_table[b];
        const float* kt = kv.KT(block, it.kv_head);
        const float* vb = kv.V(block, it.kv_head, 0);
        for (int32_t qi = 0; qi < nq; ++qi) {
          const int32_t row = it.row0 + qi / group;
          const int32_t h = it.kv_head * group + qi % group;
          const int32_t pos = seq.n_past + row;
          const int32_t n_valid = std::min(bs, pos - b * bs + 1);
          if (n_valid <= 0) continue;
          const float* qh = q + (seq.row_begin + row) * q_stride + static_cast<int64_t>(h) * d;
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
      for (int32_t qi = 0; qi < nq; ++qi) {
        const int32_t row = it.row0 + qi / group;
        const int32_t h = it.kv_head * group + qi % group;
        float* o = out + (seq.row_begin + row) * out_stride + static_cast<int64_t>(h) * d;
        const float* a = acc.data() + static_cast<int64_t>(qi) * d;
        const float inv = 1.f / l[qi];
        for (int32_t t = 0; t < d; ++t) o[t] = a[t] * inv;
      }
    }
  }
}

}  // namespace duet::kernels
