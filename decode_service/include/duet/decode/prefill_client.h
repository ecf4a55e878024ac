// The decode service's client of PrefillService: sends a conversation's token ids, receives its
// K/V stream and writes it, validated, into a session's blocks.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "duet/kv/block_pool.h"
#include "duet/v1/prefill.grpc.pb.h"

namespace duet::decode {

struct RemotePrefillResult {
  std::vector<float> logits;  // last position
  int64_t kv_bytes = 0;       // K/V payload received
  double transfer_s = 0;      // first to last K/V message
};

// Thread-safe: one channel shared by all requests.
class PrefillClient {
 public:
  // target: "host:port", a comma-separated list of them, or any gRPC name such as
  // "dns:///prefill.default.svc:50052". Lists and names are balanced with round_robin.
  PrefillClient(const std::string& target, std::string model_fingerprint, kv::KvShape shape);

  // Prefills `tokens` and writes their K/V into dest (capacity >= tokens.size()), setting
  // dest->n_tokens. Errors carry gRPC's code (UNAVAILABLE, DEADLINE_EXCEEDED, ...) or the
  // codec's (DATA_LOSS, FAILED_PRECONDITION); then dest's contents are unspecified.
  // `cancelled` is polled between messages.
  absl::StatusOr<RemotePrefillResult> Prefill(const std::vector<int32_t>& tokens,
                                              v1::KvDtype dtype,
                                              std::chrono::system_clock::time_point deadline,
                                              kv::SequenceKv* dest,
                                              const std::atomic<bool>* cancelled);

  // Channel target after list handling (for logs).
  const std::string& target() const { return target_; }

 private:
  std::string target_;
  std::string fingerprint_;
  kv::KvShape shape_;
  std::unique_ptr<v1::PrefillService::Stub> stub_;
};

}  // namespace duet::decode
