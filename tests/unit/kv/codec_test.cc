#include "duet/kv/codec.h"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "duet/tensor/dtype.h"

namespace {

namespace fs = std::filesystem;
using duet::kv::BlockPool;
using duet::kv::Crc32c;
using duet::kv::EncodeLayer;
using duet::kv::KvExpectation;
using duet::kv::KvShape;
using duet::kv::KvStreamDecoder;
using duet::kv::MakeKvHeader;
using duet::kv::SequenceKv;
using duet::v1::KvChunk;
using duet::v1::KvDtype;
using duet::v1::KvHeader;
using Code = absl::StatusCode;

constexpr const char* kFingerprint = "0123456789abcdef0123456789abcdef";
constexpr KvShape kShape{2, 2, 8, 4};        // 2 layers, 2 kv heads, head_dim 8, block size 4
constexpr int32_t kTokens = 11;              // the last block is partial
constexpr uint32_t kSentinel = 0x7fa5a5a5u;  // a NaN pattern no decode produces

bool Contains(const absl::Status& s, const std::string& text) {
  return std::string(s.message()).find(text) != std::string::npos;
}

std::unique_ptr<BlockPool> MakePool(KvShape shape, int32_t n_blocks) {
  auto pool = BlockPool::Create(shape, n_blocks);
  REQUIRE(pool.ok());
  return std::move(*pool);
}

// A lease of n_tokens positions whose blocks are interleaved with other leases' blocks.
struct Scattered {
  SequenceKv seq;
  std::vector<SequenceKv> fillers;
};
std::unique_ptr<Scattered> ScatteredSeq(BlockPool* pool, int32_t n_tokens) {
  auto s = std::make_unique<Scattered>(Scattered{SequenceKv(pool), {}});
  const int32_t bs = pool->shape().block_size;
  for (int32_t have = 0; have < n_tokens; have += bs) {
    s->fillers.emplace_back(pool);
    REQUIRE(s->fillers.back().Reserve(1).ok());
    REQUIRE(s->seq.Reserve(have + bs).ok());
  }
  REQUIRE(s->seq.blocks().size() >= 2);
  bool one_run = true;  // really scattered: not one run of consecutive blocks
  for (size_t i = 1; i < s->seq.blocks().size(); ++i)
    one_run = one_run && s->seq.blocks()[i] == s->seq.blocks()[i - 1] + 1;
  REQUIRE_FALSE(one_run);
  return s;
}

// A deterministic value for (layer, K or V, head, token, dim), with some exact zeros and a row of
// zeros (layer 0, K, head 1, token 5) for the int8 scale-0 case.
float Value(int32_t layer, int32_t kv, int32_t h, int32_t t, int32_t d) {
  if (layer == 0 && kv == 0 && h == 1 && t == 5) return 0.0f;
  uint32_t x = static_cast<uint32_t>(((layer * 2 + kv) * 16 + h) * 4096 + t * 64 + d);
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  if (x % 17 == 0) return 0.0f;
  const float unit = static_cast<float>(x & 0xffffff) / static_cast<float>(0x1000000);  // [0,1)
  const float magnitude = std::ldexp(1.0f, static_cast<int>(x >> 24) % 9 - 4);          // 2^-4..2^4
  return (unit * 2.0f - 1.0f) * magnitude;
}

// Element reads through the layout's accessors (f32 or f16 caches alike).
float GetK(const SequenceKv& seq, int32_t layer, int32_t h, int32_t t, int32_t d) {
  const auto l = seq.pool()->Layout(layer);
  const int32_t bs = l.block_size;
  std::vector<float> k(l.head_dim);
  l.LoadK(seq.blocks()[t / bs], h, t % bs, k.data());
  return k[d];
}
float GetV(const SequenceKv& seq, int32_t layer, int32_t h, int32_t t, int32_t d) {
  const auto l = seq.pool()->Layout(layer);
  std::vector<float> v(l.head_dim);
  l.LoadV(seq.blocks()[t / l.block_size], h, t % l.block_size, v.data());
  return v[d];
}
float Get(const SequenceKv& seq, int32_t layer, int32_t kv, int32_t h, int32_t t, int32_t d) {
  return kv == 0 ? GetK(seq, layer, h, t, d) : GetV(seq, layer, h, t, d);
}

// Writes Value() (or value_fn) into positions [0, n_tokens) through the layout's own accessors.
template <typename Fn>
void FillWith(SequenceKv& seq, int32_t n_tokens, Fn value_fn) {
  const KvShape& s = seq.pool()->shape();
  std::vector<float> k(s.head_dim), v(s.head_dim);
  for (int32_t layer = 0; layer < s.n_layers; ++layer) {
    const auto l = seq.pool()->Layout(layer);
    for (int32_t t = 0; t < n_tokens; ++t) {
      const int32_t b = seq.blocks()[t / s.block_size], slot = t % s.block_size;
      for (int32_t h = 0; h < s.n_kv_heads; ++h) {
        for (int32_t d = 0; d < s.head_dim; ++d) {
          k[d] = value_fn(layer, 0, h, t, d);
          v[d] = value_fn(layer, 1, h, t, d);
        }
        l.StoreK(b, h, slot, k.data());
        l.StoreV(b, h, slot, v.data());
      }
    }
  }
  seq.set_n_tokens(n_tokens);
}
void Fill(SequenceKv& seq, int32_t n_tokens) { FillWith(seq, n_tokens, Value); }

// Every float of the lease's blocks set to the sentinel / still the sentinel.
void Poison(const SequenceKv& seq) {
  for (int32_t layer = 0; layer < seq.pool()->shape().n_layers; ++layer) {
    const auto l = seq.pool()->Layout(layer);
    for (int32_t b : seq.blocks()) {
      float* p = l.KT(b, 0);
      for (int64_t i = 0; i < l.block_stride; ++i) std::memcpy(p + i, &kSentinel, 4);
    }
  }
}
bool AllPoisoned(const SequenceKv& seq) {
  for (int32_t layer = 0; layer < seq.pool()->shape().n_layers; ++layer) {
    const auto l = seq.pool()->Layout(layer);
    for (int32_t b : seq.blocks()) {
      const float* p = l.KT(b, 0);
      for (int64_t i = 0; i < l.block_stride; ++i) {
        if (std::memcmp(p + i, &kSentinel, 4) != 0) return false;
      }
    }
  }
  return true;
}

std::vector<int32_t> TokenIds(int32_t n) {
  std::vector<int32_t> ids(n);
  for (int32_t i = 0; i < n; ++i) ids[i] = 1000 + 7 * i;
  return ids;
}

KvExpectation Expect(KvShape shape = kShape, int32_t max_tokens = 64) {
  return KvExpectation{kFingerprint, shape, max_tokens};
}

struct Stream {
  KvHeader header;
  std::vector<KvChunk> chunks;
};
Stream Encode(const SequenceKv& seq, KvDtype dtype,
              uint32_t max_chunk_bytes = duet::kv::kDefaultMaxChunkBytes) {
  Stream s;
  const std::vector<int32_t> ids = TokenIds(seq.n_tokens());
  s.header = MakeKvHeader(kFingerprint, seq.pool()->shape(), dtype, ids);
  for (int32_t layer = 0; layer < seq.pool()->shape().n_layers; ++layer) {
    REQUIRE(EncodeLayer(seq, layer, 0, seq.n_tokens(), dtype, max_chunk_bytes, &s.chunks).ok());
  }
  return s;
}

absl::Status Decode(const Stream& s, SequenceKv* dest, KvExpectation expect = Expect()) {
  KvStreamDecoder dec(std::move(expect));
  if (absl::Status st = dec.OnHeader(s.header, dest); !st.ok()) return st;
  for (const KvChunk& c : s.chunks) {
    if (absl::Status st = dec.OnChunk(c); !st.ok()) return st;
  }
  return dec.Finish();
}

// The scale the encoder must have used for row (layer, kv, h, t).
float RowScale(const SequenceKv& src, int32_t layer, int32_t kv, int32_t h, int32_t t) {
  float m = 0.0f;
  for (int32_t d = 0; d < src.pool()->shape().head_dim; ++d) {
    m = std::max(m, std::fabs(Get(src, layer, kv, h, t, d)));
  }
  return m / 127.0f;
}

// dest holds src's K/V within the dtype's error bound, element by element.
void CheckClose(const SequenceKv& src, const SequenceKv& dest, KvDtype dtype) {
  const KvShape& s = src.pool()->shape();
  REQUIRE(dest.n_tokens() == src.n_tokens());
  for (int32_t layer = 0; layer < s.n_layers; ++layer) {
    for (int32_t kv = 0; kv < 2; ++kv) {
      for (int32_t h = 0; h < s.n_kv_heads; ++h) {
        for (int32_t t = 0; t < src.n_tokens(); ++t) {
          const float scale = RowScale(src, layer, kv, h, t);
          for (int32_t d = 0; d < s.head_dim; ++d) {
            const float x = Get(src, layer, kv, h, t, d), y = Get(dest, layer, kv, h, t, d);
            INFO("layer " << layer << " kv " << kv << " head " << h << " token " << t << " dim "
                          << d << ": " << x << " -> " << y);
            if (dtype == duet::v1::KV_DTYPE_F32) {
              REQUIRE(std::memcmp(&x, &y, 4) == 0);
            } else if (dtype == duet::v1::KV_DTYPE_BF16) {
              REQUIRE(y == duet::Bf16ToF32(duet::F32ToBf16(x)));
            } else {
              REQUIRE(std::fabs(y - x) <= scale * 0.5f * (1.0f + 1e-5f));
              if (scale == 0.0f) REQUIRE(y == 0.0f);
            }
          }
        }
      }
    }
  }
}

// A bitwise CRC-32C, the definition the fast one must match.
uint32_t SlowCrc32c(const uint8_t* p, size_t n, uint32_t crc = 0) {
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int b = 0; b < 8; ++b) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}

}  // namespace

TEST_CASE("Crc32c matches the standard test vectors", "[kv][codec]") {
  REQUIRE(Crc32c("123456789", 9) == 0xE3069283u);
  const std::vector<uint8_t> zeros(32, 0), ones(32, 0xff);
  std::vector<uint8_t> ascending(32);
  for (int i = 0; i < 32; ++i) ascending[i] = static_cast<uint8_t>(i);
  REQUIRE(Crc32c(zeros.data(), 32) == 0x8A9136AAu);
  REQUIRE(Crc32c(ones.data(), 32) == 0x62A8AB43u);
  REQUIRE(Crc32c(ascending.data(), 32) == 0x46DD794Eu);
  REQUIRE(Crc32c(nullptr, 0) == 0u);
}

TEST_CASE("Crc32c agrees with a bitwise CRC at every length and chains", "[kv][codec]") {
  std::vector<uint8_t> data(3 * 8192 * 2 + 3 * 256 * 3 + 13);
  uint32_t x = 12345;
  for (auto& b : data) b = static_cast<uint8_t>((x = x * 1103515245u + 12345u) >> 24);
  for (size_t n :
       {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{767}, size_t{768}, size_t{769},
        size_t{3 * 8192 - 1}, size_t{3 * 8192}, size_t{3 * 8192 + 800}, data.size()}) {
    INFO("n = " << n);
    REQUIRE(Crc32c(data.data(), n) == SlowCrc32c(data.data(), n));
    const size_t cut = n / 3;
    REQUIRE(Crc32c(data.data() + cut, n - cut, Crc32c(data.data(), cut)) ==
            SlowCrc32c(data.data(), n));
  }
  // Unaligned start.
  REQUIRE(Crc32c(data.data() + 3, 30000) == SlowCrc32c(data.data() + 3, 30000));
}

TEST_CASE("wire bytes per token", "[kv][codec]") {
  using duet::kv::WireBytesPerToken;
  REQUIRE(WireBytesPerToken(kShape, duet::v1::KV_DTYPE_F32) == 2 * 2 * 2 * 8 * 4);
  REQUIRE(WireBytesPerToken(kShape, duet::v1::KV_DTYPE_BF16) == 2 * 2 * 2 * 8 * 2);
  REQUIRE(WireBytesPerToken(kShape, duet::v1::KV_DTYPE_UNSPECIFIED) == 2 * 2 * 2 * 8 * 2);
  REQUIRE(WireBytesPerToken(kShape, duet::v1::KV_DTYPE_INT8) == 2 * 2 * 2 * (8 + 4));
  REQUIRE(WireBytesPerToken(kShape, static_cast<KvDtype>(9)) == 0);
  const KvShape gpt2{12, 12, 64, 16};
  REQUIRE(WireBytesPerToken(gpt2, duet::v1::KV_DTYPE_BF16) == 36864);
}

TEST_CASE("header describes the stream", "[kv][codec]") {
  const auto ids = TokenIds(3);
  const KvHeader h = MakeKvHeader(kFingerprint, kShape, duet::v1::KV_DTYPE_INT8, ids);
  REQUIRE(h.format_version() == duet::kv::kKvFormatVersion);
  REQUIRE(h.model_fingerprint() == kFingerprint);
  REQUIRE(h.n_layers() == 2);
  REQUIRE(h.n_kv_heads() == 2);
  REQUIRE(h.head_dim() == 8);
  REQUIRE(h.dtype() == duet::v1::KV_DTYPE_INT8);
  REQUIRE(h.layout() == duet::v1::KV_LAYOUT_HEAD_TOKEN_DIM);
  REQUIRE(h.n_tokens() == 3);
  REQUIRE(std::vector<int32_t>(h.token_ids().begin(), h.token_ids().end()) == ids);
  REQUIRE(MakeKvHeader(kFingerprint, kShape, duet::v1::KV_DTYPE_UNSPECIFIED, ids).dtype() ==
          duet::v1::KV_DTYPE_BF16);
}

TEST_CASE("round trip into a pool with another block size", "[kv][codec]") {
  const KvDtype dtype =
      GENERATE(duet::v1::KV_DTYPE_F32, duet::v1::KV_DTYPE_BF16, duet::v1::KV_DTYPE_INT8);
  const int32_t dest_block_size = GENERATE(2, 3, 4);
  INFO("dtype " << duet::v1::KvDtype_Name(dtype) << ", destination block size " << dest_block_size);
  auto src_pool = MakePool(kShape, 12);
  auto src = ScatteredSeq(src_pool.get(), kTokens);
  Fill(src->seq, kTokens);

  KvShape dest_shape = kShape;
  dest_shape.block_size = dest_block_size;
  auto dest_pool = MakePool(dest_shape, 20);
  auto dest = ScatteredSeq(dest_pool.get(), kTokens);
  Poison(dest->seq);

  const Stream s = Encode(src->seq, dtype);
  REQUIRE(s.chunks.size() == 2);  // one per layer at the default size
  KvStreamDecoder dec(Expect());
  REQUIRE(dec.OnHeader(s.header, &dest->seq).ok());
  for (const KvChunk& c : s.chunks) REQUIRE(dec.OnChunk(c).ok());
  REQUIRE(dest->seq.n_tokens() == 0);  // set by Finish
  REQUIRE(dec.Finish().ok());
  REQUIRE(dec.bytes_received() == duet::kv::WireBytesPerToken(kShape, dtype) * kTokens);
  CheckClose(src->seq, dest->seq, dtype);
}

TEST_CASE("chunk payload is [kv_head][token][head_dim] of the dtype", "[kv][codec]") {
  auto pool = MakePool(kShape, 12);
  auto src = ScatteredSeq(pool.get(), kTokens);
  Fill(src->seq, kTokens);
  const int32_t layer = 1, t0 = 3, t1 = 10;
  for (KvDtype dtype : {duet::v1::KV_DTYPE_F32, duet::v1::KV_DTYPE_BF16, duet::v1::KV_DTYPE_INT8}) {
    INFO(duet::v1::KvDtype_Name(dtype));
    std::vector<KvChunk> chunks;
    REQUIRE(EncodeLayer(src->seq, layer, t0, t1, dtype, 1 << 20, &chunks).ok());
    REQUIRE(chunks.size() == 1);
    const KvChunk& c = chunks[0];
    REQUIRE(c.layer() == layer);
    REQUIRE(c.token_begin() == t0);
    REQUIRE(c.token_end() == t1);
    uint32_t crc = Crc32c(c.k().data(), c.k().size());
    crc = Crc32c(c.v().data(), c.v().size(), crc);
    crc = Crc32c(c.k_scales().data(), c.k_scales().size(), crc);
    crc = Crc32c(c.v_scales().data(), c.v_scales().size(), crc);
    REQUIRE(c.crc32c() == crc);
    for (int32_t kv = 0; kv < 2; ++kv) {
      const std::string& bytes = kv == 0 ? c.k() : c.v();
      const std::string& scales = kv == 0 ? c.k_scales() : c.v_scales();
      for (int32_t h = 0; h < kShape.n_kv_heads; ++h) {
        for (int32_t t = t0; t < t1; ++t) {
          const size_t row = static_cast<size_t>(h) * (t1 - t0) + (t - t0);
          float scale = 0.0f;
          if (dtype == duet::v1::KV_DTYPE_INT8) {
            REQUIRE(scales.size() == kShape.n_kv_heads * (t1 - t0) * 4u);
            std::memcpy(&scale, scales.data() + row * 4, 4);
            REQUIRE(scale == RowScale(src->seq, layer, kv, h, t));
          } else {
            REQUIRE(scales.empty());
          }
          for (int32_t d = 0; d < kShape.head_dim; ++d) {
            const float x = Get(src->seq, layer, kv, h, t, d);
            const size_t i = row * kShape.head_dim + d;
            if (dtype == duet::v1::KV_DTYPE_F32) {
              float y;
              std::memcpy(&y, bytes.data() + 4 * i, 4);
              REQUIRE(y == x);
            } else if (dtype == duet::v1::KV_DTYPE_BF16) {
              uint16_t y;
              std::memcpy(&y, bytes.data() + 2 * i, 2);
              REQUIRE(y == duet::F32ToBf16(x));
            } else {
              const int q = static_cast<int8_t>(bytes[i]);
              const float want = scale == 0.0f ? 0.0f : std::nearbyint(x / scale);
              REQUIRE(q == static_cast<int>(want));
            }
          }
        }
      }
    }
  }
}

TEST_CASE("vector paths: head_dim 64, block size 16, odd ranges and special values",
          "[kv][codec]") {
  const KvShape shape{1, 3, 64, 16};
  const int32_t n_tokens = 45;
  // Specials on some rows: NaN, infinities, -0, denormals and bf16 rounding ties.
  auto value = [](int32_t layer, int32_t kv, int32_t h, int32_t t, int32_t d) {
    if (t == 7 && h == 2) {
      const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                                std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity(),
                                -0.0f,
                                std::numeric_limits<float>::denorm_min(),
                                1.0f + 1.0f / 256.0f,  // tie, rounds down to even
                                1.0f + 3.0f / 256.0f,  // tie, rounds up to even
                                -(1.0f + 3.0f / 256.0f)};
      return specials[d % 8];
    }
    return Value(layer, kv, h, t, d);
  };
  auto pool = MakePool(shape, 10);
  auto src = ScatteredSeq(pool.get(), n_tokens);
  FillWith(src->seq, n_tokens, value);
  KvShape dest_shape = shape;
  dest_shape.block_size = 8;
  auto dest_pool = MakePool(dest_shape, 20);

  for (KvDtype dtype : {duet::v1::KV_DTYPE_F32, duet::v1::KV_DTYPE_BF16}) {
    INFO(duet::v1::KvDtype_Name(dtype));
    // 13 tokens per chunk (not a block multiple when the limit is below one block)
    const uint32_t per_token = 2 * 3 * 64 * (dtype == duet::v1::KV_DTYPE_F32 ? 4 : 2);
    for (uint32_t limit : {per_token * 13, per_token * 40}) {
      auto dest = ScatteredSeq(dest_pool.get(), n_tokens);
      const Stream s = Encode(src->seq, dtype, limit);
      REQUIRE(Decode(s, &dest->seq, Expect(shape)).ok());
      for (int32_t kv = 0; kv < 2; ++kv) {
        for (int32_t h = 0; h < 3; ++h) {
          for (int32_t t = 0; t < n_tokens; ++t) {
            for (int32_t d = 0; d < 64; ++d) {
              const float x = Get(src->seq, 0, kv, h, t, d);
              const float y = Get(dest->seq, 0, kv, h, t, d);
              const float want =
                  dtype == duet::v1::KV_DTYPE_F32 ? x : duet::Bf16ToF32(duet::F32ToBf16(x));
              INFO("kv " << kv << " head " << h << " token " << t << " dim " << d);
              REQUIRE(std::memcmp(&want, &y, 4) == 0);
            }
          }
        }
      }
    }
  }
  // int8 on finite values only.
  FillWith(src->seq, n_tokens, Value);
  auto dest = ScatteredSeq(dest_pool.get(), n_tokens);
  REQUIRE(
      Decode(Encode(src->seq, duet::v1::KV_DTYPE_INT8, 2 * 3 * 64 * 13), &dest->seq, Expect(shape))
          .ok());
  CheckClose(src->seq, dest->seq, duet::v1::KV_DTYPE_INT8);
}

const char* CacheName(duet::kernels::KvDtype t) {
  return t == duet::kernels::KvDtype::kF32 ? "f32" : t == duet::kernels::KvDtype::kF16 ? "f16"
                                                                                       : "int8";
}

// Sends a 45-token lease (Fill's values, blocks of 16 scattered) from a pool of `cache` or f32
// elements to a pool of `cache` or f32 elements with blocks of 8 (not f32 to f32: the tests
// above), through every wire type, and calls check(src, dest, wire, src_is_cache, dest_is_cache).
template <typename Check>
void ForEachCrossing(duet::kernels::KvDtype cache, Check check) {
  const KvShape f32_shape{2, 3, 64, 16};
  KvShape cache_shape = f32_shape;
  cache_shape.dtype = cache;
  const int32_t n_tokens = 45;
  for (const bool src_c : {true, false}) {
    for (const bool dest_c : {true, false}) {
      if (!src_c && !dest_c) continue;
      auto src_pool = MakePool(src_c ? cache_shape : f32_shape, 10);
      auto src = ScatteredSeq(src_pool.get(), n_tokens);
      Fill(src->seq, n_tokens);
      KvShape dest_shape = dest_c ? cache_shape : f32_shape;
      dest_shape.block_size = 8;
      auto dest_pool = MakePool(dest_shape, 20);
      for (KvDtype dtype :
           {duet::v1::KV_DTYPE_F32, duet::v1::KV_DTYPE_BF16, duet::v1::KV_DTYPE_INT8}) {
        INFO("source " << (src_c ? CacheName(cache) : "f32") << ", destination "
                       << (dest_c ? CacheName(cache) : "f32") << ", wire "
                       << duet::v1::KvDtype_Name(dtype));
        auto dest = ScatteredSeq(dest_pool.get(), n_tokens);
        REQUIRE(Decode(Encode(src->seq, dtype, 2 * 3 * 64 * 4 * 13), &dest->seq, Expect(f32_shape))
                    .ok());
        check(src->seq, dest->seq, dtype, src_c, dest_c);
      }
    }
  }
}

// An int8 cache (--kv-cache-dtype int8) on either end. Its rows are (scale, int8) pairs like the
// int8 wire's, so int8 -> int8 is exact through an f32 or int8 wire, as is int8 -> f32 through
// an f32 wire; an int8 destination quantizes what arrives, within half a step of its row.
TEST_CASE("int8 caches encode what they hold and decode into their own element type",
          "[kv][codec]") {
  auto bf16 = [](float x) { return duet::Bf16ToF32(duet::F32ToBf16(x)); };
  const int32_t n_tokens = 45;
  ForEachCrossing(duet::kernels::KvDtype::kI8, [&](const SequenceKv& src, const SequenceKv& dest,
                                                  KvDtype dtype, bool src_i8, bool dest_i8) {
    int64_t bad = 0;
    for (int32_t layer = 0; layer < 2; ++layer)
      for (int32_t kv = 0; kv < 2; ++kv)
        for (int32_t h = 0; h < 3; ++h)
          for (int32_t t = 0; t < n_tokens; ++t) {
            const float step = RowScale(src, layer, kv, h, t);  // max |row| / 127
            for (int32_t d = 0; d < 64; ++d) {
              const float x = Get(src, layer, kv, h, t, d);  // what the source holds
              const float want = Value(layer, kv, h, t, d);
              if (src_i8) {
                bad += !(std::fabs(x - want) <= step * 0.5f * 1.0001f);
              } else {
                bad += x != want;
              }
              const float y = Get(dest, layer, kv, h, t, d);
              bool ok;
              if (dtype == duet::v1::KV_DTYPE_BF16) {
                const float tol = std::fabs(x) * std::ldexp(1.0f, -8) +
                                  (dest_i8 ? step * 0.5f * 1.01f : 0.0f);
                ok = dest_i8 ? std::fabs(y - x) <= tol : y == bf16(x);
              } else if (src_i8) {
                ok = y == x;  // (scale, int8) rows arrive as they left
              } else if (dtype == duet::v1::KV_DTYPE_F32) {
                ok = std::fabs(y - x) <= step * 0.5f * 1.0001f;  // quantized once, here
              } else {
                ok = std::fabs(y - x) <= step * 0.5f * 1.0001f;  // on the wire; int8 keeps it
              }
              if (!ok && bad < 5) {
                UNSCOPED_INFO("layer " << layer << " kv " << kv << " head " << h
                                       << " token " << t << " dim " << d << ": " << x
                                       << " -> " << y);
              }
              bad += !ok;
            }
          }
    CHECK(bad == 0);
  });
}

// An f16 cache (--kv-cache-dtype f16) on either end: the wire carries what the source cache
// holds, and the destination cache rounds it to its own element type.
TEST_CASE("f16 caches encode what they hold and decode into their own element type",
          "[kv][codec]") {
  auto f16 = [](float x) { return duet::F16ToF32(duet::F32ToF16Sat(x)); };
  auto bf16 = [](float x) { return duet::Bf16ToF32(duet::F32ToBf16(x)); };
  const int32_t n_tokens = 45;
  ForEachCrossing(duet::kernels::KvDtype::kF16, [&](const SequenceKv& src, const SequenceKv& dest,
                                                  KvDtype dtype, bool src_f16, bool dest_f16) {
    for (int32_t layer = 0; layer < 2; ++layer)
      for (int32_t kv = 0; kv < 2; ++kv)
        for (int32_t h = 0; h < 3; ++h)
          for (int32_t t = 0; t < n_tokens; ++t) {
            const float scale = RowScale(src, layer, kv, h, t);
            for (int32_t d = 0; d < 64; ++d) {
              const float x = Get(src, layer, kv, h, t, d);  // what the source holds
              REQUIRE(x == (src_f16 ? f16(Value(layer, kv, h, t, d)) : Value(layer, kv, h, t, d)));
              const float y = Get(dest, layer, kv, h, t, d);
              INFO("layer " << layer << " kv " << kv << " head " << h << " token " << t
                            << " dim " << d << ": " << x << " -> " << y);
              if (dtype == duet::v1::KV_DTYPE_F32) {
                REQUIRE(y == (dest_f16 ? f16(x) : x));
              } else if (dtype == duet::v1::KV_DTYPE_BF16) {
                REQUIRE(y == (dest_f16 ? f16(bf16(x)) : bf16(x)));
              } else {
                // int8, then (f16 destination) one more rounding of at most 2^-11 relative.
                const float tol = scale * 0.5f * (1.0f + 1e-5f) +
                                  (dest_f16 ? std::fabs(x) * std::ldexp(1.0f, -10) : 0.0f);
                REQUIRE(std::fabs(y - x) <= tol);
              }
            }
          }
  });
}

TEST_CASE("layers are split into chunks under max_chunk_bytes", "[kv][codec]") {
  const KvDtype dtype =
      GENERATE(duet::v1::KV_DTYPE_F32, duet::v1::KV_DTYPE_BF16, duet::v1::KV_DTYPE_INT8);
  INFO(duet::v1::KvDtype_Name(dtype));
  auto pool = MakePool(kShape, 12);
  auto src = ScatteredSeq(pool.get(), kTokens);
  Fill(src->seq, kTokens);
  // k + v bytes of one token of one layer.
  const uint32_t elem_bytes = dtype == duet::v1::KV_DTYPE_F32    ? 4
                              : dtype == duet::v1::KV_DTYPE_BF16 ? 2
                                                                 : 1;
  const uint32_t token_bytes = 2 * kShape.n_kv_heads * kShape.head_dim * elem_bytes;
  for (uint32_t limit : {3 * token_bytes + 1, 2 * token_bytes, token_bytes / 2, 1u}) {
    INFO("limit " << limit);
    const Stream s = Encode(src->seq, dtype, limit);
    std::vector<int> per_layer(kShape.n_layers, 0);
    for (const KvChunk& c : s.chunks) {
      ++per_layer[c.layer()];
      const size_t bytes = c.k().size() + c.v().size();
      if (c.token_end() - c.token_begin() > 1) REQUIRE(bytes <= limit);
      REQUIRE(bytes <= std::max(limit, token_bytes));
    }
    for (int n : per_layer) REQUIRE(n >= 3);
    auto dest_pool = MakePool(kShape, 12);
    auto dest = ScatteredSeq(dest_pool.get(), kTokens);
    REQUIRE(Decode(s, &dest->seq).ok());
    CheckClose(src->seq, dest->seq, dtype);
  }
}

TEST_CASE("default chunks of a GPT-2-sized layer stay well under gRPC's 4 MiB", "[kv][codec]") {
  const KvShape one_layer{1, 12, 64, 16};
  auto pool = MakePool(one_layer, 64);
  SequenceKv seq(pool.get());
  REQUIRE(seq.Reserve(1024).ok());
  for (KvDtype dtype : {duet::v1::KV_DTYPE_F32, duet::v1::KV_DTYPE_BF16, duet::v1::KV_DTYPE_INT8}) {
    std::vector<KvChunk> chunks;
    REQUIRE(EncodeLayer(seq, 0, 0, 1024, dtype, duet::kv::kDefaultMaxChunkBytes, &chunks).ok());
    for (const KvChunk& c : chunks) {
      REQUIRE(c.k().size() + c.v().size() <= duet::kv::kDefaultMaxChunkBytes);
      REQUIRE(c.ByteSizeLong() < (1u << 20) + 65536);
      REQUIRE((c.token_end() - c.token_begin()) % 16 == 0);  // whole blocks
    }
  }
}

TEST_CASE("EncodeLayer rejects a bad layer, range or dtype", "[kv][codec]") {
  auto pool = MakePool(kShape, 12);
  SequenceKv seq(pool.get());
  REQUIRE(seq.Reserve(kTokens).ok());  // capacity 12; n_tokens still 0 (prefill mid-forward)
  std::vector<KvChunk> out;
  REQUIRE(EncodeLayer(seq, 0, 0, 12, duet::v1::KV_DTYPE_BF16, 1 << 20, &out).ok());
  out.clear();
  auto code = [&](int32_t layer, int32_t b, int32_t e, KvDtype dt) {
    return EncodeLayer(seq, layer, b, e, dt, 1 << 20, &out).code();
  };
  REQUIRE(code(2, 0, 4, duet::v1::KV_DTYPE_F32) == Code::kInvalidArgument);
  REQUIRE(code(-1, 0, 4, duet::v1::KV_DTYPE_F32) == Code::kInvalidArgument);
  REQUIRE(code(0, 4, 4, duet::v1::KV_DTYPE_F32) == Code::kInvalidArgument);
  REQUIRE(code(0, -1, 4, duet::v1::KV_DTYPE_F32) == Code::kInvalidArgument);
  REQUIRE(code(0, 0, 13, duet::v1::KV_DTYPE_F32) == Code::kInvalidArgument);
  REQUIRE(code(0, 0, 4, static_cast<KvDtype>(9)) == Code::kInvalidArgument);
  REQUIRE(out.empty());
}

TEST_CASE("the decoder rejects bad headers and writes nothing", "[kv][codec]") {
  auto src_pool = MakePool(kShape, 12);
  auto src = ScatteredSeq(src_pool.get(), kTokens);
  Fill(src->seq, kTokens);
  const Stream good = Encode(src->seq, duet::v1::KV_DTYPE_BF16);
  auto dest_pool = MakePool(kShape, 12);
  auto dest = ScatteredSeq(dest_pool.get(), kTokens);
  Poison(dest->seq);

  auto reject = [&](KvHeader h, Code code, const std::string& text,
                    KvExpectation expect = Expect()) {
    INFO("expect " << text);
    KvStreamDecoder dec(std::move(expect));
    const absl::Status st = dec.OnHeader(h, &dest->seq);
    INFO(st.ToString());
    REQUIRE(st.code() == code);
    REQUIRE(Contains(st, text));
    // The decoder stays failed: the chunks are refused with the same error.
    for (const KvChunk& c : good.chunks) REQUIRE(dec.OnChunk(c) == st);
    REQUIRE(dec.Finish() == st);
    REQUIRE(AllPoisoned(dest->seq));
    REQUIRE(dest->seq.n_tokens() == 0);
  };
  KvHeader h = good.header;
  h.set_format_version(2);
  reject(h, Code::kDataLoss, "version 2");

  h = good.header;
  h.set_model_fingerprint("fedcba9876543210fedcba9876543210");
  reject(h, Code::kFailedPrecondition,
         "\"fedcba9876543210fedcba9876543210\" != expected \"0123456789abcdef");

  h = good.header;
  h.set_n_layers(3);
  reject(h, Code::kFailedPrecondition, "n_layers=3");
  h = good.header;
  h.set_n_kv_heads(1);
  reject(h, Code::kFailedPrecondition, "n_kv_heads=1");
  h = good.header;
  h.set_head_dim(16);
  reject(h, Code::kFailedPrecondition, "head_dim=16");

  h = good.header;
  h.set_dtype(duet::v1::KV_DTYPE_UNSPECIFIED);
  reject(h, Code::kDataLoss, "dtype KV_DTYPE_UNSPECIFIED");
  h.set_dtype(static_cast<KvDtype>(7));
  reject(h, Code::kDataLoss, "dtype 7");
  h = good.header;
  h.set_layout(duet::v1::KV_LAYOUT_UNSPECIFIED);
  reject(h, Code::kDataLoss, "layout KV_LAYOUT_UNSPECIFIED");

  h = good.header;
  h.set_n_tokens(0);
  h.clear_token_ids();
  reject(h, Code::kInvalidArgument, "n_tokens 0 outside (0, 64]");
  reject(good.header, Code::kInvalidArgument, "n_tokens 11 outside (0, 10]", Expect(kShape, 10));

  h = good.header;
  h.add_token_ids(5);
  reject(h, Code::kInvalidArgument, "12 token ids for n_tokens 11");

  // The destination must fit and match.
  {
    auto small_dest = ScatteredSeq(dest_pool.get(), 8);
    KvStreamDecoder dec(Expect());
    const absl::Status st = dec.OnHeader(good.header, &small_dest->seq);
    REQUIRE(st.code() == Code::kInvalidArgument);
    REQUIRE(Contains(st, "holds 8 positions, stream has 11"));
  }
  {
    KvShape other = kShape;
    other.head_dim = 4;
    auto other_pool = MakePool(other, 12);
    SequenceKv other_dest(other_pool.get());
    REQUIRE(other_dest.Reserve(kTokens).ok());
    KvStreamDecoder dec(Expect());
    REQUIRE(dec.OnHeader(good.header, &other_dest).code() == Code::kInvalidArgument);
    KvStreamDecoder dec2(Expect());
    REQUIRE(dec2.OnHeader(good.header, nullptr).code() == Code::kInvalidArgument);
  }
  REQUIRE(AllPoisoned(dest->seq));

  // A good header still decodes into the same destination.
  REQUIRE(Decode(good, &dest->seq).ok());
  CheckClose(src->seq, dest->seq, duet::v1::KV_DTYPE_BF16);
}

TEST_CASE("the decoder rejects bad chunk sequences", "[kv][codec]") {
  auto src_pool = MakePool(kShape, 12);
  auto src = ScatteredSeq(src_pool.get(), kTokens);
  Fill(src->seq, kTokens);
  // Chunks of 4 tokens: per layer [0,4) [4,8) [8,11).
  const Stream good = Encode(src->seq, duet::v1::KV_DTYPE_F32, 4 * 2 * 2 * 8 * 4);
  REQUIRE(good.chunks.size() == 6);
  auto dest_pool = MakePool(kShape, 12);
  auto dest = ScatteredSeq(dest_pool.get(), kTokens);

  // Feeds header and chunks; returns the first error (or Finish's).
  auto run = [&](const std::vector<KvChunk>& chunks, bool header = true) {
    KvStreamDecoder dec(Expect());
    if (header) REQUIRE(dec.OnHeader(good.header, &dest->seq).ok());
    for (const KvChunk& c : chunks) {
      if (absl::Status st = dec.OnChunk(c); !st.ok()) {
        REQUIRE(dec.Finish() == st);  // stays failed
        return st;
      }
    }
    return dec.Finish();
  };
  auto expect_loss = [&](const std::vector<KvChunk>& chunks, const std::string& text,
                         bool header = true) {
    const absl::Status st = run(chunks, header);
    INFO(st.ToString());
    REQUIRE(st.code() == Code::kDataLoss);
    REQUIRE(Contains(st, text));
  };
  const auto& c = good.chunks;

  REQUIRE(run(c).ok());
  expect_loss(c, "layer 0 arrived before the header", false);
  expect_loss({c[3], c[4], c[5], c[0], c[1], c[2]}, "chunk for layer 1, expected layer 0");
  expect_loss({c[0], c[1], c[2]}, "ended at layer 1 token 0 of 2 layers");
  expect_loss({c[0], c[1]}, "ended at layer 0 token 8");
  expect_loss({c[0], c[2]},
              "gap in K/V layer 0: chunk tokens [8,11), expected one starting at "
              "token 4");
  expect_loss({c[0], c[1], c[1]}, "overlap in K/V layer 0: chunk tokens [4,8)");
  expect_loss({c[0], c[1], c[2], c[3], c[4], c[5], c[5]}, "after the last layer");

  KvChunk bad = c[0];
  bad.set_token_end(40);
  expect_loss({bad}, "tokens [0,40), outside [0,11)");

  // Size or checksum problems are found before anything is written.
  Poison(dest->seq);
  bad = c[0];
  bad.mutable_k()->pop_back();
  expect_loss({bad}, "k has 255 bytes, expected 256");
  bad = c[0];
  bad.mutable_v()->append("xxxx");
  expect_loss({bad}, "v has 260 bytes, expected 256");
  bad = c[0];
  bad.set_k_scales("abcd");
  expect_loss({bad}, "k_scales has 4 bytes, expected 0");
  bad = c[0];
  (*bad.mutable_k())[17] ^= 0x10;
  {
    const absl::Status st = run({bad});
    REQUIRE(st.code() == Code::kDataLoss);
    REQUIRE(Contains(st, "crc32c 0x"));
    REQUIRE(Contains(st, "for layer 0 tokens [0,4)"));
  }
  REQUIRE(AllPoisoned(dest->seq));
  bad = c[3];
  bad.set_crc32c(0x1234);
  expect_loss({c[0], c[1], c[2], bad}, "crc32c 0x00001234 != computed 0x");
  // Only the three good chunks of layer 0 were written; layer 1 is untouched.
  REQUIRE(!AllPoisoned(dest->seq));
  REQUIRE(GetV(dest->seq, 0, 1, 10, 7) == Get(src->seq, 0, 1, 1, 10, 7));
  uint32_t bits;
  const float k1 = GetK(dest->seq, 1, 0, 0, 0);
  std::memcpy(&bits, &k1, 4);
  REQUIRE(bits == kSentinel);

  // int8 scales are checked too.
  const Stream int8 = Encode(src->seq, duet::v1::KV_DTYPE_INT8);
  KvStreamDecoder dec(Expect());
  KvHeader h = int8.header;
  REQUIRE(dec.OnHeader(h, &dest->seq).ok());
  bad = int8.chunks[0];
  bad.mutable_v_scales()->resize(8);
  const absl::Status st = dec.OnChunk(bad);
  REQUIRE(st.code() == Code::kDataLoss);
  REQUIRE(Contains(st, "v_scales has 8 bytes, expected 88"));

  KvStreamDecoder twice(Expect());
  REQUIRE(twice.OnHeader(good.header, &dest->seq).ok());
  REQUIRE(twice.OnHeader(good.header, &dest->seq).code() == Code::kDataLoss);
  KvStreamDecoder no_header(Expect());
  REQUIRE(no_header.Finish().code() == Code::kDataLoss);
}

namespace {
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("duet_codec_test_" + std::to_string(::getpid()));
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};
}  // namespace

TEST_CASE("K/V files round-trip and reject damage", "[kv][codec]") {
  TempDir dir;
  auto src_pool = MakePool(kShape, 12);
  auto src = ScatteredSeq(src_pool.get(), kTokens);
  Fill(src->seq, kTokens);
  const std::vector<int32_t> ids = TokenIds(kTokens);
  const fs::path file = dir.path / "session.kv";

  for (KvDtype dtype : {duet::v1::KV_DTYPE_F32, duet::v1::KV_DTYPE_INT8}) {
    REQUIRE(duet::kv::WriteKvFile(file, kFingerprint, src->seq, ids, dtype).ok());
    REQUIRE(!fs::exists(dir.path / "session.kv.tmp"));
    KvShape dest_shape = kShape;
    dest_shape.block_size = 2;
    auto dest_pool = MakePool(dest_shape, 20);
    SequenceKv dest(dest_pool.get());
    std::vector<int32_t> got_ids;
    REQUIRE(duet::kv::ReadKvFile(file, Expect(), &dest, &got_ids).ok());
    REQUIRE(got_ids == ids);
    REQUIRE(dest.blocks().size() == 6);
    CheckClose(src->seq, dest, dtype);
  }

  // Damage.
  REQUIRE(duet::kv::WriteKvFile(file, kFingerprint, src->seq, ids, duet::v1::KV_DTYPE_BF16).ok());
  std::string bytes;
  {
    std::ifstream in(file, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  REQUIRE(bytes.rfind("DUETKV1\n", 0) == 0);
  auto dest_pool = MakePool(kShape, 12);
  auto read_bytes = [&](const std::string& content, KvExpectation expect = Expect()) {
    const fs::path p = dir.path / "damaged.kv";
    {
      std::ofstream out(p, std::ios::binary | std::ios::trunc);
      out.write(content.data(), static_cast<std::streamsize>(content.size()));
    }
    SequenceKv dest(dest_pool.get());
    std::vector<int32_t> got;
    const absl::Status st = duet::kv::ReadKvFile(p, expect, &dest, &got);
    // A failed read leaves the lease empty and the pool as it was.
    if (!st.ok()) {
      REQUIRE(dest.blocks().empty());
      REQUIRE(got.empty());
      REQUIRE(dest_pool->n_free() == dest_pool->n_blocks());
    }
    return st;
  };
  REQUIRE(read_bytes(bytes).ok());
  // Truncated anywhere: in the magic, the header, a chunk, or at a chunk boundary.
  for (size_t cut :
       {size_t{0}, size_t{5}, size_t{9}, size_t{40}, bytes.size() / 2, bytes.size() - 1}) {
    INFO("cut at " << cut << " of " << bytes.size());
    const absl::Status st = read_bytes(bytes.substr(0, cut));
    INFO(st.ToString());
    REQUIRE(st.code() == Code::kDataLoss);
  }
  {
    // Drop the last chunk exactly: only Finish can tell.
    const Stream s = Encode(src->seq, duet::v1::KV_DTYPE_BF16);
    const size_t last_size = s.chunks.back().ByteSizeLong();
    const size_t cut = bytes.size() - last_size - (last_size < 128 ? 1 : 2);
    const absl::Status st = read_bytes(bytes.substr(0, cut));
    REQUIRE(st.code() == Code::kDataLoss);
    REQUIRE(Contains(st, "ended at layer 1"));
  }
  REQUIRE(read_bytes(bytes + "x").code() == Code::kDataLoss);
  std::string flipped = bytes;
  flipped[flipped.size() - 20] ^= 0x01;
  REQUIRE(read_bytes(flipped).code() == Code::kDataLoss);
  std::string bad_magic = bytes;
  bad_magic[3] = 'X';
  REQUIRE(Contains(read_bytes(bad_magic), "not a duet K/V file"));
  KvExpectation other = Expect();
  other.model_fingerprint = "ffffffffffffffffffffffffffffffff";
  REQUIRE(read_bytes(bytes, other).code() == Code::kFailedPrecondition);

  SequenceKv missing(dest_pool.get());
  REQUIRE(duet::kv::ReadKvFile(dir.path / "nope.kv", Expect(), &missing, nullptr).code() ==
          Code::kNotFound);
  SequenceKv busy(dest_pool.get());
  REQUIRE(busy.Reserve(1).ok());
  REQUIRE(duet::kv::ReadKvFile(file, Expect(), &busy, nullptr).code() == Code::kInvalidArgument);

  SequenceKv empty(src_pool.get());
  REQUIRE(
      duet::kv::WriteKvFile(dir.path / "empty.kv", kFingerprint, empty, {}, duet::v1::KV_DTYPE_F32)
          .code() == Code::kInvalidArgument);
  REQUIRE(duet::kv::WriteKvFile(dir.path / "short.kv", kFingerprint, src->seq, TokenIds(3),
                                duet::v1::KV_DTYPE_F32)
              .code() == Code::kInvalidArgument);
}
