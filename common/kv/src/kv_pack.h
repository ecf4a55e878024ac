// Private to duet_kv_codec: moving one layer's K/V between the paged cache and the wire layout
// [kv_head][token][head_dim], converting f32 to the wire element type on the way.
//
// The cache keeps K transposed per block ([head_dim][block_size]) and V as [block_size][head_dim]
// (kernels::PagedKvLayout); both are gathered block by block. Wire buffers are byte buffers of
// exactly n_kv_heads * n_tokens * head_dim elements; int8 scales are f32 [kv_head][token].
#pragma once

#include <cstddef>
#include <cstdint>

#include "duet/kernels/attention.h"

namespace duet::kv::internal {

enum class WireType { kF32, kBF16, kInt8 };

inline size_t WireElemSize(WireType t) {
  return t == WireType::kF32 ? 4 : t == WireType::kBF16 ? 2 : 1;
}

// Which half of a layer.
enum class KvPart { kK, kV };

// Gathers tokens [t0, t1) of one layer (layout `l`, block table `blocks`) into `wire`.
// `scales` receives n_kv_heads * (t1 - t0) floats for kInt8 and is ignored otherwise.
void Pack(const kernels::PagedKvLayout& l, const int32_t* blocks, int32_t t0, int32_t t1,
          KvPart part, WireType type, uint8_t* wire, float* scales);

// The inverse: scatters `wire` (and `scales` for kInt8) into tokens [t0, t1) of the layer.
void Unpack(const kernels::PagedKvLayout& l, const int32_t* blocks, int32_t t0, int32_t t1,
            KvPart part, WireType type, const uint8_t* wire, const float* scales);

// Row conversions (exposed for tests and the benchmark). n elements each.
void F32ToBf16Row(const float* x, uint8_t* y, size_t n);  // round to nearest even
void Bf16ToF32Row(const uint8_t* y, float* x, size_t n);
// q = round-half-even(x / scale) clamped to [-127, 127], scale = max|x| / 127 (0 when all x are 0,
// then every q is 0). Returns scale.
float QuantizeInt8Row(const float* x, uint8_t* q, size_t n);
void DequantizeInt8Row(const uint8_t* q, float scale, float* x, size_t n);

}  // namespace duet::kv::internal
