// Element types of tensors on disk, in memory and on the wire, and their conversions.
// No math beyond rounding lives here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace duet {

enum class DType : uint8_t { kF32, kF16, kBF16 };

// Bytes per element.
size_t DTypeSize(DType dtype);
// "f32", "f16", "bf16".
std::string_view DTypeName(DType dtype);

// bf16: the top 16 bits of an IEEE f32. Conversion from f32 rounds to nearest even; NaN stays NaN.
inline uint16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// IEEE half precision.
float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);

// Converts n elements of src (any dtype) to f32.
void ConvertToF32(DType src_dtype, const void* src, float* dst, size_t n);
// Converts n f32 elements to bf16 (round to nearest even).
void ConvertF32ToBf16(const float* src, uint16_t* dst, size_t n);
// IEEE half with saturation (what the f16 K/V cache stores): round to nearest even, values
// beyond +-65504 clamp to +-65504 instead of becoming infinite; NaN stays NaN. F16C.
uint16_t F32ToF16Sat(float f);
void ConvertF32ToF16Sat(const float* src, uint16_t* dst, size_t n);
void ConvertF16ToF32(const uint16_t* src, float* dst, size_t n);

}  // namespace duet
