#include "bpe.h"

#include <cstdio>
#include <queue>

#include "str_util.h"
#include "unicode.h"

namespace duet::tokenizer::internal {

absl::Status BpeModel::Init(absl::flat_hash_map<std::string, int32_t> vocab,
                            const std::vector<std::pair<std::string, std::string>>& merges,
                            BpeOptions options) {
  vocab_ = std::move(vocab);
  options_ = std::move(options);
  merges_.reserve(merges.size());
  std::string merged;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [left, right] = merges[rank];
    merged.assign(left).append(right);
    const auto l = vocab_.find(left);
    const auto r = vocab_.find(right);
    const auto m = vocab_.find(merged);
    if (l == vocab_.end() || r == vocab_.end() || m == vocab_.end()) {
      return absl::InvalidArgumentError(Cat("merge #", rank, " '", left, " ", right,
                                            "' uses a token that is not in the vocabulary"));
    }
    // A repeated pair keeps its first (best) rank.
    merges_.try_emplace(PairKey(l->second, r->second),
                        Merge{static_cast<int32_t>(rank), m->second});
  }
  unk_id_.reset();
  if (options_.unk_token.has_value()) {
    const auto it = vocab_.find(*options_.unk_token);
    if (it == vocab_.end()) {
      return absl::InvalidArgumentError(
          Cat("unk_token '", *options_.unk_token, "' is not in the vocabulary"));
    }
    unk_id_ = it->second;
  }
  byte_ids_.fill(-1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    const auto it = vocab_.find(name);
    if (it != vocab_.end()) byte_ids_[b] = it->second;
  }
  return absl::OkStatus();
}

void BpeModel::EncodeWord(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (options_.ignore_merges && options_.end_of_word_suffix.empty()) {
    const auto it = vocab_.find(AsAbsl(word));
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (word.size() > kMaxCachedWordBytes) {
    Bpe(word, out);
    return;
  }
  {
    absl::ReaderMutexLock lock(&cache_mu_);
    const auto it = cache_.find(AsAbsl(word));
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  Bpe(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  absl::MutexLock lock(&cache_mu_);
  if (cache_.size() >= kCacheCapacity) cache_.clear();
  cache_.try_emplace(std::string(word), std::move(ids));
}

void BpeModel::Bpe(std::string_view word, std::vector<int32_t>& out) const {
  // 1. One symbol per character (or per byte, with byte fallback), as a doubly linked list.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto push_symbol = [&](int32_t id) {
    const auto n = static_cast<int32_t>(symbols.size());
    if (n > 0) symbols.back().next = n;
    symbols.push_back(Symbol{id, n - 1, -1});
  };
  bool last_was_unk = false;
  std::string piece;
  for (size_t i = 0; i < word.size();) {
    const size_t start = i;
    NextCodePoint(word, i);
    piece.assign(word.substr(start, i - start));
    if (i == word.size()) piece += options_.end_of_word_suffix;
    const auto it = vocab_.find(piece);
    if (it != vocab_.end()) {
      push_symbol(it->second);
      last_was_unk = false;
      continue;
    }
    if (options_.byte_fallback) {
      bool all_bytes_known = true;
      for (size_t k = start; k < i; ++k) {
        all_bytes_known &= byte_ids_[static_cast<unsigned char>(word[k])] >= 0;
      }
      if (all_bytes_known) {
        for (size_t k = start; k < i; ++k)
          push_symbol(byte_ids_[static_cast<unsigned char>(word[k])]);
        last_was_unk = false;
        continue;
      }
    }
    // Unknown character: the unk token (fused with a preceding one if asked), or nothing if the
    // model has no unk token (as in HF tokenizers).
    if (unk_id_.has_value() && !(options_.fuse_unk && last_was_unk)) push_symbol(*unk_id_);
    last_was_unk = unk_id_.has_value();
  }
  if (symbols.empty()) return;

  // 2. Repeatedly merge the pair with the lowest rank, leftmost first, using a heap of candidates.
  //    A candidate is stale once either side has changed; ids identify that, because a symbol's
  //    id only ever changes to a longer token.
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t left_id;
    int32_t right_id;
    int32_t new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  auto consider = [&](int32_t pos) {
    if (pos < 0) return;
    const int32_t next = symbols[pos].next;
    if (next < 0) return;
    const auto it = merges_.find(PairKey(symbols[pos].id, symbols[next].id));
    if (it == merges_.end()) return;
    queue.push(
        Candidate{it->second.rank, pos, symbols[pos].id, symbols[next].id, it->second.new_id});
  };
  for (int32_t pos = 0; pos + 1 < static_cast<int32_t>(symbols.size()); ++pos) consider(pos);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& left = symbols[c.pos];
    if (left.id != c.left_id || left.next < 0 || symbols[left.next].id != c.right_id) continue;
    // Merge right into left; the left symbol keeps its position.
    const int32_t right_pos = left.next;
    left.id = c.new_id;
    left.next = symbols[right_pos].next;
    if (left.next >= 0) symbols[left.next].prev = c.pos;
    symbols[right_pos].id = -1;  // dead
    consider(left.prev);
    consider(c.pos);
  }

  // 3. The first symbol is never merged away (it is always a left side).
  for (int32_t pos = 0; pos >= 0; pos = symbols[pos].next) out.push_back(symbols[pos].id);
}

}  // namespace duet::tokenizer::internal
