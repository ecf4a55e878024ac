#include "duet/kv/block_pool.h"

#include <catch2/catch.hpp>
#include <set>

using duet::kv::BlockPool;
using duet::kv::KvShape;
using duet::kv::SequenceKv;

namespace {
std::unique_ptr<BlockPool> SmallPool(int32_t n_blocks) {
  KvShape shape{2, 1, 4, 4};  // 2 layers, 1 kv head, head_dim 4, block size 4
  auto pool = BlockPool::Create(shape, n_blocks);
  REQUIRE(pool.ok());
  return std::move(*pool);
}
}  // namespace

TEST_CASE("allocation is all or nothing", "[kv]") {
  auto pool = SmallPool(3);
  auto a = pool->Allocate(2);
  REQUIRE(a.ok());
  REQUIRE(pool->n_free() == 1);
  auto b = pool->Allocate(2);
  REQUIRE(b.status().code() == absl::StatusCode::kResourceExhausted);
  REQUIRE(b.status().message().find("need 2 blocks, 1 free") != std::string::npos);
  REQUIRE(pool->n_free() == 1);
  pool->Free(*a);
  REQUIRE(pool->n_free() == 3);
}

TEST_CASE("blocks are distinct and ref-counted", "[kv]") {
  auto pool = SmallPool(3);
  auto a = pool->Allocate(3);
  REQUIRE(a.ok());
  REQUIRE(std::set<int32_t>(a->begin(), a->end()).size() == 3);
  pool->Ref((*a)[0]);
  pool->Free(*a);
  REQUIRE(pool->n_free() == 2);  // block 0 still referenced once
  pool->Free(std::vector<int32_t>{(*a)[0]});
  REQUIRE(pool->n_free() == 3);
  pool->Free(std::vector<int32_t>{(*a)[0]});  // double free is ignored
  REQUIRE(pool->n_free() == 3);
}

// Attention streams a sequence's blocks in order: consecutive blocks at rising addresses let the
// hardware prefetchers run on across block boundaries.
TEST_CASE("one allocation hands out rising block ids, also from freed blocks", "[kv]") {
  auto pool = SmallPool(12);
  auto a = pool->Allocate(5);
  REQUIRE(a.ok());
  CHECK(*a == std::vector<int32_t>{0, 1, 2, 3, 4});
  auto b = pool->Allocate(4);
  REQUIRE(b.ok());
  CHECK(*b == std::vector<int32_t>{5, 6, 7, 8});
  pool->Free(*a);
  auto c = pool->Allocate(3);
  REQUIRE(c.ok());
  CHECK(*c == std::vector<int32_t>{0, 1, 2});
}

TEST_CASE("a sequence lease grows by blocks, fails cleanly and frees on destruction", "[kv]") {
  auto pool = SmallPool(3);
  {
    SequenceKv seq(pool.get());
    REQUIRE(seq.Reserve(5).ok());  // 2 blocks of 4
    REQUIRE(seq.blocks().size() == 2);
    REQUIRE(seq.capacity() == 8);
    REQUIRE(seq.Reserve(8).ok());  // fits already
    REQUIRE(pool->n_free() == 1);
    auto st = seq.Reserve(13);  // needs 2 more, 1 free
    REQUIRE(st.code() == absl::StatusCode::kResourceExhausted);
    REQUIRE(seq.blocks().size() == 2);
    REQUIRE(pool->n_free() == 1);
    SequenceKv moved = std::move(seq);
    REQUIRE(moved.blocks().size() == 2);
    REQUIRE(seq.blocks().empty());
  }
  REQUIRE(pool->n_free() == 3);
}

TEST_CASE("pool creation validates its shape", "[kv]") {
  KvShape bad{0, 1, 4, 4};
  REQUIRE(BlockPool::Create(bad, 4).status().code() == absl::StatusCode::kInvalidArgument);
  KvShape good{1, 1, 4, 4};
  REQUIRE(BlockPool::Create(good, 0).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("layout addresses K and V of each layer without overlap", "[kv]") {
  auto pool = SmallPool(2);
  auto l0 = pool->Layout(0), l1 = pool->Layout(1);
  // Layer-major: a layer's blocks are contiguous, K then V in each.
  REQUIRE(l0.V(0, 0, 0) == l0.KT(0, 0) + 16);
  REQUIRE(l0.KT(1, 0) == l0.V(0, 0, 0) + 16);
  REQUIRE(l1.KT(0, 0) == l0.KT(0, 0) + pool->n_blocks() * 32);
  REQUIRE(l1.V(pool->n_blocks() - 1, 0, 3) + 4 ==
          static_cast<float*>(l0.base) + pool->n_blocks() * 2 * 32);  // the pool's end
  REQUIRE(l0.V(0, 0, 1) == l0.V(0, 0, 0) + 4);  // V: slots of head_dim floats
  float k[4] = {1, 2, 3, 4}, back[4];
  l1.StoreK(1, 0, 2, k);
  REQUIRE(l1.KT(1, 0)[2] == 1.f);  // K: transposed, element t of slot s at t * block_size + s
  REQUIRE(l1.KT(1, 0)[3 * 4 + 2] == 4.f);
  l1.LoadK(1, 0, 2, back);
  REQUIRE(back[3] == 4.f);
}

TEST_CASE("an int8 pool keeps its scales after each layer's V, inside the block", "[kv]") {
  KvShape shape{2, 3, 8, 4};  // 2 layers, 3 kv heads, head_dim 8, block size 4
  shape.dtype = duet::kernels::KvDtype::kI8;
  // Per layer and block: K and V (2 x 3 x 4 x 8 bytes) and their scales (2 x 3 x 4 floats).
  CHECK(shape.bytes_per_block() == 2 * (192 + 96));
  CHECK(shape.bytes_per_token() == 2 * (192 + 96) / 4);
  auto pool = BlockPool::Create(shape, 3);
  REQUIRE(pool.ok());
  const auto l1 = (*pool)->Layout(1);
  const auto* base = static_cast<const int8_t*>(l1.base);
  // Layer 1, block 2: after layer 0's three blocks and layer 1's first two.
  const int8_t* block = base + (3 + 2) * (192 + 96);
  CHECK(l1.KT<int8_t>(2, 0) == block);
  CHECK(reinterpret_cast<const int8_t*>(l1.KScales(2, 0)) == block + 192);
  CHECK(l1.VScales(2, 2) + 4 == reinterpret_cast<const float*>(block + 192 + 96));  // block end
  float v[8] = {0, 1, -2, 3, 4, -5, 6, 127}, back[8];
  l1.StoreV(2, 2, 3, v);
  CHECK(l1.VScales(2, 2)[3] == 1.f);
  l1.LoadV(2, 2, 3, back);
  for (int i = 0; i < 8; ++i) CHECK(back[i] == v[i]);  // integers up to 127: exact
}

TEST_CASE("a shared prefix is ref-counted and outlives its first owner", "[kv]") {
  auto pool = SmallPool(4);
  SequenceKv a(pool.get());
  REQUIRE(a.Reserve(8).ok());
  a.set_n_tokens(8);
  SequenceKv b(pool.get());
  REQUIRE(b.ShareFrom(a, 6).code() == absl::StatusCode::kInvalidArgument);  // not block-aligned
  REQUIRE(b.ShareFrom(a, 4).ok());
  REQUIRE(b.n_tokens() == 4);
  REQUIRE(b.blocks() == std::vector<int32_t>{a.blocks()[0]});
  REQUIRE(pool->n_free() == 2);
  a.Release();
  REQUIRE(pool->n_free() == 3);  // the shared block stays with b
  b.Release();
  REQUIRE(pool->n_free() == 4);
}

TEST_CASE("ShrinkToFit returns the blocks past the written positions", "[kv]") {
  auto pool = SmallPool(4);
  SequenceKv seq(pool.get());
  REQUIRE(seq.Reserve(16).ok());
  seq.set_n_tokens(5);
  seq.ShrinkToFit();
  REQUIRE(seq.blocks().size() == 2);
  REQUIRE(pool->n_free() == 2);
}
