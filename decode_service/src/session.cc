#include "duet/decode/session.h"

#include <algorithm>
#include <cstdio>
#include <random>

#include "absl/strings/str_cat.h"

namespace duet::decode {

const char* SessionStateName(SessionState s) {
  switch (s) {
    case SessionState::kPrefilling:
      return "prefilling";
    case SessionState::kDecoding:
      return "decoding";
    case SessionState::kIdle:
      return "idle";
    case SessionState::kEvicted:
      return "evicted";
    case SessionState::kClosed:
      return "closed";
  }
  return "?";
}

SessionManager::SessionManager(kv::BlockPool* pool, std::chrono::seconds idle_ttl)
    : pool_(pool), idle_ttl_(idle_ttl) {}

namespace {
std::string NewId() {
  static std::mutex mu;
  static std::random_device rd;
  std::lock_guard<std::mutex> lock(mu);
  char buf[33];
  uint64_t a = (uint64_t{rd()} << 32) | rd(), b = (uint64_t{rd()} << 32) | rd();
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(a),
                static_cast<unsigned long long>(b));
  return buf;
}
}  // namespace

std::shared_ptr<Session> SessionManager::Create(bool persistent) {
  auto s = std::make_shared<Session>(NewId(), pool_);
  s->persistent = persistent;
  s->state = SessionState::kPrefilling;
  std::lock_guard<std::mutex> lock(mu_);
  sessions_[s->id] = s;
  return s;
}

absl::StatusOr<std::shared_ptr<Session>> SessionManager::Acquire(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end() || !it->second->persistent ||
      it->second->state == SessionState::kClosed) {
    return absl::NotFoundError(absl::StrCat("session \"", id, "\" not found"));
  }
  auto& s = it->second;
  if (s->state != SessionState::kIdle && s->state != SessionState::kEvicted) {
    return absl::FailedPreconditionError(
        absl::StrCat("session \"", id, "\" is busy (", SessionStateName(s->state), ")"));
  }
  s->state = SessionState::kPrefilling;
  return s;
}

void SessionManager::MarkDecoding(const std::shared_ptr<Session>& s) {
  std::lock_guard<std::mutex> lock(mu_);
  if (s->state == SessionState::kPrefilling) s->state = SessionState::kDecoding;
}

SessionManager::StateCounts SessionManager::CountByState() const {
  std::lock_guard<std::mutex> lock(mu_);
  StateCounts n;
  for (const auto& [id, s] : sessions_) {
    if (s->state == SessionState::kPrefilling) ++n.prefilling;
    if (s->state == SessionState::kDecoding) ++n.decoding;
    if (s->state == SessionState::kIdle || s->state == SessionState::kEvicted) ++n.idle;
  }
  return n;
}

void SessionManager::Release(const std::shared_ptr<Session>& s) {
  std::lock_guard<std::mutex> lock(mu_);
  s->last_used = std::chrono::steady_clock::now();
  if (!s->persistent || s->state == SessionState::kClosed) {
    s->kv.Release();
    s->state = SessionState::kClosed;
    sessions_.erase(s->id);
    return;
  }
  // An idle session keeps only the blocks its K/V occupy; the next turn reserves again.
  s->kv.ShrinkToFit();
  s->state = s->kv.n_tokens() > 0 ? SessionState::kIdle : SessionState::kEvicted;
}

absl::Status SessionManager::Close(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end() || !it->second->persistent) {
    return absl::NotFoundError(absl::StrCat("session \"", id, "\" not found"));
  }
  auto s = it->second;
  const bool busy = s->state == SessionState::kPrefilling || s->state == SessionState::kDecoding;
  s->state = SessionState::kClosed;
  if (!busy) {
    s->kv.Release();
    sessions_.erase(it);
  }
  return absl::OkStatus();
}

SessionSummary SessionManager::Summarize(const Session& s) const {
  // A busy session's tokens and K/V belong to its request's threads: report only its state.
  if (s.state == SessionState::kPrefilling || s.state == SessionState::kDecoding) {
    return {s.id, s.state, 0, 0, 0, 0};
  }
  return {s.id,
          s.state,
          static_cast<int32_t>(s.tokens.size()),
          s.kv.n_tokens(),
          static_cast<int32_t>(s.kv.blocks().size()),
          std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() -
                                                               s.last_used)
              .count()};
}

absl::StatusOr<SessionSummary> SessionManager::Get(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end() || !it->second->persistent) {
    return absl::NotFoundError(absl::StrCat("session \"", id, "\" not found"));
  }
  return Summarize(*it->second);
}

std::vector<SessionSummary> SessionManager::List() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<SessionSummary> out;
  for (const auto& [id, s] : sessions_)
    if (s->persistent) out.push_back(Summarize(*s));
  return out;
}

bool SessionManager::EvictFor(int32_t blocks) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Session*> idle;
  for (auto& [id, s] : sessions_)
    if (s->state == SessionState::kIdle && !s->kv.blocks().empty()) idle.push_back(s.get());
  std::sort(idle.begin(), idle.end(),
            [](const Session* a, const Session* b) { return a->last_used < b->last_used; });
  for (Session* s : idle) {
    if (pool_->n_free() >= blocks) break;
    s->kv.Release();
    s->state = SessionState::kEvicted;
    ++evictions_;
  }
  return pool_->n_free() >= blocks;
}

int SessionManager::ExpireIdle() {
  std::lock_guard<std::mutex> lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  int n = 0;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    Session& s = *it->second;
    if ((s.state == SessionState::kIdle || s.state == SessionState::kEvicted) &&
        now - s.last_used > idle_ttl_) {
      s.kv.Release();
      s.state = SessionState::kClosed;
      it = sessions_.erase(it);
      ++n;
    } else {
      ++it;
    }
  }
  return n;
}

int64_t SessionManager::evictions() const {
  std::lock_guard<std::mutex> lock(mu_);
  return evictions_;
}

}  // namespace duet::decode
