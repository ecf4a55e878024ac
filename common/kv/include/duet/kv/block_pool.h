// The K/V cache: a pool of fixed-size blocks, and per-sequence leases on them (block tables).
//
// A block holds block_size tokens of K and V for every layer (see kernels::PagedKvLayout).
// BlockPool owns the memory, the free list and reference counts, and knows nothing of requests
// or scheduling. A SequenceKv is one sequence's lease: it frees its blocks when destroyed.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "duet/kernels/attention.h"
#include "duet/tensor/buffer.h"

namespace duet::kv {

struct KvShape {
  int32_t n_layers = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 16;  // tokens per block
  // Element type of the cache: f32, f16 (half the memory) or int8 with per-position scales.
  kernels::KvDtype dtype = kernels::KvDtype::kF32;

  // Elements of `dtype` per block, every layer (int8: including the scales; see PagedKvLayout).
  int64_t elements_per_block() const {
    return static_cast<int64_t>(n_layers) *
           kernels::KvLayerBlockElements(dtype, n_kv_heads, block_size, head_dim);
  }
  int64_t bytes_per_block() const {
    return elements_per_block() * static_cast<int64_t>(kernels::KvDtypeSize(dtype));
  }
  int64_t bytes_per_token() const { return bytes_per_block() / block_size; }
};

// Thread-safe.
class BlockPool {
 public:
  // INVALID_ARGUMENT for a non-positive dimension or block count.
  static absl::StatusOr<std::unique_ptr<BlockPool>> Create(const KvShape& shape, int32_t n_blocks);

  // Takes n blocks (ref count 1 each). All or nothing: RESOURCE_EXHAUSTED, naming n and the
  // free count, when fewer than n are free; then nothing changes.
  absl::StatusOr<std::vector<int32_t>> Allocate(int32_t n);
  // Drops one reference from each block; a block with no references returns to the free list.
  void Free(std::span<const int32_t> blocks);
  // Adds a reference (for sharing a block between sequences).
  void Ref(int32_t block);

  int32_t n_blocks() const { return n_blocks_; }
  int32_t n_free() const;
  const KvShape& shape() const { return shape_; }
  // Where layer `layer` lives in every block. The memory is layer-major ([layer][block][K, V]),
  // so one layer of consecutive blocks is contiguous.
  kernels::PagedKvLayout Layout(int32_t layer) const;

 private:
  BlockPool(const KvShape& shape, int32_t n_blocks);

  const KvShape shape_;
  const int32_t n_blocks_;
  Buffer memory_;  // n_blocks * bytes_per_block
  mutable absl::Mutex mu_;
  std::vector<int32_t> free_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t> refs_ ABSL_GUARDED_BY(mu_);
};

// One sequence's K/V: its block table and how many positions hold K/V. Move-only; frees its
// blocks on destruction or Release(). Not thread-safe (one owner at a time).
class SequenceKv {
 public:
  explicit SequenceKv(BlockPool* pool) : pool_(pool) {}
  ~SequenceKv() { Release(); }
  SequenceKv(SequenceKv&& other) noexcept;
  SequenceKv& operator=(SequenceKv&& other) noexcept;
  SequenceKv(const SequenceKv&) = delete;
  SequenceKv& operator=(const SequenceKv&) = delete;

  // Makes room for n_tokens positions in total. All or nothing: RESOURCE_EXHAUSTED (and no
  // change) when the pool lacks blocks.
  absl::Status Reserve(int32_t n_tokens);
  // Shares src's first n_tokens positions (whole blocks: n_tokens must be a multiple of the block
  // size and <= src.n_tokens()) by reference, as a prefix cache does. This lease must be empty.
  // INVALID_ARGUMENT otherwise. New positions go to new blocks, so the shared ones are never
  // written through this lease.
  absl::Status ShareFrom(const SequenceKv& src, int32_t n_tokens);
  // Returns every block to the pool; n_tokens becomes 0.
  void Release();
  // Returns blocks past those holding n_tokens() positions to the pool.
  void ShrinkToFit();
  // Forgets positions >= n (keeps the blocks).
  void Truncate(int32_t n);

  const std::vector<int32_t>& blocks() const { return blocks_; }
  int32_t capacity() const;
  // Positions whose K/V are written. The model advances it after a forward pass.
  int32_t n_tokens() const { return n_tokens_; }
  void set_n_tokens(int32_t n) { n_tokens_ = n; }
  BlockPool* pool() const { return pool_; }

 private:
  BlockPool* pool_;
  std::vector<int32_t> blocks_;
  int32_t n_tokens_ = 0;
};

}  // namespace duet::kv
