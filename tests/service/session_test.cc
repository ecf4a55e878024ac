// SessionManager (decode_service): state changes under concurrent Close, counts for metrics.
#include <catch2/catch.hpp>

#include "duet/decode/session.h"

namespace duet::decode {
namespace {

std::unique_ptr<kv::BlockPool> SmallPool(int32_t blocks) {
  kv::KvShape shape{/*n_layers=*/1, /*n_kv_heads=*/1, /*head_dim=*/4, /*block_size=*/4};
  return std::move(*kv::BlockPool::Create(shape, blocks));
}

TEST_CASE("a session closed while prefilling stays closed when its turn goes on", "[session]") {
  auto pool = SmallPool(8);
  SessionManager sm(pool.get(), std::chrono::seconds(60));
  auto s = sm.Create(/*persistent=*/true);
  REQUIRE(s->kv.Reserve(8).ok());
  REQUIRE(sm.Close(s->id).ok());  // the client closes it during the prefill
  sm.MarkDecoding(s);             // the request moves on to decoding
  auto info = sm.Get(s->id);      // still busy: reported as closed, not decoding
  REQUIRE(info.ok());
  CHECK(info->state == SessionState::kClosed);
  sm.Release(s);
  CHECK(sm.Get(s->id).status().code() == absl::StatusCode::kNotFound);
  CHECK(pool->n_free() == 8);  // its blocks came back
}

TEST_CASE("sessions are counted by state, one-shot requests included", "[session]") {
  auto pool = SmallPool(8);
  SessionManager sm(pool.get(), std::chrono::seconds(60));
  auto a = sm.Create(true);   // prefilling
  auto b = sm.Create(false);  // a one-shot request, decoding
  sm.MarkDecoding(b);
  auto c = sm.Create(true);
  REQUIRE(c->kv.Reserve(4).ok());
  c->kv.set_n_tokens(3);
  sm.MarkDecoding(c);
  sm.Release(c);  // idle, K/V kept
  auto n = sm.CountByState();
  CHECK(n.prefilling == 1);
  CHECK(n.decoding == 1);
  CHECK(n.idle == 1);
  sm.Release(b);
  sm.Release(a);
  n = sm.CountByState();
  CHECK(n.prefilling == 0);
  CHECK(n.decoding == 0);
  CHECK(n.idle == 2);  // a became an idle session without K/V (evicted state counts as idle)
  CHECK(sm.EvictFor(8));
  CHECK(sm.evictions() == 1);  // c's K/V went; a had none to give
  CHECK(pool->n_free() == 8);
}

}  // namespace
}  // namespace duet::decode
