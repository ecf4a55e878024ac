#include "duet/prefill/engine.h"

#include <pthread.h>

#include <prometheus/counter.h>
#include <prometheus/histogram.h>

#include <algorithm>
#include <cstdio>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "duet/kernels/threads.h"

namespace duet::prefill {
namespace {

int64_t Nanos(Clock::duration d) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
}

double Millis(Clock::duration d) { return static_cast<double>(Nanos(d)) / 1e6; }

}  // namespace

absl::StatusOr<std::unique_ptr<PrefillEngine>> PrefillEngine::Create(
    std::unique_ptr<model::Model> model, EngineOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("no model");
  const int32_t n_ctx = model->config().n_ctx;
  if (options.max_queue < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_queue ", options.max_queue, " < 1"));
  }
  if (options.block_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("block_size ", options.block_size, " < 1"));
  }
  if (options.max_context < 0 || options.max_context > n_ctx) {
    return absl::InvalidArgumentError(absl::StrCat("max_context ", options.max_context,
                                                   " outside [0, ", n_ctx, "] (the model's)"));
  }
  if (options.max_context == 0) options.max_context = n_ctx;
  if (options.max_chunk_bytes == 0) options.max_chunk_bytes = kv::kDefaultMaxChunkBytes;
  if (options.max_batch < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_batch ", options.max_batch, " < 1"));
  }
  // A pass holds at most max_context tokens in all, in at most max_batch sequences: each
  // sequence's last block may be partly empty, hence the max_batch extra blocks.
  const int32_t n_blocks =
      (options.max_context + options.block_size - 1) / options.block_size + options.max_batch;
  auto pool = kv::BlockPool::Create(model->kv_shape(options.block_size), n_blocks);
  if (!pool.ok()) return pool.status();
  return std::unique_ptr<PrefillEngine>(
      new PrefillEngine(std::move(model), std::move(*pool), std::move(options)));
}

PrefillEngine::PrefillEngine(std::unique_ptr<model::Model> model,
                             std::unique_ptr<kv::BlockPool> pool, EngineOptions options)
    : model_(std::move(model)), pool_(std::move(pool)), options_(std::move(options)) {
  thread_ = std::thread([this] { Loop(); });
}

PrefillEngine::~PrefillEngine() { Stop(); }

absl::Status PrefillEngine::Submit(PrefillJob job) {
  const model::ModelConfig& c = model_->config();
  if (job.token_ids.empty()) return absl::InvalidArgumentError("token_ids is empty");
  for (size_t i = 0; i < job.token_ids.size(); ++i) {
    const int32_t t = job.token_ids[i];
    if (t < 0 || t >= c.n_vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token_ids[", i, "] = ", t, " is outside the vocabulary [0, ", c.n_vocab, ")"));
    }
  }
  if (job.token_ids.size() > static_cast<size_t>(options_.max_context)) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", job.token_ids.size(),
                                                   " tokens exceeds the context of ",
                                                   options_.max_context));
  }
  if (job.kv_dtype == v1::KV_DTYPE_UNSPECIFIED) job.kv_dtype = v1::KV_DTYPE_BF16;
  if (!v1::KvDtype_IsValid(job.kv_dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_dtype ", static_cast<int>(job.kv_dtype), " is not supported"));
  }
  if (!job.model_fingerprint.empty() && job.model_fingerprint != model_->fingerprint()) {
    return absl::FailedPreconditionError(
        absl::StrCat("request is for model fingerprint ", job.model_fingerprint,
                     " but this server serves ", model_->fingerprint()));
  }
  if (job.sink == nullptr) return absl::InvalidArgumentError("job without a sink");

  std::vector<PrefillJob> gone;
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    TakeCancelledLocked(&gone);
    if (stopping_) {
      status = absl::UnavailableError("prefill engine is stopping");
    } else if (queue_.size() >= static_cast<size_t>(options_.max_queue)) {
      status = absl::ResourceExhaustedError(
          absl::StrCat("prefill queue is full (", options_.max_queue, " requests waiting)"));
    } else {
      queue_.push_back(std::move(job));
    }
  }
  for (PrefillJob& g : gone) g.sink->OnFinish(absl::CancelledError("cancelled while queued"));
  return status;
}

void PrefillEngine::TakeCancelledLocked(std::vector<PrefillJob>* out) {
  for (auto it = queue_.begin(); it != queue_.end();) {
    if (it->sink->cancelled()) {
      out->push_back(std::move(*it));
      it = queue_.erase(it);
      ++n_cancelled_;
    } else {
      ++it;
    }
  }
}

void PrefillEngine::Pause() {
  absl::MutexLock lock(&mu_);
  paused_ = true;
}

void PrefillEngine::Resume() {
  absl::MutexLock lock(&mu_);
  paused_ = false;
}

void PrefillEngine::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  thread_.join();
}

EngineStats PrefillEngine::stats() const {
  EngineStats s;
  {
    absl::MutexLock lock(&mu_);
    s.completed = n_completed_;
    s.cancelled = n_cancelled_;
    s.failed = n_failed_;
    s.queued = static_cast<int32_t>(std::count_if(
        queue_.begin(), queue_.end(), [](const PrefillJob& j) { return !j.sink->cancelled(); }));
    s.running = running_;
    s.running_jobs = running_jobs_;
    s.passes = n_passes_;
  }
  s.pool_free_blocks = pool_->n_free();
  s.pool_blocks = pool_->n_blocks();
  return s;
}

void PrefillEngine::Loop() {
  // OpenMP's thread count is per thread: set it on the thread that runs the kernels. The name
  // shows in top -H and is inherited by the OpenMP workers this thread starts.
  pthread_setname_np(pthread_self(), "duet-engine");
  kernels::SetNumThreads(options_.n_threads);
  for (;;) {
    WaitForDrain();
    std::vector<PrefillJob> batch;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
        return stopping_ || (!paused_ && !queue_.empty());
      };
      mu_.Await(absl::Condition(&ready));
      if (stopping_) break;
      // Everything waiting, in order, up to max_batch jobs and max_context tokens.
      int64_t tokens = 0;
      while (!queue_.empty() && static_cast<int32_t>(batch.size()) < options_.max_batch) {
        const int64_t n = static_cast<int64_t>(queue_.front().token_ids.size());
        if (!batch.empty() && tokens + n > options_.max_context) break;
        tokens += n;
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      running_ = true;
      running_jobs_ = static_cast<int32_t>(batch.size());
    }
    RunBatch(batch);
    batch.clear();
    absl::MutexLock lock(&mu_);
    running_ = false;
    running_jobs_ = 0;
  }
  // Stopping: whatever still waits will not run.
  std::deque<PrefillJob> left;
  {
    absl::MutexLock lock(&mu_);
    left.swap(queue_);
    n_failed_ += static_cast<int64_t>(left.size());
  }
  for (PrefillJob& job : left) {
    job.sink->OnFinish(absl::UnavailableError("prefill server is shutting down"));
  }
}

void PrefillEngine::WaitForDrain() {
  for (;;) {
    int64_t buffered = 0;
    std::erase_if(draining_, [&buffered](const std::weak_ptr<PrefillSink>& w) {
      auto sink = w.lock();
      const int64_t b = sink == nullptr ? 0 : sink->buffered_bytes();
      buffered += b;
      return b == 0;
    });
    if (buffered <= options_.max_buffered_bytes) return;
    // Slow callers: poll until they drain (or the engine stops).
    absl::MutexLock lock(&mu_);
    if (mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Milliseconds(1))) return;
  }
}

void PrefillEngine::Finish(PrefillJob& job, const absl::Status& status, Clock::time_point start,
                           Clock::duration compute, int64_t bytes, size_t batch_size) {
  {
    absl::MutexLock lock(&mu_);
    if (status.ok()) {
      ++n_completed_;
    } else if (absl::IsCancelled(status)) {
      ++n_cancelled_;
    } else {
      ++n_failed_;
    }
  }
  const int n = static_cast<int>(job.token_ids.size());
  if (status.ok() && options_.metrics != nullptr) {
    options_.metrics->queue_time.Observe(std::chrono::duration<double>(start - job.arrival).count());
    options_.metrics->compute.Observe(std::chrono::duration<double>(compute).count());
    options_.metrics->tokens.Increment(n);
  }
  job.sink->OnFinish(status);
  draining_.push_back(job.sink);
  if (options_.log_requests) {
    std::fprintf(stderr,
                 "prefill: %d prompt tokens (pass of %zu), queue %.2f ms, compute %.2f ms, %lld "
                 "bytes, %s\n",
                 n, batch_size, Millis(start - job.arrival), Millis(compute),
                 static_cast<long long>(bytes), status.ok() ? "OK" : status.ToString().c_str());
  }
}

void PrefillEngine::RunBatch(std::vector<PrefillJob>& jobs) {
  const Clock::time_point start = Clock::now();
  // The jobs that take part in the pass, each with its own sequence in the pool.
  struct Live {
    PrefillJob* job;
    kv::SequenceKv seq;
    uint32_t chunk_bytes;
    int64_t bytes = 0;
    absl::Status dropped;  // not OK once the job left the pass (cancelled, encode error)
  };
  std::vector<Live> live;
  live.reserve(jobs.size());
  for (PrefillJob& job : jobs) {
    if (job.sink->cancelled()) {
      Finish(job, absl::CancelledError("cancelled while queued"), start, {}, 0, jobs.size());
      continue;
    }
    kv::SequenceKv seq(pool_.get());
    if (absl::Status st = seq.Reserve(static_cast<int32_t>(job.token_ids.size())); !st.ok()) {
      Finish(job, st, start, {}, 0, jobs.size());
      continue;
    }
    job.sink->OnHeader(
        kv::MakeKvHeader(model_->fingerprint(), pool_->shape(), job.kv_dtype, job.token_ids));
    const uint32_t chunk_bytes = job.max_chunk_bytes == 0
                                     ? options_.max_chunk_bytes
                                     : std::min(job.max_chunk_bytes, options_.max_chunk_bytes);
    live.push_back({&job, std::move(seq), chunk_bytes, 0, absl::OkStatus()});
  }
  if (live.empty()) return;

  // As soon as a layer's K/V is in the pool, every job still in the pass sends it. The encoding
  // and the hand-off to the calls run on a sender thread, so layer l is encoded and sent while
  // the engine computes layer l+1 (a finished layer's K/V is never written again). The engine
  // thread only notes which callers left, and stops the pass when nobody is left.
  struct Sender {
    absl::Mutex mu;
    int32_t layers_ready ABSL_GUARDED_BY(mu) = 0;
    bool pass_over ABSL_GUARDED_BY(mu) = false;
  } sender;
  auto drop = [&sender](Live& l, absl::Status why) {
    absl::MutexLock lock(&sender.mu);
    if (l.dropped.ok()) l.dropped = std::move(why);
  };
  auto dropped = [&sender](const Live& l) {
    absl::MutexLock lock(&sender.mu);
    return !l.dropped.ok();
  };
  std::thread sender_thread([&] {
    for (int32_t layer = 0;; ++layer) {
      {
        absl::MutexLock lock(&sender.mu);
        auto ready = [&sender, layer]() ABSL_SHARED_LOCKS_REQUIRED(sender.mu) {
          return sender.layers_ready > layer || sender.pass_over;
        };
        sender.mu.Await(absl::Condition(&ready));
        if (sender.layers_ready <= layer) return;  // the pass ended before this layer
      }
      for (Live& l : live) {
        if (dropped(l)) continue;
        PrefillSink& sink = *l.job->sink;
        if (sink.cancelled()) {
          drop(l, absl::CancelledError("cancelled during the forward pass"));
          continue;
        }
        // Every position's K/V of this layer is in the sequence's blocks (the pass advances
        // n_tokens() only at its end; the encoder reads up to the capacity).
        const int32_t n = static_cast<int32_t>(l.job->token_ids.size());
        std::vector<v1::KvChunk> chunks;
        if (absl::Status st =
                kv::EncodeLayer(l.seq, layer, 0, n, l.job->kv_dtype, l.chunk_bytes, &chunks);
            !st.ok()) {
          drop(l, absl::InternalError(absl::StrCat("encoding K/V: ", st.message())));
          continue;
        }
        for (v1::KvChunk& chunk : chunks) {
          l.bytes += static_cast<int64_t>(chunk.ByteSizeLong());
          sink.OnChunk(std::move(chunk));
        }
        if (options_.after_layer_for_test) options_.after_layer_for_test(layer, sink);
      }
    }
  });
  model::ForwardHooks hooks;
  hooks.on_layer_kv = [&](int32_t layer) {
    int active = 0;
    for (Live& l : live) {
      if (l.job->sink->cancelled()) drop(l, absl::CancelledError("cancelled during the forward pass"));
      active += dropped(l) ? 0 : 1;
    }
    {
      absl::MutexLock lock(&sender.mu);
      sender.layers_ready = layer + 1;
    }
    return active > 0;  // nobody left to send to: stop the pass
  };

  std::vector<model::BatchItem> items;
  items.reserve(live.size());
  for (Live& l : live) items.push_back({l.job->token_ids, &l.seq, /*all_logits=*/false});
  std::vector<float> logits;
  const Clock::time_point compute_begin = Clock::now();
  const absl::Status st = model_->Forward(items, &logits, &hooks);
  const Clock::duration compute = Clock::now() - compute_begin;
  {
    absl::MutexLock lock(&sender.mu);
    sender.pass_over = true;
  }
  sender_thread.join();  // every computed layer has been sent (or its job dropped)
  {
    absl::MutexLock lock(&mu_);
    ++n_passes_;
  }
  const int32_t V = model_->config().n_vocab;
  for (size_t i = 0; i < live.size(); ++i) {
    Live& l = live[i];
    l.seq.Release();
    PrefillJob& job = *l.job;
    if (!l.dropped.ok()) {
      Finish(job, l.dropped, start, compute, l.bytes, live.size());
      continue;
    }
    if (!st.ok()) {  // the pass itself failed: every job still in it gets its error
      Finish(job, st, start, compute, l.bytes, live.size());
      continue;
    }
    v1::KvResult result;
    result.mutable_logits()->Add(logits.begin() + static_cast<int64_t>(i) * V,
                                 logits.begin() + static_cast<int64_t>(i + 1) * V);
    result.set_n_prompt_tokens(static_cast<uint32_t>(job.token_ids.size()));
    v1::PrefillTimings* t = result.mutable_timings();
    t->set_queue_ns(static_cast<uint64_t>(Nanos(start - job.arrival)));
    t->set_compute_ns(static_cast<uint64_t>(Nanos(compute)));
    t->set_total_ns(static_cast<uint64_t>(Nanos(Clock::now() - job.arrival)));
    l.bytes += static_cast<int64_t>(result.ByteSizeLong());
    job.sink->OnResult(std::move(result));
    Finish(job, absl::OkStatus(), start, compute, l.bytes, live.size());
  }
}

}  // namespace duet::prefill
