// Sessions: conversations the decode service keeps between turns. A session owns its token ids
// and a lease on K/V blocks; the lease may be dropped under memory pressure (eviction) while the
// tokens are kept, so an evicted session is re-prefilled on its next turn, never lost.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "duet/kv/block_pool.h"

namespace duet::decode {

enum class SessionState : uint8_t { kPrefilling, kDecoding, kIdle, kEvicted, kClosed };
const char* SessionStateName(SessionState s);

struct Session {
  explicit Session(std::string id, kv::BlockPool* pool) : id(std::move(id)), kv(pool) {}
  const std::string id;
  bool persistent = false;  // kept after the turn (open_session), else dropped when done
  // Guarded by SessionManager's mutex, always.
  SessionState state = SessionState::kIdle;
  std::vector<int32_t> tokens;  // the whole conversation
  kv::SequenceKv kv;            // K/V of tokens[0, kv.n_tokens())
  std::chrono::steady_clock::time_point last_used = std::chrono::steady_clock::now();
};

struct SessionSummary {
  std::string id;
  SessionState state;
  int32_t n_tokens, n_kv_tokens, n_blocks;
  int64_t idle_ns;
};

// Thread-safe.
class SessionManager {
 public:
  SessionManager(kv::BlockPool* pool, std::chrono::seconds idle_ttl);

  // A new busy session with an unguessable id (128 random bits, hex).
  std::shared_ptr<Session> Create(bool persistent);
  // Takes an idle or evicted session for a turn (state becomes kPrefilling). NOT_FOUND for an
  // unknown or closed id, FAILED_PRECONDITION when it is busy with another turn.
  absl::StatusOr<std::shared_ptr<Session>> Acquire(const std::string& id);
  // The turn's K/V is in place and it starts decoding (kPrefilling -> kDecoding). A session closed
  // meanwhile stays closed.
  void MarkDecoding(const std::shared_ptr<Session>& s);
  // Ends a turn: persistent sessions become idle (K/V kept), others are dropped.
  void Release(const std::shared_ptr<Session>& s);
  // Frees the session's K/V and forgets it. NOT_FOUND if unknown. A busy session is marked
  // closed and dropped when its turn ends.
  absl::Status Close(const std::string& id);
  absl::StatusOr<SessionSummary> Get(const std::string& id);
  std::vector<SessionSummary> List();

  // Makes `blocks` blocks free by dropping the K/V of idle sessions, least recently used first.
  // Returns true when the pool has that many free blocks afterwards.
  bool EvictFor(int32_t blocks);
  // Closes idle sessions unused for longer than the TTL; returns how many.
  int ExpireIdle();
  // Counts for metrics and tests. Idle counts sessions whose K/V was evicted too.
  struct StateCounts {
    int32_t prefilling = 0, decoding = 0, idle = 0;
  };
  StateCounts CountByState() const;
  int64_t evictions() const;

 private:
  SessionSummary Summarize(const Session& s) const;

  kv::BlockPool* pool_;
  const std::chrono::seconds idle_ttl_;
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<Session>> sessions_;
  int64_t evictions_ = 0;
};

}  // namespace duet::decode
