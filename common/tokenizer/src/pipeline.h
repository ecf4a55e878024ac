// The stages of a tokenizer.json pipeline around the model (private): added-token matching,
// normalizers, pre-tokenizers, and the decoder rules.
#ifndef DUET_TOKENIZER_SRC_PIPELINE_H_
#define DUET_TOKENIZER_SRC_PIPELINE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "regex.h"
#include "unicode.h"

namespace duet::tokenizer::internal {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false;       // the match absorbs whitespace on its left
  bool rstrip = false;       // the match absorbs whitespace on its right
  bool single_word = false;  // only matches when not inside a word
  bool normalized = false;   // matched in normalized text rather than in the input
};

// Finds added tokens in text: at each position the longest token wins, scanning left to right
// (Hugging Face's leftmost-longest rule).
class AddedTokenMatcher {
 public:
  struct Match {
    size_t begin;  // including absorbed whitespace (lstrip)
    size_t end;    // including absorbed whitespace (rstrip)
    const AddedToken* token;
  };

  // `tokens` must outlive the matcher.
  void Build(const std::vector<const AddedToken*>& tokens);
  bool empty() const { return nodes_.size() <= 1; }
  std::vector<Match> FindAll(std::string_view text) const;

 private:
  struct Node {
    const AddedToken* token = nullptr;  // a token ends here
  };
  static uint64_t EdgeKey(int32_t node, unsigned char byte) {
    return (static_cast<uint64_t>(node) << 8) | byte;
  }
  std::vector<Node> nodes_{Node{}};
  absl::flat_hash_map<uint64_t, int32_t> edges_;
  std::array<bool, 256> first_byte_{};
};

struct NormalizerStep {
  enum class Kind { kUnicode, kLowercase, kPrepend, kReplace, kStrip };
  Kind kind = Kind::kUnicode;
  NormalForm form = NormalForm::kNfc;  // kUnicode
  std::string text;                    // kPrepend: what to prepend; kReplace: literal pattern
  std::shared_ptr<const Regex> regex;  // kReplace with a regex pattern
  std::string content;                 // kReplace: replacement
  bool strip_left = false;             // kStrip
  bool strip_right = false;            // kStrip
};

std::string ApplyNormalizers(const std::vector<NormalizerStep>& steps, std::string text);

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
enum class PrependScheme { kAlways, kFirst, kNever };

struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel, kMetaspace, kDigits };
  Kind kind = Kind::kSplit;
  // kSplit (regex or literal), and kByteLevel's GPT-2 regex when use_regex.
  std::shared_ptr<const Regex> regex;
  std::string literal;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  // kByteLevel
  bool add_prefix_space = false;
  // kMetaspace
  std::string replacement;
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  bool split = true;
  // kDigits
  bool individual_digits = false;
};

// Receives pre-tokens; the view is valid only during the call.
using WordSink = std::function<void(std::string_view)>;

// Splits one normalized section into pre-tokens (words), in order, passing each to `emit`.
// `at_text_start`: the section starts at offset 0 of the input (Metaspace's prepend_scheme
// "first").
void PreTokenize(const std::vector<PreTokenizerStep>& steps, std::string_view text,
                 bool at_text_start, const WordSink& emit);

// The GPT-2 regex that ByteLevel uses with use_regex = true.
inline constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// How ids become text. Every supported decoder chain reduces to: a byte string per id (computed
// once at load), concatenated, made valid UTF-8, then a few whole-text rules. This is what lets
// StreamDecoder produce exactly Decode's text.
struct DecodeRules {
  bool join_with_space = false;          // no decoder: tokens are joined with ' ' (as HF does)
  bool strip_first_token_space = false;  // Metaspace decoder: the first token drops one leading ' '
  std::string strip_content;             // Strip after Fuse/ByteLevel: this character ...
  int32_t n_strip_start = 0;             // ... is removed up to n times at the start of the text
  int32_t n_strip_stop = 0;              // ... and up to n times at its end
};

struct DecoderStep {
  enum class Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace };
  Kind kind = Kind::kFuse;
  std::string pattern;  // kReplace literal
  std::shared_ptr<const Regex> regex;
  std::string content;        // kReplace replacement; kStrip character; kMetaspace replacement
  int32_t start = 0;          // kStrip
  int32_t stop = 0;           // kStrip
  bool prefix_space = false;  // kMetaspace: strip the first token's leading space
};

// Reduces a decoder chain to DecodeRules plus a per-token transform. Returns the bytes that
// `token` contributes. `is_added`: added tokens are not byte-level decoded (their text is literal).
std::string DecodeTokenPiece(const std::vector<DecoderStep>& steps, std::string_view token,
                             bool is_added);
DecodeRules MakeDecodeRules(const std::vector<DecoderStep>& steps, bool has_decoder);

// Strips up to `n` leading / trailing occurrences of `c` (one UTF-8 character) from `text`.
std::string_view StripLeading(std::string_view text, std::string_view c, int32_t n);
std::string_view StripTrailing(std::string_view text, std::string_view c, int32_t n);

}  // namespace duet::tokenizer::internal

#endif  // DUET_TOKENIZER_SRC_PIPELINE_H_
