#include "duet/decode/engine.h"

#include <pthread.h>

#include <algorithm>
#include <span>

#include <prometheus/histogram.h>

#include "absl/strings/str_cat.h"
#include "duet/kernels/threads.h"

namespace duet::decode {

struct DecodeEngine::Running {
  explicit Running(SequenceStart s, const tokenizer::Tokenizer& tok)
      : start(std::move(s)), sampler(start.sampling), stop(start.stop), detok(tok) {
    prefill_logits = std::move(start.logits);
    next = prefill_logits;
  }
  SequenceStart start;
  sampling::Sampler sampler;
  sampling::StopChecker stop;
  tokenizer::StreamDecoder detok;
  std::vector<float> prefill_logits;  // the last prompt position's, from a remote prefill
  // Logits to sample from next (non-empty: ready): prefill_logits, or this sequence's row of the
  // step's batch logits (valid until the next step).
  std::span<const float> next;
  int32_t generated = 0;
  bool done = false;
};

DecodeEngine::DecodeEngine(model::Model* model, const tokenizer::Tokenizer* tok, int32_t max_batch,
                           metrics::DecodeMetrics* metrics, int32_t n_threads)
    : model_(model),
      tok_(tok),
      max_batch_(std::max(1, max_batch)),
      metrics_(metrics),
      n_threads_(n_threads) {}

DecodeEngine::~DecodeEngine() { Stop(); }

void DecodeEngine::Start() { thread_ = std::thread([this] { Loop(); }); }

void DecodeEngine::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void DecodeEngine::Submit(SequenceStart start) {
  start.submitted = std::chrono::steady_clock::now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stop_) {
      inbox_.push_back(std::move(start));
      start.sink = nullptr;
    }
  }
  if (start.sink) {  // engine stopped: refuse at once
    start.sink->on_finish({absl::UnavailableError("decode engine is shutting down")});
    return;
  }
  cv_.notify_one();
}

int32_t DecodeEngine::waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int32_t>(inbox_.size());
}

void DecodeEngine::Retire(Running& r, FinishEvent ev) {
  if (r.done) return;
  r.done = true;
  ev.generated_tokens = r.generated;
  r.start.sink->on_finish(std::move(ev));
}

void DecodeEngine::Loop() {
  // OpenMP's thread count is per thread: set it on the thread that runs the kernels (a count
  // set on main() would not reach this one, which would run on every core). The name shows in
  // top -H and is inherited by the OpenMP workers this thread starts.
  pthread_setname_np(pthread_self(), "duet-engine");
  kernels::SetNumThreads(n_threads_);
  std::vector<std::unique_ptr<Running>> active;
  std::vector<float> logits;
  const int32_t V = model_->config().n_vocab;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !inbox_.empty() || !active.empty(); });
      if (stop_) break;
      // Sequences join between steps, up to the batch bound; the rest wait in order.
      while (!inbox_.empty() && static_cast<int32_t>(active.size()) < max_batch_) {
        if (metrics_ != nullptr) {
          metrics_->queue_time.Observe(std::chrono::duration<double>(
                                           std::chrono::steady_clock::now() -
                                           inbox_.front().submitted)
                                           .count());
        }
        active.push_back(std::make_unique<Running>(std::move(inbox_.front()), *tok_));
        inbox_.pop_front();
      }
    }
    running_.store(static_cast<int32_t>(active.size()));

    // Cancelled (or past their deadline) sequences leave before the step.
    for (auto& r : active)
      if (r->start.sink->cancelled.load()) Retire(*r, {absl::CancelledError("generation cancelled")});
    std::erase_if(active, [](const auto& r) { return r->done; });

    // One batched forward over every sequence that has tokens without K/V: a decode step's one
    // sampled token, or a continuation turn's locally prefilled delta.
    std::vector<model::BatchItem> items;
    std::vector<Running*> forwarded;
    for (auto& r : active) {
      if (!r->next.empty()) continue;
      Session& s = *r->start.session;
      const int32_t from = s.kv.n_tokens();
      items.push_back({std::span<const int32_t>(s.tokens).subspan(from), &s.kv, false});
      forwarded.push_back(r.get());
    }
    if (metrics_ != nullptr && !active.empty())
      metrics_->batch_size.Observe(static_cast<double>(active.size()));
    if (!items.empty()) {
      const absl::Status st = model_->Forward(items, &logits);
      if (!st.ok()) {
        for (Running* r : forwarded) Retire(*r, {absl::InternalError(st.ToString())});
      } else {
        for (size_t i = 0; i < forwarded.size(); ++i)
          forwarded[i]->next = std::span<const float>(logits).subspan(i * V, V);
      }
    }

    // Sample, stream, and check the stop criteria of every sequence.
    for (auto& r : active) {
      if (r->done || r->next.empty()) continue;
      Session& s = *r->start.session;
      const int32_t token = r->sampler.Sample(r->next, s.tokens);
      r->next = {};
      r->prefill_logits = {};
      s.tokens.push_back(token);
      ++r->generated;
      const auto& eos = r->start.stop.eos_ids;
      const bool is_eos = !r->start.stop.ignore_eos &&
                          std::find(eos.begin(), eos.end(), token) != eos.end();
      const std::string delta = is_eos ? std::string() : r->detok.Push(token);
      auto step = r->stop.Push(token, delta);
      std::string text = std::move(step.emit);
      if (step.finish != sampling::FinishReason::kNone &&
          step.finish != sampling::FinishReason::kStopString) {
        text += r->stop.Flush();
        text += r->detok.Flush();
      }
      r->start.sink->on_token({std::move(text), {token}});
      if (step.finish != sampling::FinishReason::kNone) {
        Retire(*r, {absl::OkStatus(), step.finish});
      }
    }
    std::erase_if(active, [](const auto& r) { return r->done; });
    running_.store(static_cast<int32_t>(active.size()));
  }
  // Shutting down: everything still here ends UNAVAILABLE.
  for (auto& r : active) Retire(*r, {absl::UnavailableError("decode engine stopped")});
  std::deque<SequenceStart> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    left.swap(inbox_);
  }
  for (auto& s : left) s.sink->on_finish({absl::UnavailableError("decode engine stopped")});
  running_.store(0);
}

}  // namespace duet::decode
