#include "duet/tensor/dtype.h"

#include <immintrin.h>

namespace duet {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
  }
  return 0;
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
  }
  return "?";
}

float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t F32ToF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;     // NaN
  if (abs >= 0x47800000u) return sign | 0x7c00u;    // overflow to inf (>= 65536)
  if (abs < 0x33000000u) return sign;               // underflow to zero
  int exp = static_cast<int>(abs >> 23) - 127 + 15;
  uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
  uint32_t shift = 13;
  if (exp <= 0) {  // subnormal half
    shift = static_cast<uint32_t>(14 - exp);
    exp = 0;
  }
  uint32_t half_mant = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1);
  const uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (half_mant & 1u))) ++half_mant;
  uint32_t out;
  if (exp == 0) {
    out = half_mant;  // may carry into the exponent, which is correct
  } else {
    // half_mant holds the implicit bit (0x400); a rounding carry correctly bumps the exponent.
    out = (static_cast<uint32_t>(exp) << 10) + half_mant - 0x400u;
  }
  return static_cast<uint16_t>(sign | out);
}

void ConvertToF32(DType src_dtype, const void* src, float* dst, size_t n) {
  switch (src_dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(s[i]);
      return;
    }
    case DType::kF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = F16ToF32(s[i]);
      return;
    }
  }
}

namespace {
// GCC 12's AVX-512 intrinsics trip -Wmaybe-uninitialized on their own undefined-vector idiom.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// F32ToBf16 sixteen at a time, bit for bit (the same rounding and NaN rule; denormals kept, as
// vcvtneps2bf16 would not keep them).
__attribute__((target("avx512f"))) size_t ConvertF32ToBf16Avx512(const float* src,
                                                                   uint16_t* dst, size_t n) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_loadu_si512(src + i);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs_mask), inf);
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(hi, one))), 16);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(r));
  }
  return i;
}
#pragma GCC diagnostic pop
}  // namespace

void ConvertF32ToBf16(const float* src, uint16_t* dst, size_t n) {
  // Decode converts every matmul's input rows (GPT-2 at batch 16: 49152 values before each MLP
  // down projection); AVX2 code from the loop below took ~20 us of a 200 us matmul.
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  size_t i = avx512 ? ConvertF32ToBf16Avx512(src, dst, n) : 0;
  for (; i < n; ++i) dst[i] = F32ToBf16(src[i]);
}

namespace {
constexpr float kF16Max = 65504.0f;
// max/min return their second operand when either is NaN: with x second, the clamp keeps NaN.
inline __m256 ClampF16(__m256 x) {
  return _mm256_min_ps(_mm256_set1_ps(kF16Max), _mm256_max_ps(_mm256_set1_ps(-kF16Max), x));
}
}  // namespace

uint16_t F32ToF16Sat(float f) {
  const __m128 x = _mm_min_ss(_mm_set_ss(kF16Max), _mm_max_ss(_mm_set_ss(-kF16Max), _mm_set_ss(f)));
  return static_cast<uint16_t>(
      _mm_extract_epi16(_mm_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), 0));
}

void ConvertF32ToF16Sat(const float* src, uint16_t* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(ClampF16(_mm256_loadu_ps(src + i)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = F32ToF16Sat(src[i]);
}

void ConvertF16ToF32(const uint16_t* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

}  // namespace duet
