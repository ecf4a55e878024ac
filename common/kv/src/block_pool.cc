#include "duet/kv/block_pool.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace duet::kv {

absl::StatusOr<std::unique_ptr<BlockPool>> BlockPool::Create(const KvShape& shape,
                                                             int32_t n_blocks) {
  if (shape.n_layers <= 0 || shape.n_kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.block_size <= 0 || n_blocks <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("K/V pool: every dimension must be positive (n_layers=", shape.n_layers,
                     " n_kv_heads=", shape.n_kv_heads, " head_dim=", shape.head_dim,
                     " block_size=", shape.block_size, " n_blocks=", n_blocks, ")"));
  }
  return std::unique_ptr<BlockPool>(new BlockPool(shape, n_blocks));
}

BlockPool::BlockPool(const KvShape& shape, int32_t n_blocks)
    : shape_(shape),
      n_blocks_(n_blocks),
      memory_(static_cast<size_t>(n_blocks) * shape.bytes_per_block()) {
  free_.reserve(n_blocks);
  // The free list is a stack (its end is handed out first), lowest ids on top.
  for (int32_t b = n_blocks - 1; b >= 0; --b) free_.push_back(b);
  refs_.assign(n_blocks, 0);
}

absl::StatusOr<std::vector<int32_t>> BlockPool::Allocate(int32_t n) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("cannot allocate ", n, " blocks"));
  absl::MutexLock lock(&mu_);
  if (static_cast<size_t>(n) > free_.size()) {
    return absl::ResourceExhaustedError(absl::StrCat("K/V cache full: need ", n,
                                                     " blocks, ", free_.size(), " free of ",
                                                     n_blocks_));
  }
  // Rising ids within one allocation: attention reads a sequence's blocks in order, and blocks
  // at rising addresses keep the hardware prefetchers streaming from one block into the next.
  std::vector<int32_t> out(free_.rbegin(), free_.rbegin() + n);
  free_.resize(free_.size() - n);
  for (int32_t b : out) refs_[b] = 1;
  return out;
}

void BlockPool::Free(std::span<const int32_t> blocks) {
  absl::MutexLock lock(&mu_);
  // Pushed last block first, so that the next allocation takes them back in rising order.
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    const int32_t b = *it;
    if (b < 0 || b >= n_blocks_ || refs_[b] == 0) continue;  // defensive: double free ignored
    if (--refs_[b] == 0) free_.push_back(b);
  }
}

void BlockPool::Ref(int32_t block) {
  absl::MutexLock lock(&mu_);
  if (block >= 0 && block < n_blocks_ && refs_[block] > 0) ++refs_[block];
}

int32_t BlockPool::n_free() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int32_t>(free_.size());
}

kernels::PagedKvLayout BlockPool::Layout(int32_t layer) const {
  kernels::PagedKvLayout l;
  l.base = const_cast<void*>(static_cast<const void*>(memory_.data()));
  l.dtype = shape_.dtype;
  // Layer-major: all blocks of layer 0, then of layer 1, ... A sequence's blocks (handed out in
  // order) are then one contiguous run per layer, which attention streams layer by layer.
  l.block_stride = shape_.elements_per_block() / shape_.n_layers;
  l.layer_offset = static_cast<int64_t>(layer) * n_blocks_ * l.block_stride;
  l.block_size = shape_.block_size;
  l.n_kv_heads = shape_.n_kv_heads;
  l.head_dim = shape_.head_dim;
  return l;
}

SequenceKv::SequenceKv(SequenceKv&& other) noexcept
    : pool_(other.pool_),
      blocks_(std::move(other.blocks_)),
      n_tokens_(std::exchange(other.n_tokens_, 0)) {
  other.blocks_.clear();
}

SequenceKv& SequenceKv::operator=(SequenceKv&& other) noexcept {
  if (this != &other) {
    Release();
    pool_ = other.pool_;
    blocks_ = std::move(other.blocks_);
    other.blocks_.clear();
    n_tokens_ = std::exchange(other.n_tokens_, 0);
  }
  return *this;
}

int32_t SequenceKv::capacity() const {
  return static_cast<int32_t>(blocks_.size()) * pool_->shape().block_size;
}

absl::Status SequenceKv::Reserve(int32_t n_tokens) {
  const int32_t bs = pool_->shape().block_size;
  const int32_t need = (n_tokens + bs - 1) / bs - static_cast<int32_t>(blocks_.size());
  if (need <= 0) return absl::OkStatus();
  auto got = pool_->Allocate(need);
  if (!got.ok()) return got.status();
  blocks_.insert(blocks_.end(), got->begin(), got->end());
  return absl::OkStatus();
}

absl::Status SequenceKv::ShareFrom(const SequenceKv& src, int32_t n_tokens) {
  const int32_t bs = pool_->shape().block_size;
  if (!blocks_.empty() || src.pool_ != pool_ || n_tokens < 0 || n_tokens % bs != 0 ||
      n_tokens > src.n_tokens_) {
    return absl::InvalidArgumentError(absl::StrCat("cannot share ", n_tokens, " of ",
                                                   src.n_tokens_, " tokens (block size ", bs,
                                                   ") into a lease of ", blocks_.size(), " blocks"));
  }
  for (int32_t i = 0; i < n_tokens / bs; ++i) {
    pool_->Ref(src.blocks_[i]);
    blocks_.push_back(src.blocks_[i]);
  }
  n_tokens_ = n_tokens;
  return absl::OkStatus();
}

void SequenceKv::Release() {
  if (!blocks_.empty()) pool_->Free(blocks_);
  blocks_.clear();
  n_tokens_ = 0;
}

void SequenceKv::ShrinkToFit() {
  const int32_t bs = pool_->shape().block_size;
  const size_t keep = static_cast<size_t>((n_tokens_ + bs - 1) / bs);
  if (keep >= blocks_.size()) return;
  pool_->Free(std::span<const int32_t>(blocks_).subspan(keep));
  blocks_.resize(keep);
}

void SequenceKv::Truncate(int32_t n) {
  if (n < n_tokens_) n_tokens_ = n < 0 ? 0 : n;
}

}  // namespace duet::kv
