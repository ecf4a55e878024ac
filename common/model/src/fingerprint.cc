#include "duet/model/fingerprint.h"

#include <cstdio>
#include <cstring>

namespace duet::model {
namespace {
inline uint64_t Rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}
}  // namespace

void Hasher::Update(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  size_t i = 0;
  uint64_t a = a_, b = b_;
  // Two independent lanes of 8-byte words keep this near memory speed.
  for (; i + 16 <= n; i += 16) {
    uint64_t w0, w1;
    std::memcpy(&w0, p + i, 8);
    std::memcpy(&w1, p + i + 8, 8);
    a = Rotl(a ^ (w0 * 0x9e3779b97f4a7c15ull), 31) * 0xbf58476d1ce4e5b9ull;
    b = Rotl(b ^ (w1 * 0x94d049bb133111ebull), 27) * 0x9e3779b97f4a7c15ull;
  }
  for (; i < n; ++i) {
    a = Rotl(a ^ (p[i] * 0x9e3779b97f4a7c15ull), 31) * 0xbf58476d1ce4e5b9ull;
  }
  a_ = a;
  b_ = b;
  n_ += n;
}

std::string Hasher::HexDigest() const {
  const uint64_t x = Mix(a_ ^ Rotl(b_, 17) ^ n_);
  const uint64_t y = Mix(b_ ^ Rotl(a_, 41) ^ (n_ * 0x9e3779b97f4a7c15ull));
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(x),
                static_cast<unsigned long long>(y));
  return buf;
}

}  // namespace duet::model
