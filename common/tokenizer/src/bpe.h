// The BPE model: vocabulary, merge ranks, and word -> ids with a per-word cache (private).
#ifndef DUET_TOKENIZER_SRC_BPE_H_
#define DUET_TOKENIZER_SRC_BPE_H_

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace duet::tokenizer::internal {

struct BpeOptions {
  std::optional<std::string> unk_token;
  bool fuse_unk = false;
  bool byte_fallback = false;  // characters not in the vocabulary become <0xNN> tokens
  bool ignore_merges = false;  // a word found whole in the vocabulary is one token
  std::string end_of_word_suffix;
};

class BpeModel {
 public:
  // `vocab`: token -> id; `merges`: pairs in rank order (rank = index). Merge parts and their
  // concatenation must be in the vocabulary: INVALID_ARGUMENT naming the first merge that is not.
  absl::Status Init(absl::flat_hash_map<std::string, int32_t> vocab,
                    const std::vector<std::pair<std::string, std::string>>& merges,
                    BpeOptions options);

  // Appends the ids of one pre-tokenized word. Thread-safe.
  void EncodeWord(std::string_view word, std::vector<int32_t>& out) const;

  const absl::flat_hash_map<std::string, int32_t>& vocab() const { return vocab_; }
  std::optional<int32_t> unk_id() const { return unk_id_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  void Bpe(std::string_view word, std::vector<int32_t>& out) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  absl::flat_hash_map<uint64_t, Merge> merges_;  // (left id, right id) -> rank and merged id
  BpeOptions options_;
  std::optional<int32_t> unk_id_;
  std::array<int32_t, 256> byte_ids_{};  // id of "<0xNN>", or -1

  // Cache of Bpe() results for short words; cleared when full.
  static constexpr size_t kCacheCapacity = 1 << 16;
  static constexpr size_t kMaxCachedWordBytes = 256;
  mutable absl::Mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_ ABSL_GUARDED_BY(cache_mu_);
};

}  // namespace duet::tokenizer::internal

#endif  // DUET_TOKENIZER_SRC_BPE_H_
