#include "kv_pack.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "duet/tensor/dtype.h"

namespace duet::kv::internal {
namespace {

// dst[c * ds + r] = src[r * ss + c] for an 8x8 tile.
inline void Transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
  const __m256 r0 = _mm256_loadu_ps(src + 0 * ss), r1 = _mm256_loadu_ps(src + 1 * ss);
  const __m256 r2 = _mm256_loadu_ps(src + 2 * ss), r3 = _mm256_loadu_ps(src + 3 * ss);
  const __m256 r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss);
  const __m256 r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
  // Rows a..h. Interleave pairs: t0 = a0 b0 a1 b1 | a4 b4 a5 b5, t1 = a2 b2 a3 b3 | a6 b6 a7 b7.
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  // Quads: u0 = a0 b0 c0 d0 | a4 b4 c4 d4, u1 = a1 b1 c1 d1 | a5 .., u2 = a2 .. | a6 .., u3 = a3 ..
  // | a7 ..
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  // Join the a-d and e-h halves.
  _mm256_storeu_ps(dst + 0 * ds, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ds, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// dst[c * ds + r] = src[r * ss + c] for r < rows, c < cols.
void Transpose(const float* src, int64_t ss, float* dst, int64_t ds, int32_t rows, int32_t cols) {
  int32_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    int32_t c = 0;
    for (; c + 8 <= cols; c += 8) Transpose8x8(src + r * ss + c, ss, dst + c * ds + r, ds);
    for (; c < cols; ++c) {
      for (int32_t i = 0; i < 8; ++i) dst[c * ds + r + i] = src[(r + i) * ss + c];
    }
  }
  for (; r < rows; ++r) {
    for (int32_t c = 0; c < cols; ++c) dst[c * ds + r] = src[r * ss + c];
  }
}

// x / scale rounded half-even and clamped to [-127, 127] (NaN -> -127), as int32 lanes.
inline __m256i QuantizeLanes(__m256 x, __m256 scale) {
  __m256 q =
      _mm256_round_ps(_mm256_div_ps(x, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_max_ps(q, _mm256_set1_ps(-127.0f));  // NaN takes the second operand
  q = _mm256_min_ps(q, _mm256_set1_ps(127.0f));
  return _mm256_cvtps_epi32(q);
}

inline float QuantizeOne(float x, float scale) {
  float q = std::nearbyint(x / scale);
  if (!(q >= -127.0f)) q = -127.0f;
  if (q > 127.0f) q = 127.0f;
  return q;
}

// `rows` rows of head_dim f32 (contiguous) -> wire rows.
void EncodeRows(const float* x, int32_t rows, int32_t head_dim, WireType type, uint8_t* out,
                float* scales) {
  const size_t n = static_cast<size_t>(rows) * head_dim;
  switch (type) {
    case WireType::kF32:
      std::memcpy(out, x, n * sizeof(float));
      break;
    case WireType::kBF16:
      F32ToBf16Row(x, out, n);
      break;
    case WireType::kInt8:
      for (int32_t i = 0; i < rows; ++i) {
        scales[i] = QuantizeInt8Row(x + static_cast<size_t>(i) * head_dim,
                                    out + static_cast<size_t>(i) * head_dim, head_dim);
      }
      break;
  }
}

// Wire rows -> `rows` rows of head_dim f32 (contiguous).
void DecodeRows(const uint8_t* in, int32_t rows, int32_t head_dim, WireType type,
                const float* scales, float* x) {
  const size_t n = static_cast<size_t>(rows) * head_dim;
  switch (type) {
    case WireType::kF32:
      std::memcpy(x, in, n * sizeof(float));
      break;
    case WireType::kBF16:
      Bf16ToF32Row(in, x, n);
      break;
    case WireType::kInt8:
      for (int32_t i = 0; i < rows; ++i) {
        DequantizeInt8Row(in + static_cast<size_t>(i) * head_dim, scales[i],
                          x + static_cast<size_t>(i) * head_dim, head_dim);
      }
      break;
  }
}

}  // namespace

void F32ToBf16Row(const float* x, uint8_t* y, size_t n) {
  // Wire rows start at even offsets of heap buffers; the engine's conversion does the rest.
  if (reinterpret_cast<uintptr_t>(y) % alignof(uint16_t) == 0) {
    ConvertF32ToBf16(x, reinterpret_cast<uint16_t*>(y), n);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = F32ToBf16(x[i]);
    std::memcpy(y + 2 * i, &h, 2);
  }
}

void Bf16ToF32Row(const uint8_t* y, float* x, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(y + 2 * i));
    const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(x + i, _mm256_castsi256_ps(u));
  }
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, y + 2 * i, 2);
    x[i] = Bf16ToF32(h);
  }
}

float QuantizeInt8Row(const float* x, uint8_t* q, size_t n) {
  // max |x|
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    vmax = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), vmax);
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  float max_abs = _mm_cvtss_f32(m4);
  for (; i < n; ++i) max_abs = std::max(max_abs, std::fabs(x[i]));

  const float scale = max_abs / 127.0f;
  if (!(scale > 0.0f)) {  // all zero (or underflow): q = 0, scale 0
    std::memset(q, 0, n);
    return 0.0f;
  }
  const __m256 vs = _mm256_set1_ps(scale);
  i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i a = QuantizeLanes(_mm256_loadu_ps(x + i), vs);
    const __m256i b = QuantizeLanes(_mm256_loadu_ps(x + i + 8), vs);
    const __m256i c = QuantizeLanes(_mm256_loadu_ps(x + i + 16), vs);
    const __m256i d = QuantizeLanes(_mm256_loadu_ps(x + i + 24), vs);
    // Per 128-bit lane the packs give a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7 (as dwords).
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    const __m256i ordered =
        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), ordered);
  }
  for (; i < n; ++i) q[i] = static_cast<uint8_t>(static_cast<int8_t>(QuantizeOne(x[i], scale)));
  return scale;
}

void DequantizeInt8Row(const uint8_t* q, float scale, float* x, size_t n) {
  const __m256 vs = _mm256_set1_ps(scale);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    _mm256_storeu_ps(x + i, _mm256_mul_ps(f, vs));
  }
  for (; i < n; ++i) x[i] = static_cast<float>(static_cast<int8_t>(q[i])) * scale;
}

namespace {

// An int8 cache holds rows of (scale, int8 values), K transposed within a block. To and from an
// int8 wire the rows are copied as they are (K transposed on the way), so int8 -> int8 is exact;
// other wires go through f32, and the cache quantizes what arrives as a local write would.
void PackI8(const kernels::PagedKvLayout& l, const int32_t* blocks, int32_t t0, int32_t t1,
            KvPart part, WireType type, uint8_t* wire, float* scales) {
  const int32_t n = t1 - t0, d = l.head_dim, bs = l.block_size;
  const size_t row_bytes = static_cast<size_t>(d) * WireElemSize(type);
  std::vector<float> tmp;  // f32 staging for the other wires: a block's rows
  if (type != WireType::kInt8) tmp.resize(static_cast<size_t>(std::min(bs, n)) * d);
  for (int32_t h = 0; h < l.n_kv_heads; ++h) {
    for (int32_t t = t0; t < t1;) {
      const int32_t b = blocks[t / bs], s0 = t % bs, m = std::min(bs - s0, t1 - t);
      const int64_t row = static_cast<int64_t>(h) * n + (t - t0);
      uint8_t* out = wire + row * row_bytes;
      const bool k = part == KvPart::kK;
      const float* sc = (k ? l.KScales(b, h) : l.VScales(b, h)) + s0;
      if (type == WireType::kInt8) {
        std::memcpy(scales + row, sc, static_cast<size_t>(m) * sizeof(float));
        if (k) {
          const int8_t* kt = l.KT<int8_t>(b, h) + s0;  // [head_dim][block_size]
          for (int32_t j = 0; j < m; ++j)
            for (int32_t i = 0; i < d; ++i)
              out[static_cast<int64_t>(j) * d + i] =
                  static_cast<uint8_t>(kt[static_cast<int64_t>(i) * bs + j]);
        } else {
          std::memcpy(out, l.V<int8_t>(b, h, s0), static_cast<size_t>(m) * d);
        }
      } else {
        if (k) {
          l.LoadKRows(b, h, s0, m, tmp.data());  // K is transposed in the block
        } else {
          const auto* q = reinterpret_cast<const uint8_t*>(l.V<int8_t>(b, h, s0));
          for (int32_t j = 0; j < m; ++j)
            DequantizeInt8Row(q + static_cast<int64_t>(j) * d, sc[j],
                              tmp.data() + static_cast<int64_t>(j) * d, d);
        }
        EncodeRows(tmp.data(), m, d, type, out, nullptr);
      }
      t += m;
    }
  }
}

void UnpackI8(const kernels::PagedKvLayout& l, const int32_t* blocks, int32_t t0, int32_t t1,
              KvPart part, WireType type, const uint8_t* wire, const float* scales) {
  const int32_t n = t1 - t0, d = l.head_dim, bs = l.block_size;
  const size_t row_bytes = static_cast<size_t>(d) * WireElemSize(type);
  std::vector<float> tmp;  // f32 staging for the other wires
  if (type != WireType::kInt8) tmp.resize(static_cast<size_t>(std::min(bs, n)) * d);
  for (int32_t h = 0; h < l.n_kv_heads; ++h) {
    for (int32_t t = t0; t < t1;) {
      const int32_t b = blocks[t / bs], s0 = t % bs, m = std::min(bs - s0, t1 - t);
      const int64_t row = static_cast<int64_t>(h) * n + (t - t0);
      const uint8_t* in = wire + row * row_bytes;
      const bool k = part == KvPart::kK;
      float* sc = (k ? l.KScales(b, h) : l.VScales(b, h)) + s0;
      if (type == WireType::kInt8) {
        std::memcpy(sc, scales + row, static_cast<size_t>(m) * sizeof(float));
        if (k) {
          int8_t* kt = l.KT<int8_t>(b, h) + s0;
          for (int32_t i = 0; i < d; ++i)
            for (int32_t j = 0; j < m; ++j)
              kt[static_cast<int64_t>(i) * bs + j] =
                  static_cast<int8_t>(in[static_cast<int64_t>(j) * d + i]);
        } else {
          std::memcpy(l.V<int8_t>(b, h, s0), in, static_cast<size_t>(m) * d);
        }
      } else {
        // An f32 wire is read in place (wire buffers are heap strings: 4-byte aligned rows).
        const float* x = reinterpret_cast<const float*>(in);
        if (type != WireType::kF32) {
          DecodeRows(in, m, d, type, nullptr, tmp.data());
          x = tmp.data();
        }
        if (k) {  // K is transposed in the block: the rows go in together
          l.StoreKRows(b, h, s0, m, x);
        } else {
          for (int32_t j = 0; j < m; ++j)
            sc[j] = kernels::QuantizeKvI8(x + static_cast<int64_t>(j) * d, d, 1,
                                          l.V<int8_t>(b, h, s0 + j));
        }
      }
      t += m;
    }
  }
}

}  // namespace

void Pack(const kernels::PagedKvLayout& l, const int32_t* blocks, int32_t t0, int32_t t1,
          KvPart part, WireType type, uint8_t* wire, float* scales) {
  const int32_t n = t1 - t0, d = l.head_dim, bs = l.block_size;
  const size_t row_bytes = static_cast<size_t>(d) * WireElemSize(type);
  if (l.dtype == kernels::KvDtype::kI8) {
    PackI8(l, blocks, t0, t1, part, type, wire, scales);
    return;
  }
  const bool f16_cache = l.dtype == kernels::KvDtype::kF16;
  // One block's rows as f32 [slot][head_dim] before conversion, and (f16 cache, K) the block's
  // K widened as [head_dim][slot].
  std::vector<float> tmp, tmp_t;
  if ((part == KvPart::kK && type != WireType::kF32) || f16_cache) {
    tmp.resize(static_cast<size_t>(std::min(bs, n)) * d);
  }
  if (f16_cache && part == KvPart::kK) tmp_t.resize(static_cast<size_t>(std::min(bs, n)) * d);
  for (int32_t h = 0; h < l.n_kv_heads; ++h) {
    // Block by block: slots [s0, s0 + m) of block `b` are wire rows [row, row + m).
    for (int32_t t = t0; t < t1;) {
      const int32_t b = blocks[t / bs], s0 = t % bs, m = std::min(bs - s0, t1 - t);
      const int64_t row = static_cast<int64_t>(h) * n + (t - t0);
      uint8_t* out = wire + row * row_bytes;
      float* sc = type == WireType::kInt8 ? scales + row : nullptr;
      if (f16_cache) {
        if (part == KvPart::kK) {
          const uint16_t* kt = l.KT<uint16_t>(b, h) + s0;  // [head_dim][block_size]
          for (int32_t i = 0; i < d; ++i) {
            ConvertF16ToF32(kt + static_cast<int64_t>(i) * bs,
                            tmp_t.data() + static_cast<int64_t>(i) * m, m);
          }
          Transpose(tmp_t.data(), m, tmp.data(), d, d, m);
        } else {
          ConvertF16ToF32(l.V<uint16_t>(b, h, s0), tmp.data(), static_cast<size_t>(m) * d);
        }
        EncodeRows(tmp.data(), m, d, type, out, sc);
      } else if (part == KvPart::kK) {
        const float* kt = l.KT(b, h) + s0;  // [head_dim][block_size]
        if (type == WireType::kF32) {
          // Wire buffers are heap strings: 4-byte aligned at every row.
          Transpose(kt, bs, reinterpret_cast<float*>(out), d, d, m);
        } else {
          Transpose(kt, bs, tmp.data(), d, d, m);
          EncodeRows(tmp.data(), m, d, type, out, sc);
        }
      } else {
        EncodeRows(l.V(b, h, s0), m, d, type, out, sc);  // m rows are contiguous in the block
      }
      t += m;
    }
  }
}

void Unpack(const kernels::PagedKvLayout& l, const int32_t* blocks, int32_t t0, int32_t t1,
            KvPart part, WireType type, const uint8_t* wire, const float* scales) {
  const int32_t n = t1 - t0, d = l.head_dim, bs = l.block_size;
  const size_t row_bytes = static_cast<size_t>(d) * WireElemSize(type);
  if (l.dtype == kernels::KvDtype::kI8) {
    UnpackI8(l, blocks, t0, t1, part, type, wire, scales);
    return;
  }
  const bool f16_cache = l.dtype == kernels::KvDtype::kF16;
  std::vector<float> tmp, tmp_t;
  if ((part == KvPart::kK && type != WireType::kF32) || f16_cache) {
    tmp.resize(static_cast<size_t>(std::min(bs, n)) * d);
  }
  if (f16_cache && part == KvPart::kK) tmp_t.resize(static_cast<size_t>(std::min(bs, n)) * d);
  for (int32_t h = 0; h < l.n_kv_heads; ++h) {
    for (int32_t t = t0; t < t1;) {
      const int32_t b = blocks[t / bs], s0 = t % bs, m = std::min(bs - s0, t1 - t);
      const int64_t row = static_cast<int64_t>(h) * n + (t - t0);
      const uint8_t* in = wire + row * row_bytes;
      const float* sc = type == WireType::kInt8 ? scales + row : nullptr;
      if (f16_cache) {
        DecodeRows(in, m, d, type, sc, tmp.data());  // [m][head_dim] f32
        if (part == KvPart::kK) {
          Transpose(tmp.data(), d, tmp_t.data(), m, m, d);  // [head_dim][m]
          uint16_t* kt = l.KT<uint16_t>(b, h) + s0;
          for (int32_t i = 0; i < d; ++i) {
            ConvertF32ToF16Sat(tmp_t.data() + static_cast<int64_t>(i) * m,
                               kt + static_cast<int64_t>(i) * bs, m);
          }
        } else {
          ConvertF32ToF16Sat(tmp.data(), l.V<uint16_t>(b, h, s0), static_cast<size_t>(m) * d);
        }
      } else if (part == KvPart::kK) {
        float* kt = l.KT(b, h) + s0;
        if (type == WireType::kF32) {
          Transpose(reinterpret_cast<const float*>(in), d, kt, bs, m, d);
        } else {
          DecodeRows(in, m, d, type, sc, tmp.data());
          Transpose(tmp.data(), d, kt, bs, m, d);
        }
      } else {
        DecodeRows(in, m, d, type, sc, l.V(b, h, s0));
      }
      t += m;
    }
  }
}

}  // namespace duet::kv::internal
