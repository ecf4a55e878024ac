// Vectorisable exp for f32 kernels (softmax, SiLU, GELU). Relative error < 2e-7 over the
// range that matters; inputs below -87 flush to 0, above 88 saturate at FLT_MAX-ish.
#pragma once

#include <cstdint>
#include <cstring>

namespace duet::kernels {

#pragma omp declare simd notinbranch
inline float FastExp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2].
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two parts
  // Degree-6 Taylor/minimax polynomial for exp(r) on [-0.35, 0.35].
  float p = 1.3888949e-3f;
  p = p * r + 8.3333337e-3f;
  p = p * r + 4.1666664e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

}  // namespace duet::kernels
