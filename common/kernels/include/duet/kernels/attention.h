// Causal attention over a paged K/V cache, for prefill (many new rows per sequence) and
// decode (one new row per sequence) alike: each new row attends to every cached position up to
// and including its own. K/V of the new rows must already be written into the cache.
#pragma once

#include <cstddef>
#include <cstdint>

namespace duet::kernels {

// The element type of the K/V cache: f32 (exact; the f32 precision mode) or IEEE half (half the
// memory and half the bytes attention reads per step; the bf16 precision mode, as llama.cpp's
// default f16 cache: 11 significant bits to bf16's 8, so less error than a bf16 cache; values
// beyond +-65504 saturate), or int8 with one f32 scale per (position, kv head) for K and for V
// (a quarter of f32's memory; as the wire's int8: scale = max|x| / 127, values rounded to
// nearest even). Attention computes in f32 in every case.
enum class KvDtype { kF32, kF16, kI8 };

inline size_t KvDtypeSize(KvDtype t) { return t == KvDtype::kF32 ? 4 : t == KvDtype::kF16 ? 2 : 1; }

// Elements of `t` that one layer of one block takes: K and V, and for int8 the K and V scales
// after them (n_kv_heads x block_size f32 each, counted in int8 elements, i.e. bytes).
inline int64_t KvScaleBytes(int32_t n_kv_heads, int32_t block_size) {  // int8: K and V scales
  return 2 * int64_t{n_kv_heads} * block_size * static_cast<int64_t>(sizeof(float));
}
inline int64_t KvLayerBlockElements(KvDtype t, int32_t n_kv_heads, int32_t block_size,
                                    int32_t head_dim) {
  const int64_t kv = 2 * int64_t{n_kv_heads} * block_size * head_dim;
  return t == KvDtype::kI8 ? kv + KvScaleBytes(n_kv_heads, block_size) : kv;
}

// Where one layer's K and V live in a block pool: layer_offset + block * block_stride holds the
// block's K then V for this layer, K as [n_kv_heads][head_dim][block_size] (transposed within the
// block, so attention computes a block's scores as vectors over its slots) and V as
// [n_kv_heads][block_size][head_dim]. Offsets and strides count elements of `dtype`. An int8
// cache keeps after V the K scales, then the V scales, each f32 [n_kv_heads][block_size].
struct PagedKvLayout {
  void* base = nullptr;  // block 0
  KvDtype dtype = KvDtype::kF32;
  int64_t block_stride = 0;  // elements from one block's K/V of this layer to the next's
  int64_t layer_offset = 0;  // elements from a block's start to this layer's K
  int32_t block_size = 0;    // tokens per block
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;

  int64_t head_stride() const { return static_cast<int64_t>(block_size) * head_dim; }
  int64_t v_offset() const { return head_stride() * n_kv_heads; }
  // Element offset of K of one kv head in physical block `block`: [head_dim][block_size].
  int64_t k_offset(int32_t block, int32_t kv_head) const {
    return block * block_stride + layer_offset + kv_head * head_stride();
  }
  // Element offset of V of (kv head, slot within block): head_dim contiguous elements.
  int64_t v_offset(int32_t block, int32_t kv_head, int32_t slot) const {
    return k_offset(block, kv_head) + v_offset() + static_cast<int64_t>(slot) * head_dim;
  }
  int64_t scale_offset() const { return 2 * v_offset(); }
  // int8 only: bytes of one layer's K and V scales in a block (after its V).
  int64_t scale_bytes() const { return KvScaleBytes(n_kv_heads, block_size); }
  // int8 only: the block_size scales of one kv head's K (or V) in a block, one per slot.
  float* KScales(int32_t block, int32_t kv_head) const {
    return reinterpret_cast<float*>(static_cast<int8_t*>(base) + k_offset(block, 0) +
                                    scale_offset()) +
           static_cast<int64_t>(kv_head) * block_size;
  }
  float* VScales(int32_t block, int32_t kv_head) const {
    return KScales(block, kv_head) + static_cast<int64_t>(n_kv_heads) * block_size;
  }
  // Typed views; T must match dtype (float for kF32, uint16_t half bits for kF16, int8_t for
  // kI8).
  template <typename T>
  T* KT(int32_t block, int32_t kv_head) const {
    return static_cast<T*>(base) + k_offset(block, kv_head);
  }
  template <typename T>
  T* V(int32_t block, int32_t kv_head, int32_t slot) const {
    return static_cast<T*>(base) + v_offset(block, kv_head, slot);
  }
  // f32 views (dtype kF32 only).
  float* KT(int32_t block, int32_t kv_head) const { return KT<float>(block, kv_head); }
  float* V(int32_t block, int32_t kv_head, int32_t slot) const {
    return V<float>(block, kv_head, slot);
  }
  // Writes / reads one position's K or V vector (head_dim floats) in any dtype; an f16 cache
  // rounds to nearest even (saturating) on the way in, an int8 cache quantizes the vector with
  // its own scale.
  void StoreK(int32_t block, int32_t kv_head, int32_t slot, const float* k) const;
  void LoadK(int32_t block, int32_t kv_head, int32_t slot, float* k) const;
  void StoreV(int32_t block, int32_t kv_head, int32_t slot, const float* v) const;
  // StoreK of rows x[0, m) (f32, head_dim each, x_stride floats apart; 0: head_dim) into slots
  // [slot, slot + m) of one block (slot + m <= block_size): the same bytes, faster for an int8
  // cache, whose transposed K takes one byte per K line from each row (the K/V codec and
  // prefill's K/V writes fill blocks with it).
  void StoreKRows(int32_t block, int32_t kv_head, int32_t slot, int32_t m, const float* x,
                  int64_t x_stride = 0) const;
  // LoadK of slots [slot, slot + m) of one block into rows x[0, m): the same values.
  void LoadKRows(int32_t block, int32_t kv_head, int32_t slot, int32_t m, float* x) const;
  void LoadV(int32_t block, int32_t kv_head, int32_t slot, float* v) const;
  // Asks the cache for the lines that StoreK and StoreV of (block, slot) will write, every kv
  // head's: a slot's K is one element of every K row, so a decode step's new row touches all
  // head_dim / (64 / element size) lines of each head's K in its block, cold since the last step.
  void PrefetchSlot(int32_t block, int32_t slot) const;
};

// The int8 cache's quantizer (what StoreK / StoreV use): q[i * stride] for i < n, returns the
// scale max|x| / 127 (0 for all zeros; non-finite when x holds inf or NaN, whose q are 0).
float QuantizeKvI8(const float* x, int32_t n, int64_t stride, int8_t* q);

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
