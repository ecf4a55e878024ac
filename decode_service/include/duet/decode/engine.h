// The decode engine: one thread that owns the model's compute and runs continuous batching.
// Every iteration it forwards all running sequences in one batched step (local prefill deltas
// and single decode tokens alike), samples each sequence's next token, streams it, and retires
// finished or cancelled sequences. Sequences join and leave between steps.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "duet/decode/session.h"
#include "duet/metrics/server_metrics.h"
#include "duet/model/model.h"
#include "duet/sampling/sampler.h"
#include "duet/sampling/stop.h"
#include "duet/tokenizer/tokenizer.h"

namespace duet::decode {

// What the engine tells a request, from the engine thread.
struct TokenEvent {
  std::string text;                 // complete UTF-8 (may be empty)
  std::vector<int32_t> token_ids;   // usually one
};

struct FinishEvent {
  absl::Status status;              // OK, or why it stopped (CANCELLED, INTERNAL...)
  sampling::FinishReason reason = sampling::FinishReason::kNone;
  int32_t generated_tokens = 0;
};

// The request side of a running sequence. Callbacks run on the engine thread and must not
// block; `cancelled` may be set from any thread.
struct SequenceSink {
  std::function<void(TokenEvent)> on_token;
  std::function<void(FinishEvent)> on_finish;
  std::atomic<bool> cancelled{false};
};

// One generation handed to the engine. The session's K/V hold tokens[0, kv.n_tokens()); the
// engine forwards tokens[kv.n_tokens(), tokens.size()) first (empty when `logits` came from a
// remote prefill), then samples.
struct SequenceStart {
  std::shared_ptr<Session> session;
  std::shared_ptr<SequenceSink> sink;
  std::vector<float> logits;  // the last position's logits, when prefilled remotely
  sampling::SamplingParams sampling;
  sampling::StopParams stop;
  std::chrono::steady_clock::time_point submitted;  // set by Submit (queue time)
};

class DecodeEngine {
 public:
  // metrics may be null; else it outlives the engine (queue time, batch size). n_threads: the
  // OpenMP threads of the engine's kernels (0: the OpenMP default, all cores).
  DecodeEngine(model::Model* model, const tokenizer::Tokenizer* tok, int32_t max_batch,
               metrics::DecodeMetrics* metrics = nullptr, int32_t n_threads = 0);
  ~DecodeEngine();

  void Start();
  // Stops the loop; running sequences finish with UNAVAILABLE.
  void Stop();
  // Queues a sequence; it joins the batch at the next step. Thread-safe.
  void Submit(SequenceStart start);

  int32_t running() const { return running_.load(); }
  int32_t waiting() const;

 private:
  struct Running;
  void Loop();
  void Retire(Running& r, FinishEvent ev);

  model::Model* model_;
  const tokenizer::Tokenizer* tok_;
  const int32_t max_batch_;
  metrics::DecodeMetrics* const metrics_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<SequenceStart> inbox_;
  bool stop_ = false;
  std::atomic<int32_t> running_{0};
  std::thread thread_;
  const int32_t n_threads_;
};

}  // namespace duet::decode
