// A stable 128-bit content hash, printed as 32 hex digits. Not cryptographic: it tells models
// apart, it does not authenticate them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace duet::model {

class Hasher {
 public:
  void Update(const void* data, size_t n);
  void Update(std::string_view s) { Update(s.data(), s.size()); }
  std::string HexDigest() const;

 private:
  uint64_t a_ = 0x243f6a8885a308d3ull, b_ = 0x13198a2e03707344ull;
  uint64_t n_ = 0;
};

}  // namespace duet::model
