// A compiled PCRE2 regex (UTF + UCP, JIT when available) for pre-tokenizer splits (private).
#ifndef DUET_TOKENIZER_SRC_REGEX_H_
#define DUET_TOKENIZER_SRC_REGEX_H_

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace duet::tokenizer::internal {

// Rewrites `\s` (and `\S` outside character classes) to explicit classes of the Unicode White_Space
// characters, so that the pattern means what it means in Oniguruma/Rust regex. PCRE2's own `\s`
// also matches U+180E, which is not White_Space since Unicode 6.3.
std::string RewriteWhitespaceEscapes(std::string_view pattern);

class Regex {
 public:
  // Compiles `pattern` (after RewriteWhitespaceEscapes). INVALID_ARGUMENT with PCRE2's message.
  static absl::StatusOr<std::shared_ptr<const Regex>> Compile(std::string_view pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // All non-overlapping matches in `text` (valid UTF-8), left to right, as [begin, end) byte
  // offsets. An empty match advances by one character and is not reported. Thread-safe.
  std::vector<std::pair<size_t, size_t>> FindAll(std::string_view text) const;

  const std::string& pattern() const { return pattern_; }

 private:
  Regex() = default;
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code_8*
};

}  // namespace duet::tokenizer::internal

#endif  // DUET_TOKENIZER_SRC_REGEX_H_
