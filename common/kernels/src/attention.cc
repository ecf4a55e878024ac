#include "duet/kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "fast_math.h"

namespace duet::kernels {

void PagedAttention(const float* q, int64_t q_stride, const PagedKvLayout& kv,
                    const AttentionSeq* seqs, int32_t n_seqs, int32_t n_heads, float scale,
                    float* out, int64_t out_stride) {
  // Flatten (sequence, new row) so the parallel loop balances across rows of all sequences.
  std::vector<std::pair<int32_t, int32_t>> rows;  // (seq, i)
  for (int32_t s = 0; s < n_seqs; ++s)
    for (int32_t i = 0; i < seqs[s].n_new; ++i) rows.emplace_back(s, i);
  const int64_t n_items = static_cast<int64_t>(rows.size()) * n_heads;
  const int32_t group = n_heads / kv.n_kv_heads;
  const int32_t d = kv.head_dim;
  const int32_t bs = kv.block_size;

#pragma omp parallel
  {
    std::vector<float> scores;
    std::vector<float> acc(d);
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < n_items; ++item) {
      const auto [s, i] = rows[item / n_heads];
      const int32_t h = static_cast<int32_t>(item % n_heads);
      const AttentionSeq& seq = seqs[s];
      const int64_t row = seq.row_begin + i;
      const int32_t n_ctx = seq.n_past + i + 1;  // causal: positions 0..own
      const int32_t kvh = h / group;
      const float* qh = q + row * q_stride + static_cast<int64_t>(h) * d;
      scores.resize(n_ctx);
      // scores = q · k_j * scale
      float mx = -INFINITY;
      for (int32_t j = 0; j < n_ctx; ++j) {
        const float* k = kv.K(seq.block_table[j / bs], kvh, j % bs);
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int32_t t = 0; t < d; ++t) dot += qh[t] * k[t];
        dot *= scale;
        scores[j] = dot;
        mx = std::max(mx, dot);
      }
      float sum = 0.f;
      float* sc = scores.data();
#pragma omp simd reduction(+ : sum)
      for (int32_t j = 0; j < n_ctx; ++j) {
        sc[j] = FastExp(sc[j] - mx);
        sum += sc[j];
      }
      // out = sum_j p_j v_j
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int32_t j = 0; j < n_ctx; ++j) {
        const float* v = kv.V(seq.block_table[j / bs], kvh, j % bs);
        const float p = scores[j];
        for (int32_t t = 0; t < d; ++t) acc[t] += p * v[t];
      }
      float* o = out + row * out_stride + static_cast<int64_t>(h) * d;
      const float inv = 1.f / sum;
      for (int32_t t = 0; t < d; ++t) o[t] = acc[t] * inv;
    }
  }
}

}  // namespace duet::kernels
