#include "duet/prefill/service.h"

#include <atomic>
#include <cstdio>
#include <deque>
#include <memory>
#include <optional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace duet::prefill {
namespace {

using Reactor = grpc::ServerWriteReactor<v1::PrefillResponse>;

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbers.
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

// One Prefill call's state, shared by its reactor (gRPC threads) and the engine thread.
// The engine appends messages to the outbox; Pump() starts the next write or the Finish when
// nothing is in flight. Only the thread that flips writing_ or finished_ under mu_ touches the
// reactor, so the reactor is never used after Finish (after which it may be deleted).
class PrefillCall final : public PrefillSink {
 public:
  PrefillCall(Reactor* reactor, metrics::PrefillMetrics* metrics)
      : reactor_(reactor), metrics_(metrics) {}

  // PrefillSink: engine thread.
  bool cancelled() const override { return cancelled_.load(std::memory_order_acquire); }
  void OnHeader(v1::KvHeader header) override {
    v1::PrefillResponse m;
    *m.mutable_header() = std::move(header);
    Push(std::move(m));
  }
  void OnChunk(v1::KvChunk chunk) override {
    v1::PrefillResponse m;
    *m.mutable_chunk() = std::move(chunk);
    Push(std::move(m));
  }
  void OnResult(v1::KvResult result) override {
    v1::PrefillResponse m;
    *m.mutable_result() = std::move(result);
    Push(std::move(m));
  }
  void OnFinish(const absl::Status& status) override {
    {
      absl::MutexLock lock(&mu_);
      if (!status_.has_value()) status_ = ToGrpc(status);
    }
    Pump();
  }
  int64_t buffered_bytes() const override {
    absl::MutexLock lock(&mu_);
    return buffered_;
  }

  // Reactor side: gRPC threads.
  void OnWriteDone(bool ok) {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      buffered_ -= in_flight_bytes_;
      in_flight_bytes_ = 0;
      // A failed write means the stream is gone.
      if (!ok) cancelled_.store(true, std::memory_order_release);
    }
    Pump();
  }
  void Cancel() {
    cancelled_.store(true, std::memory_order_release);
    Pump();
  }

 private:
  void Push(v1::PrefillResponse m) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || cancelled()) return;
      buffered_ += static_cast<int64_t>(m.ByteSizeLong());
      outbox_.push_back(std::move(m));
    }
    Pump();
  }

  void Pump() {
    enum class Action { kNone, kWrite, kFinish } action = Action::kNone;
    grpc::Status final_status;
    {
      absl::MutexLock lock(&mu_);
      if (writing_ || finished_) return;
      if (cancelled()) {
        outbox_.clear();
        buffered_ = 0;
        finished_ = true;
        final_status = grpc::Status(grpc::StatusCode::CANCELLED, "prefill cancelled");
        action = Action::kFinish;
      } else if (!outbox_.empty()) {
        in_flight_ = std::move(outbox_.front());
        outbox_.pop_front();
        in_flight_bytes_ = static_cast<int64_t>(in_flight_.ByteSizeLong());
        writing_ = true;
        action = Action::kWrite;
      } else if (status_.has_value()) {
        finished_ = true;
        final_status = *status_;
        action = Action::kFinish;
      }
    }
    // Outside the lock: gRPC may run reactions inline.
    if (action == Action::kWrite) {
      reactor_->StartWrite(&in_flight_);
    } else if (action == Action::kFinish) {
      if (!final_status.ok() && metrics_ != nullptr)
        metrics_->Error(static_cast<int>(final_status.error_code()));
      reactor_->Finish(final_status);
    }
  }

  Reactor* const reactor_;  // not to be used once finished_ is set
  metrics::PrefillMetrics* const metrics_;
  std::atomic<bool> cancelled_{false};
  mutable absl::Mutex mu_;
  std::deque<v1::PrefillResponse> outbox_ ABSL_GUARDED_BY(mu_);
  int64_t buffered_ ABSL_GUARDED_BY(mu_) = 0;                // outbox + in-flight message bytes
  std::optional<grpc::Status> status_ ABSL_GUARDED_BY(mu_);  // the engine's final word
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // The message being written: set with writing_, read by gRPC until OnWriteDone.
  v1::PrefillResponse in_flight_;
  int64_t in_flight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

class PrefillReactor final : public Reactor {
 public:
  PrefillReactor(metrics::PrefillMetrics* metrics, std::atomic<int32_t>* in_flight)
      : call_(std::make_shared<PrefillCall>(this, metrics)), in_flight_(in_flight) {
    in_flight_->fetch_add(1);
  }

  const std::shared_ptr<PrefillCall>& call() const { return call_; }

  void OnWriteDone(bool ok) override { call_->OnWriteDone(ok); }
  void OnCancel() override { call_->Cancel(); }
  void OnDone() override {
    in_flight_->fetch_sub(1);
    delete this;
  }

 private:
  const std::shared_ptr<PrefillCall> call_;
  std::atomic<int32_t>* const in_flight_;
};

}  // namespace

PrefillServiceImpl::PrefillServiceImpl(PrefillEngine* engine, std::string model_name,
                                       metrics::PrefillMetrics* metrics)
    : engine_(engine), model_name_(std::move(model_name)), metrics_(metrics) {}

grpc::ServerWriteReactor<v1::PrefillResponse>* PrefillServiceImpl::Prefill(
    grpc::CallbackServerContext* /*context*/, const v1::PrefillRequest* request) {
  auto* reactor = new PrefillReactor(metrics_, &in_flight_);
  if (draining_.load()) {
    reactor->call()->OnFinish(absl::UnavailableError("prefill server is shutting down"));
    return reactor;
  }
  PrefillJob job;
  job.token_ids.assign(request->token_ids().begin(), request->token_ids().end());
  job.kv_dtype = request->kv_dtype();
  job.model_fingerprint = request->model_fingerprint();
  job.max_chunk_bytes = request->max_chunk_bytes();
  job.sink = reactor->call();
  const size_t n_tokens = job.token_ids.size();
  if (absl::Status st = engine_->Submit(std::move(job)); !st.ok()) {
    if (engine_->options().log_requests) {
      std::fprintf(stderr, "prefill: %zu prompt tokens, rejected: %s\n", n_tokens,
                   st.ToString().c_str());
    }
    reactor->call()->OnFinish(st);
  }
  return reactor;
}

grpc::ServerUnaryReactor* PrefillServiceImpl::Info(grpc::CallbackServerContext* context,
                                                   const v1::InfoRequest* /*request*/,
                                                   v1::InfoResponse* response) {
  const model::Model& m = engine_->model();
  const model::ModelConfig& c = m.config();
  response->set_model_name(model_name_);
  response->set_model_fingerprint(m.fingerprint());
  response->set_vocab_size(static_cast<uint32_t>(c.n_vocab));
  response->set_max_context(static_cast<uint32_t>(engine_->max_context()));
  response->set_n_layers(static_cast<uint32_t>(c.n_layers));
  response->set_n_kv_heads(static_cast<uint32_t>(c.n_kv_heads));
  response->set_head_dim(static_cast<uint32_t>(c.head_dim));
  response->set_max_queue(static_cast<uint32_t>(engine_->options().max_queue));
  for (int32_t id : c.eos_token_ids) response->add_eos_token_ids(id);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace duet::prefill
