// duet::tokenizer — text <-> token ids for the models duet serves.
//
// Supported (anything else is rejected at load time with a status naming the component):
//   * tokenizer.json (Hugging Face `tokenizers` format) with model type BPE:
//     - byte-level BPE (GPT-2, Llama 3, Qwen): Split(regex) + ByteLevel, ByteLevel decoder;
//     - SentencePiece-style BPE (Llama 2): Prepend/Replace normalizers or a Metaspace
//       pre-tokenizer, byte_fallback to <0xNN> tokens, Replace/ByteFallback/Fuse/Strip/Metaspace
//       decoders;
//     - normalizers NFC/NFD/NFKC/NFKD/Lowercase/Prepend/Replace/Strip/Sequence;
//     - pre-tokenizers Split/ByteLevel/Metaspace/Digits/Sequence;
//     - added tokens (special or not) with lstrip/rstrip/single_word/normalized;
//     - post-processors TemplateProcessing/BertProcessing/RobertaProcessing/ByteLevel/Sequence
//       (the single-sequence template only);
//     - merges as "a b" strings or as ["a", "b"] pairs.
//   * GPT-2's vocab.json + merges.txt, with <|endoftext|> as the special (bos = eos) token.
//
// Semantics follow Hugging Face `tokenizers` (the Rust library). The parity test
// (tests/unit/tokenizer/parity_test.cc) checks ids against its JavaScript port on the real GPT-2,
// Llama 2, Llama 3 and Qwen 3 files. Deliberate differences:
//   * Regex `\s` means the Unicode White_Space property, as in Oniguruma (used by `tokenizers`) and
//     tiktoken; PCRE2 alone would also match U+180E, JavaScript matches U+FEFF and not U+0085.
//     Regexes run with PCRE2 (UTF + UCP): letter/number classes follow PCRE2's Unicode tables.
//   * Encode first repairs text that is not valid UTF-8: each maximal invalid subsequence
//     becomes U+FFFD.
//   * Decode turns bytes that are not valid UTF-8 into one U+FFFD per maximal invalid subsequence,
//     also for byte-fallback tokens (HF's ByteFallback decoder writes one U+FFFD per byte there).
//   * Added tokens decode to their literal text, also under a ByteLevel decoder.
//   * Decode never applies `clean_up_tokenization_spaces` (it breaks streaming and round trips).
//
// Thread safety: a Tokenizer is immutable after construction except for an internal, mutex-guarded
// cache of BPE results; Encode, Decode and every other const method may be called from many threads
// at once. A StreamDecoder is per-stream state: one thread at a time.
#ifndef DUET_TOKENIZER_TOKENIZER_H_
#define DUET_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace duet::tokenizer {

namespace internal {
struct TokenizerImpl;  // defined in src/tokenizer_impl.h
}  // namespace internal

class Tokenizer {
 public:
  // Loads `model_dir`/tokenizer.json, or else GPT-2's `model_dir`/vocab.json + merges.txt.
  // `model_dir`/tokenizer_config.json, when present, supplies bos_token / eos_token.
  // Errors (one status, naming the file and the problem):
  //   NOT_FOUND       the directory or the tokenizer files are missing;
  //   INVALID_ARGUMENT a file is not valid JSON or its structure is wrong (merge of unknown tokens,
  //   ...); UNIMPLEMENTED   a component type duet does not support (e.g. model type "WordPiece").
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::filesystem::path& model_dir);

  // Builds a tokenizer from the text of a tokenizer.json, and optionally of a tokenizer_config.json
  // (for bos/eos; empty = none). Errors as for Load.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(
      std::string_view tokenizer_json, std::string_view tokenizer_config_json = {});

  // Builds a GPT-2 style byte-level BPE tokenizer from the text of vocab.json and merges.txt.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGpt2Files(std::string_view vocab_json,
                                                                  std::string_view merges_txt);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Text -> ids. Added tokens (special or not) written in `text` are matched as single tokens,
  // longest match first, before normalisation, as Hugging Face does. With add_special_tokens, the
  // post_processor's single-sequence template is applied (e.g. Llama 2 prepends <s>); tokenizers
  // whose post_processor adds nothing (GPT-2, and the Llama 3 / Qwen 3 files used in tests) add
  // nothing.
  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens = false) const;

  // Ids -> text, through the tokenizer's decoder chain. Bytes that do not form valid UTF-8 become
  // U+FFFD (one per maximal invalid subsequence, as WHATWG/`String::from_utf8_lossy` do).
  // Ids that are not valid (see IsValidId) are skipped: they add nothing to the text (as in HF
  // `tokenizers`). Callers that must reject them check IsValidId first.
  std::string Decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // Number of ids, including added tokens: one past the largest id.
  int32_t vocab_size() const;
  // Id of a token string exactly as it is in the vocabulary (e.g. "Ġthe", "<s>"), added tokens
  // first.
  std::optional<int32_t> TokenToId(std::string_view token) const;
  // The vocabulary string of an id (e.g. "Ġthe"), or nullopt if !IsValidId(id).
  std::optional<std::string> IdToToken(int32_t id) const;
  // From tokenizer_config.json when given; otherwise from the post_processor template (bos) or
  // well-known token names (<s>, </s>, <|begin_of_text|>, <|end_of_text|>, <|endoftext|>).
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  // True iff 0 <= id < vocab_size() and the id names a token (vocabularies may have holes).
  bool IsValidId(int32_t id) const;
  // True for added tokens marked special (skipped by Decode(..., skip_special_tokens=true)).
  bool IsSpecialId(int32_t id) const;

 private:
  friend class StreamDecoder;
  explicit Tokenizer(std::unique_ptr<internal::TokenizerImpl> impl);
  std::unique_ptr<internal::TokenizerImpl> impl_;
};

// Streaming-safe detokenisation for one generated sequence. Push returns only complete UTF-8 text:
// bytes of an incomplete character (e.g. one byte-level token of a 4-byte emoji) are held until it
// completes or proves invalid. The concatenation of all Push() outputs and Flush() equals
// Decode(all pushed ids, skip_special_tokens). Flush() returns what is held (an incomplete
// character becomes U+FFFD) and resets the decoder to its initial state. The Tokenizer must outlive
// it.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false);

  std::string Push(int32_t id);
  std::string Flush();

 private:
  std::string Emit(std::string text, bool final);

  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  bool seen_token_ = false;         // a token has contributed since the start (first-token rules)
  int32_t n_strip_left_remaining_;  // leading strip characters still to drop
  std::string pending_bytes_;       // an incomplete UTF-8 sequence at the end of the output so far
  std::string held_tail_;           // trailing strip characters held back (decoder Strip stop > 0)
};

}  // namespace duet::tokenizer

#endif  // DUET_TOKENIZER_TOKENIZER_H_
