// DecodeService over gRPC (callback API): validation, sessions, the prefill hand-off, and the
// streaming of tokens from the engine thread to clients. Reactors never block: admission
// (tokenize, reserve K/V, remote prefill) runs on a worker thread per request, model work on
// the engine thread.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>

#include "duet/decode/engine.h"
#include "duet/decode/prefill_client.h"
#include "duet/decode/session.h"
#include "duet/kv/block_pool.h"
#include "duet/metrics/server_metrics.h"
#include "duet/model/model.h"
#include "duet/tokenizer/tokenizer.h"
#include "duet/v1/decode.grpc.pb.h"

namespace duet::decode {

struct DecodeOptions {
  std::string prefill_target;             // see PrefillClient
  int32_t max_batch = 32;                 // sequences per engine step
  int32_t n_threads = 0;                  // the engine's OpenMP threads (0: all cores)
  int32_t kv_blocks = 1024;               // K/V pool size in blocks
  int32_t block_size = 16;
  int32_t local_prefill_max_tokens = 32;  // continuation deltas up to this run on decode
  std::chrono::seconds session_ttl{600};
  std::chrono::milliseconds prefill_timeout{30000};
  v1::KvDtype kv_dtype = v1::KV_DTYPE_BF16;  // wire dtype asked of prefill
  int32_t max_pending = 256;              // requests being admitted or queued
  metrics::DecodeMetrics* metrics = nullptr;  // optional; outlives the service
};

class DecodeServiceImpl final : public v1::DecodeService::CallbackService {
 public:
  // The model and tokenizer outlive the service.
  DecodeServiceImpl(model::Model* model, const tokenizer::Tokenizer* tok, DecodeOptions opts);
  ~DecodeServiceImpl() override;

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const v1::GenerateRequest* req) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* ctx,
                                       const v1::GetSessionRequest* req,
                                       v1::SessionInfo* resp) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* ctx,
                                         const v1::CloseSessionRequest* req,
                                         v1::CloseSessionResponse* resp) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* ctx,
                                         const v1::ListSessionsRequest* req,
                                         v1::ListSessionsResponse* resp) override;

  // New Generate calls get UNAVAILABLE from now on (for SIGTERM drain).
  void StartDraining() { draining_.store(true); }
  // Requests being admitted or generating.
  int32_t in_flight() const { return in_flight_.load(); }
  // Generate streams not yet done at the gRPC level (their last message may still be on its
  // way to a slow client). The drain waits for these.
  int32_t open_streams() const { return open_streams_.load(); }
  SessionManager& sessions() { return sessions_; }
  kv::BlockPool& pool() { return *pool_; }
  // Stops the engine (running streams end UNAVAILABLE) and waits for admission threads.
  void Shutdown();
  // Sets the state gauges of opts.metrics (sessions by state, running, waiting, K/V usage) and
  // brings the eviction counter up to date. Called at scrape time; any thread.
  void RefreshMetrics();

 private:
  class GenerateReactor;
  struct Stream;
  void Admit(std::shared_ptr<Stream> stream, v1::GenerateRequest req,
             std::chrono::system_clock::time_point deadline);

  model::Model* model_;
  const tokenizer::Tokenizer* tok_;
  DecodeOptions opts_;
  std::unique_ptr<kv::BlockPool> pool_;
  SessionManager sessions_;
  PrefillClient prefill_;
  DecodeEngine engine_;
  std::atomic<bool> draining_{false};
  std::atomic<int32_t> in_flight_{0};
  std::atomic<int32_t> open_streams_{0};
  std::atomic<int32_t> admitting_{0};
  std::atomic<bool> stop_reaper_{false};
  std::thread reaper_;
  std::mutex metrics_mu_;
  int64_t evictions_reported_ = 0;  // guarded by metrics_mu_
};

}  // namespace duet::decode
