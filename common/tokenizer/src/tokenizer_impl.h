// TokenizerImpl: everything a loaded tokenizer holds (private to duet_tokenizer).
#ifndef DUET_TOKENIZER_SRC_TOKENIZER_IMPL_H_
#define DUET_TOKENIZER_SRC_TOKENIZER_IMPL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "bpe.h"
#include "duet/tokenizer/tokenizer.h"
#include "pipeline.h"

namespace duet::tokenizer::internal {

// One entry per id in [0, vocab_size).
struct TokenEntry {
  std::string token;    // vocabulary string ("Ġthe", "<0x0A>", "<s>")
  std::string decoded;  // bytes it contributes to Decode (may be part of a UTF-8 character)
  bool valid = false;   // false for holes in the id space
  bool special = false;
  bool added = false;
};

// A template item of the post-processor: either the input sequence or fixed ids.
struct TemplateItem {
  bool is_sequence = false;
  std::vector<int32_t> ids;
};

struct TokenizerImpl {
  std::vector<AddedToken> added_tokens;
  absl::flat_hash_map<std::string, int32_t> added_by_content;
  AddedTokenMatcher raw_matcher;         // added tokens with normalized = false
  AddedTokenMatcher normalized_matcher;  // added tokens with normalized = true
  std::vector<NormalizerStep> normalizers;
  std::vector<PreTokenizerStep> pre_tokenizers;
  BpeModel model;
  std::vector<TemplateItem> single_template;  // empty: add_special_tokens adds nothing
  DecodeRules decode_rules;
  std::vector<TokenEntry> entries;  // by id
  std::optional<int32_t> bos_id;
  std::optional<int32_t> eos_id;

  // Encodes one section of text that holds no raw-matched added token.
  void EncodeSection(std::string_view text, bool at_text_start, std::vector<int32_t>& out) const;
  // Bytes of one id for Decode/StreamDecoder, after first-token rules; nullopt if it is skipped.
  std::optional<std::string_view> PieceFor(int32_t id, bool skip_special, bool first) const;
};

// Builders (load.cc).
absl::StatusOr<std::unique_ptr<TokenizerImpl>> BuildFromTokenizerJson(
    std::string_view tokenizer_json, std::string_view tokenizer_config_json);
absl::StatusOr<std::unique_ptr<TokenizerImpl>> BuildFromGpt2Files(std::string_view vocab_json,
                                                                  std::string_view merges_txt);

}  // namespace duet::tokenizer::internal

#endif  // DUET_TOKENIZER_SRC_TOKENIZER_IMPL_H_
