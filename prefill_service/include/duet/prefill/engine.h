// The prefill engine: one thread that owns the model, a bounded FIFO of prefill jobs, and the
// K/V pool the jobs run in. Jobs that wait while a pass runs go together into the next pass. A job's K/V leaves layer by layer: as soon as layer l's K/V is in
// the cache, the engine encodes it (kv::EncodeLayer) and hands the chunks to the job's sink,
// so the transfer overlaps the compute of layers l+1.. .
//
// Threads: Submit, Pause, Resume, stats and the accessors may be called from any thread and never
// wait for model work. Sinks are called on the engine thread only. No gRPC in here: the gRPC
// layer (service.h) implements PrefillSink.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "duet/kv/block_pool.h"
#include "duet/kv/codec.h"
#include "duet/metrics/server_metrics.h"
#include "duet/model/model.h"
#include "duet/v1/kv.pb.h"

namespace duet::prefill {

// Where one job's messages go, in order: OnHeader, OnChunk for every layer's chunks (layers in
// order), OnResult, then OnFinish(OK). A job that fails or is cancelled gets OnFinish(error) and
// possibly no result. Called on the engine thread, except that OnFinish(CANCELLED) of a job
// whose caller left while it waited may come from a thread calling Submit. Must not block.
class PrefillSink {
 public:
  virtual ~PrefillSink() = default;
  // True once the caller is gone (cancelled, deadline passed). The engine polls it before a job
  // and after every layer, and then stops the job and frees what it holds.
  virtual bool cancelled() const = 0;
  virtual void OnHeader(v1::KvHeader header) = 0;
  virtual void OnChunk(v1::KvChunk chunk) = 0;
  virtual void OnResult(v1::KvResult result) = 0;
  // Last call for the job.
  virtual void OnFinish(const absl::Status& status) = 0;
  // Bytes handed to the sink and not yet delivered (for back-pressure). Any thread.
  virtual int64_t buffered_bytes() const = 0;
};

using Clock = std::chrono::steady_clock;

struct PrefillJob {
  std::vector<int32_t> token_ids;            // the whole prompt
  v1::KvDtype kv_dtype = v1::KV_DTYPE_BF16;  // UNSPECIFIED means bf16
  std::string model_fingerprint;             // empty: any; else must equal the model's
  uint32_t max_chunk_bytes = 0;              // 0: the engine's; capped at the engine's
  Clock::time_point arrival = Clock::now();  // for queue_ns / total_ns
  std::shared_ptr<PrefillSink> sink;
};

struct EngineOptions {
  int32_t max_queue = 16;   // jobs that may wait (the running ones not included)
  // Jobs waiting when the engine is free run together in one forward pass (their prompts as one
  // batch), up to this many jobs and max_context tokens in all.
  int32_t max_batch = 16;
  int32_t block_size = 16;  // tokens per K/V block of the engine's pool
  int32_t max_context = 0;  // longest prompt, <= the model's context; 0: the model's context
  int32_t n_threads = 0;    // kernel (OpenMP/oneDNN) threads of the engine thread; 0: default
  uint32_t max_chunk_bytes = kv::kDefaultMaxChunkBytes;  // k+v payload per chunk, upper bound
  // Back-pressure: the engine does not start a job while finished jobs' sinks still hold more
  // than this many undelivered bytes. The running job itself may buffer its whole K/V.
  int64_t max_buffered_bytes = int64_t{256} << 20;
  bool log_requests = true;  // one line per job on stderr
  // Optional (outlives the engine): queue and compute time and tokens of every completed job.
  metrics::PrefillMetrics* metrics = nullptr;
  // Tests only: called on the engine thread after layer `layer`'s chunks went to `sink`.
  std::function<void(int32_t layer, const PrefillSink& sink)> after_layer_for_test;
};

struct EngineStats {
  int64_t completed = 0;  // jobs that sent their result
  int64_t cancelled = 0;  // jobs skipped or aborted because the caller went away
  int64_t failed = 0;     // jobs that ended with another error
  int64_t passes = 0;     // forward passes run (one per batch of jobs)
  int32_t queued = 0;     // jobs waiting whose caller is still there
  bool running = false;   // a pass is on the engine thread
  int32_t running_jobs = 0;  // jobs in that pass
  int32_t pool_free_blocks = 0;
  int32_t pool_blocks = 0;
};

class PrefillEngine {
 public:
  // Takes the model, sizes a K/V pool for one prompt of max_context tokens, and starts the engine
  // thread. INVALID_ARGUMENT for a bad option (naming it and its value).
  static absl::StatusOr<std::unique_ptr<PrefillEngine>> Create(std::unique_ptr<model::Model> model,
                                                               EngineOptions options);
  // Stop(), then frees the model and the pool.
  ~PrefillEngine();
  PrefillEngine(const PrefillEngine&) = delete;
  PrefillEngine& operator=(const PrefillEngine&) = delete;

  // Validates the job and queues it; never waits for model work. On error nothing is queued and
  // the sink is not called:
  //   INVALID_ARGUMENT     empty prompt, token id outside [0, vocab), prompt longer than
  //                        max_context, unknown kv_dtype (each naming the value)
  //   FAILED_PRECONDITION  job.model_fingerprint set and not the model's (naming both)
  //   RESOURCE_EXHAUSTED   max_queue jobs already wait (jobs whose caller left do not count:
  //                        they are dropped here, their sinks finished with CANCELLED)
  //   UNAVAILABLE          the engine is stopping
  absl::Status Submit(PrefillJob job);

  // Holds queued jobs: the current job finishes, then the engine waits until Resume(). Submit
  // still queues (up to max_queue). For tests and operations.
  void Pause();
  void Resume();
  // Refuses new jobs, lets the running job finish, fails the queued ones with UNAVAILABLE and
  // joins the engine thread. Idempotent.
  void Stop();

  EngineStats stats() const;
  const model::Model& model() const { return *model_; }
  int32_t max_context() const { return options_.max_context; }
  const EngineOptions& options() const { return options_; }

 private:
  PrefillEngine(std::unique_ptr<model::Model> model, std::unique_ptr<kv::BlockPool> pool,
                EngineOptions options);
  void Loop();
  // Moves the queued jobs whose caller left to *out (to be finished outside the lock).
  void TakeCancelledLocked(std::vector<PrefillJob>* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs a batch of jobs start to end in one forward pass; every sink gets its messages and
  // OnFinish. A job that fails or whose caller leaves ends alone; the others go on.
  void RunBatch(std::vector<PrefillJob>& jobs);
  // The last call for a job: counters, metrics, OnFinish, log line.
  void Finish(PrefillJob& job, const absl::Status& status, Clock::time_point start,
              Clock::duration compute, int64_t bytes, size_t batch_size);
  // Waits while finished jobs' sinks hold more than max_buffered_bytes (or until Stop).
  void WaitForDrain();

  const std::unique_ptr<model::Model> model_;
  const std::unique_ptr<kv::BlockPool> pool_;  // one prompt's K/V; only the engine thread writes
  const EngineOptions options_;

  mutable absl::Mutex mu_;
  std::deque<PrefillJob> queue_ ABSL_GUARDED_BY(mu_);
  bool paused_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool running_ ABSL_GUARDED_BY(mu_) = false;
  int32_t running_jobs_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t n_completed_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t n_cancelled_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t n_failed_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t n_passes_ ABSL_GUARDED_BY(mu_) = 0;

  // Sinks of finished jobs that may still hold undelivered bytes. Engine thread only.
  std::vector<std::weak_ptr<PrefillSink>> draining_;
  std::thread thread_;
};

}  // namespace duet::prefill
