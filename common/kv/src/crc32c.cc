// CRC-32C (Castagnoli) with the SSE4.2 crc32 instruction.
//
// The instruction has a latency of several cycles but issues every cycle, so long buffers are
// cut into three interleaved streams whose CRCs are combined: the raw (unconditioned) CRC is
// linear over GF(2), so crc(A then B) = shift(crc(A), |B|) ^ crc_from_zero(B), where shift
// multiplies the register by x^(8|B|) mod P. shift for a fixed |B| is itself linear in the 32
// register bits and is kept as four 256-entry tables, built once from the instruction itself.
#include <immintrin.h>

#include <cstring>

#include "duet/kv/codec.h"

namespace duet::kv {
namespace {

inline uint32_t Step8(uint32_t crc, const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return static_cast<uint32_t>(_mm_crc32_u64(crc, w));
}

uint32_t Serial(uint32_t crc, const uint8_t* p, size_t n) {
  for (; n >= 8; p += 8, n -= 8) crc = Step8(crc, p);
  for (; n > 0; ++p, --n) crc = _mm_crc32_u8(crc, *p);
  return crc;
}

// The register after feeding `n` zero bytes (a multiple of 8) to register `crc`.
uint32_t FeedZeros(uint32_t crc, size_t n) {
  uint64_t c = crc;
  for (size_t i = 0; i < n; i += 8) c = _mm_crc32_u64(static_cast<uint32_t>(c), 0);
  return static_cast<uint32_t>(c);
}

// Multiplication of a raw register by x^(8n) mod P, for one n.
struct Shift {
  uint32_t table[4][256];

  explicit Shift(size_t n) {
    uint32_t basis[32];
    for (int bit = 0; bit < 32; ++bit) basis[bit] = FeedZeros(1u << bit, n);
    for (int byte = 0; byte < 4; ++byte) {
      for (uint32_t v = 0; v < 256; ++v) {
        uint32_t r = 0;
        for (int bit = 0; bit < 8; ++bit) {
          if (v & (1u << bit)) r ^= basis[8 * byte + bit];
        }
        table[byte][v] = r;
      }
    }
  }
  uint32_t operator()(uint32_t crc) const {
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^ table[2][(crc >> 16) & 0xff] ^
           table[3][crc >> 24];
  }
};

constexpr size_t kLong = 8192;  // bytes per stream in a long group
constexpr size_t kShort = 256;  // bytes per stream in a short group

// Three streams of `len` bytes each from p; returns the register after all 3 * len bytes.
inline uint32_t ThreeWay(uint32_t crc, const uint8_t* p, size_t len, const Shift& shift) {
  uint32_t c0 = crc, c1 = 0, c2 = 0;
  for (size_t i = 0; i < len; i += 8) {
    c0 = Step8(c0, p + i);
    c1 = Step8(c1, p + len + i);
    c2 = Step8(c2, p + 2 * len + i);
  }
  return shift(shift(c0) ^ c1) ^ c2;
}

}  // namespace

uint32_t Crc32c(const void* data, size_t n, uint32_t crc) {
  static const Shift* const kLongShift = new Shift(kLong);
  static const Shift* const kShortShift = new Shift(kShort);
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
  for (; n >= 3 * kLong; p += 3 * kLong, n -= 3 * kLong) c = ThreeWay(c, p, kLong, *kLongShift);
  for (; n >= 3 * kShort; p += 3 * kShort, n -= 3 * kShort) {
    c = ThreeWay(c, p, kShort, *kShortShift);
  }
  return ~Serial(c, p, n);
}

}  // namespace duet::kv
