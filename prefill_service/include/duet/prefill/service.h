// The gRPC face of the prefill engine (proto/duet/v1/prefill.proto), on gRPC's callback API.
//
// Prefill: the handler validates and queues the request (PrefillEngine::Submit) and returns a
// write reactor at once; it never waits for model work. The engine thread produces the messages
// into a mutex-protected outbox shared by the reactor and the engine (a shared_ptr both hold);
// the reactor writes them one at a time (StartWrite -> OnWriteDone -> next) and finishes with the
// engine's status. OnCancel (client cancel, deadline) marks the call cancelled: the engine skips
// or aborts the job, the outbox is dropped and the reactor finishes with CANCELLED. The reactor
// deletes itself in OnDone; the engine may outlive it holding only the shared call state.
#pragma once

#include <atomic>
#include <string>

#include "duet/prefill/engine.h"
#include "duet/v1/prefill.grpc.pb.h"

namespace duet::prefill {

class PrefillServiceImpl final : public v1::PrefillService::CallbackService {
 public:
  // `engine` (and `metrics`, which may be null) must outlive the service and every call it
  // started. Calls that end with an error count in metrics' errors by code.
  PrefillServiceImpl(PrefillEngine* engine, std::string model_name,
                     metrics::PrefillMetrics* metrics = nullptr);

  grpc::ServerWriteReactor<v1::PrefillResponse>* Prefill(
      grpc::CallbackServerContext* context, const v1::PrefillRequest* request) override;
  grpc::ServerUnaryReactor* Info(grpc::CallbackServerContext* context,
                                 const v1::InfoRequest* request,
                                 v1::InfoResponse* response) override;

  // From now on new Prefill calls get UNAVAILABLE; calls in flight go on (SIGTERM drain).
  void StartDraining() { draining_.store(true); }
  // Prefill calls whose reactor is not done yet.
  int32_t in_flight() const { return in_flight_.load(); }

 private:
  PrefillEngine* const engine_;
  const std::string model_name_;
  metrics::PrefillMetrics* const metrics_;
  std::atomic<bool> draining_{false};
  std::atomic<int32_t> in_flight_{0};
};

}  // namespace duet::prefill
