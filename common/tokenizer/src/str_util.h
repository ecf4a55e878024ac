// String helpers (private). Debian's abseil is built with its own absl::string_view, which does not
// accept std::string_view; these helpers keep std::string_view at duet's boundaries.
#ifndef DUET_TOKENIZER_SRC_STR_UTIL_H_
#define DUET_TOKENIZER_SRC_STR_UTIL_H_

#include <string>
#include <string_view>
#include <type_traits>

#include "absl/strings/string_view.h"

namespace duet::tokenizer::internal {

inline absl::string_view AsAbsl(std::string_view s) {
  return absl::string_view(s.data(), s.size());
}
inline std::string_view AsStd(absl::string_view s) { return std::string_view(s.data(), s.size()); }

namespace detail {
inline void AppendPiece(std::string& out, std::string_view s) { out.append(s); }
inline void AppendPiece(std::string& out, absl::string_view s) { out.append(s.data(), s.size()); }
inline void AppendPiece(std::string& out, const char* s) { out.append(s); }
inline void AppendPiece(std::string& out, const std::string& s) { out.append(s); }
template <typename T>
requires(std::is_integral_v<T> && !std::is_same_v<T, char> &&
         !std::is_same_v<T, bool>) void AppendPiece(std::string& out, T v) {
  out += std::to_string(v);
}
}  // namespace detail

// Concatenates strings and integers.
template <typename... Args>
std::string Cat(const Args&... args) {
  std::string out;
  (detail::AppendPiece(out, args), ...);
  return out;
}

}  // namespace duet::tokenizer::internal

#endif  // DUET_TOKENIZER_SRC_STR_UTIL_H_
