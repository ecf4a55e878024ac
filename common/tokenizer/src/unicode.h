// UTF-8 and Unicode helpers for the tokenizer (private to duet_tokenizer).
#ifndef DUET_TOKENIZER_SRC_UNICODE_H_
#define DUET_TOKENIZER_SRC_UNICODE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace duet::tokenizer::internal {

inline constexpr char32_t kReplacementChar = 0xFFFD;

// Length of the valid UTF-8 sequence starting at s[i], or 0 if the bytes there are not one.
size_t ValidSequenceLength(std::string_view s, size_t i);

// Decodes the code point at s[i] (s must be valid UTF-8 there) and advances i past it.
char32_t NextCodePoint(std::string_view s, size_t& i);

void AppendUtf8(char32_t cp, std::string& out);

// Replaces every maximal invalid subsequence (WHATWG "maximal subpart") with U+FFFD.
// Returns `s` unchanged (a copy) when it is already valid.
std::string ToValidUtf8(std::string_view s);
bool IsValidUtf8(std::string_view s);

// If `s` ends with a proper prefix of a valid multi-byte UTF-8 sequence (one that more bytes could
// complete), returns its length (1..3); otherwise 0.
size_t IncompleteUtf8TailLength(std::string_view s);

// Unicode White_Space property (what `char::is_whitespace` and Oniguruma's \s use).
bool IsWhiteSpace(char32_t cp);
// General categories L* / N* (utf8proc's tables).
bool IsLetter(char32_t cp);
bool IsNumber(char32_t cp);

enum class NormalForm { kNfc, kNfd, kNfkc, kNfkd };
// Unicode normalisation of valid UTF-8 (utf8proc). ASCII input is returned as is.
std::string Normalize(std::string_view s, NormalForm form);
// Simple (one-to-one) lowercase mapping of each code point.
std::string Lowercase(std::string_view s);

// GPT-2's reversible byte <-> printable-character map used by byte-level BPE.
struct ByteLevelAlphabet {
  std::array<std::string, 256> byte_to_utf8;  // the character (as UTF-8) standing for each byte
  std::array<int16_t, 512> char_to_byte;      // code point (< 512) -> byte, or -1
};
const ByteLevelAlphabet& GetByteLevelAlphabet();

// Maps each byte of `s` to its byte-level character.
std::string BytesToByteLevel(std::string_view s);
// Inverse of BytesToByteLevel; characters outside the alphabet are copied as their UTF-8 bytes.
std::string ByteLevelToBytes(std::string_view s);

}  // namespace duet::tokenizer::internal

#endif  // DUET_TOKENIZER_SRC_UNICODE_H_
