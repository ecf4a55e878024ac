// Causal attention over a paged K/V cache, for prefill (many new rows per sequence) and
// decode (one new row per sequence) alike: each new row attends to every cached position up to
// and including its own. K/V of the new rows must already be written into the cache.
#pragma once

#include <cstdint>

namespace duet::kernels {

// Where one layer's K and V live in a block pool. A block holds, for every layer, K then V:
// K as [n_kv_heads][head_dim][block_size] (transposed within the block, so attention computes a
// block's scores as vectors over its slots) and V as [n_kv_heads][block_size][head_dim]; f32.
struct PagedKvLayout {
  float* base = nullptr;         // block 0
  int64_t block_stride = 0;      // floats per block (all layers)
  int64_t layer_offset = 0;      // floats from a block's start to this layer's K
  int32_t block_size = 0;        // tokens per block
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;

  int64_t head_stride() const { return static_cast<int64_t>(block_size) * head_dim; }
  int64_t v_offset() const { return head_stride() * n_kv_heads; }
  // K of one kv head in physical block `block`: [head_dim][block_size].
  float* KT(int32_t block, int32_t kv_head) const {
    return base + block * block_stride + layer_offset + kv_head * head_stride();
  }
  // V of (kv head, slot within block): head_dim contiguous floats.
  float* V(int32_t block, int32_t kv_head, int32_t slot) const {
    return KT(block, kv_head) + v_offset() + static_cast<int64_t>(slot) * head_dim;
  }
  // Writes / reads one position's K vector (head_dim floats).
  void StoreK(int32_t block, int32_t kv_head, int32_t slot, const float* k) const {
    float* kt = KT(block, kv_head) + slot;
    for (int32_t t = 0; t < head_dim; ++t) kt[static_cast<int64_t>(t) * block_size] = k[t];
  }
  void LoadK(int32_t block, int32_t kv_head, int32_t slot, float* k) const {
    const float* kt = KT(block, kv_head) + slot;
    for (int32_t t = 0; t < head_dim; ++t) k[t] = kt[static_cast<int64_t>(t) * block_size];
  }
};

// One sequence's share of a batch.
struct AttentionSeq {
  const int32_t* block_table = nullptr;  // physical block of each logical block
  int32_t n_past = 0;                    // position of the sequence's first new row
  int32_t n_new = 0;                     // new rows (1 when decoding)
  int64_t row_begin = 0;                 // index of its first row in q / out
};

// q: [rows, n_heads*head_dim] (row stride q_stride floats); out: [rows, n_heads*head_dim]
// (row stride out_stride). Query head h reads K/V head h / (n_heads / n_kv_heads).
void PagedAttention(const float* q, int64_t q_stride, const PagedKvLayout& kv,
                    const AttentionSeq* seqs, int32_t n_seqs, int32_t n_heads, float scale,
                    float* out, int64_t out_stride);

}  // namespace duet::kernels
