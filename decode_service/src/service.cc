#include "duet/decode/service.h"

#include <grpcpp/grpcpp.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>

#include <cmath>
#include <deque>
#include <mutex>

#include "absl/strings/str_cat.h"

namespace duet::decode {
namespace {

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

int64_t NsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() -
                                                              t0)
      .count();
}

v1::FinishReason ToProto(sampling::FinishReason r) {
  switch (r) {
    case sampling::FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case sampling::FinishReason::kStopString:
      return v1::FINISH_REASON_STOP;
    case sampling::FinishReason::kMaxTokens:
      return v1::FINISH_REASON_LENGTH;
    default:
      return v1::FINISH_REASON_UNSPECIFIED;
  }
}

v1::SessionState ToProto(SessionState s) {
  switch (s) {
    case SessionState::kPrefilling:
      return v1::SESSION_STATE_PREFILLING;
    case SessionState::kDecoding:
      return v1::SESSION_STATE_DECODING;
    case SessionState::kIdle:
      return v1::SESSION_STATE_IDLE;
    case SessionState::kEvicted:
      return v1::SESSION_STATE_EVICTED;
    case SessionState::kClosed:
      return v1::SESSION_STATE_CLOSED;
  }
  return v1::SESSION_STATE_UNSPECIFIED;
}

void Fill(const SessionSummary& s, v1::SessionInfo* out) {
  out->set_session_id(s.id);
  out->set_state(ToProto(s.state));
  out->set_n_tokens(s.n_tokens);
  out->set_n_kv_tokens(s.n_kv_tokens);
  out->set_n_blocks(s.n_blocks);
  out->set_idle_ns(s.idle_ns);
}

}  // namespace

// The outgoing side of one Generate call, shared by the reactor (gRPC threads), the admission
// thread and the engine thread. Messages are written one at a time, in order.
struct DecodeServiceImpl::Stream {
  std::recursive_mutex mu;  // gRPC may run a reaction inline from StartWrite/Finish
  GenerateReactor* reactor = nullptr;  // null once OnDone ran
  std::deque<v1::GenerateResponse> out;
  bool writing = false;
  bool finished = false;
  bool finish_pending = false;
  bool client_gone = false;
  grpc::Status final_status;
  std::shared_ptr<SequenceSink> sink = std::make_shared<SequenceSink>();
  // Metrics (may be null). Finish records the request's end; ok_reason is set before an OK end.
  metrics::DecodeMetrics* metrics = nullptr;
  std::chrono::steady_clock::time_point arrival = std::chrono::steady_clock::now();
  const char* ok_reason = metrics::kReasonStop;
  bool first_written = false;  // TTFT is observed when the first message's write completes

  void Push(v1::GenerateResponse m);
  void Finish(grpc::Status s);
  void WriteDone(bool ok);
};

class DecodeServiceImpl::GenerateReactor : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateReactor(std::shared_ptr<Stream> s, std::atomic<int32_t>* open)
      : s_(std::move(s)), open_(open) {
    s_->reactor = this;
    open_->fetch_add(1);
  }
  void OnWriteDone(bool ok) override { s_->WriteDone(ok); }
  void OnCancel() override { s_->sink->cancelled.store(true); }
  void OnDone() override {
    {
      std::lock_guard<std::recursive_mutex> lock(s_->mu);
      s_->reactor = nullptr;
    }
    open_->fetch_sub(1);
    delete this;
  }

 private:
  std::shared_ptr<Stream> s_;
  std::atomic<int32_t>* const open_;
};

void DecodeServiceImpl::Stream::Push(v1::GenerateResponse m) {
  std::lock_guard<std::recursive_mutex> lock(mu);
  if (finished || client_gone || reactor == nullptr) return;
  out.push_back(std::move(m));
  if (!writing) {
    writing = true;
    reactor->StartWrite(&out.front());
  }
}

void DecodeServiceImpl::Stream::Finish(grpc::Status s) {
  std::lock_guard<std::recursive_mutex> lock(mu);
  if (finished) return;
  finished = true;
  if (metrics != nullptr) {
    metrics->Finished(static_cast<int>(s.error_code()), ok_reason);
    if (s.ok()) {
      metrics->e2e.Observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - arrival).count());
    }
  }
  if (reactor == nullptr) return;
  if (writing) {
    finish_pending = true;
    final_status = std::move(s);
  } else {
    reactor->Finish(std::move(s));
  }
}

void DecodeServiceImpl::Stream::WriteDone(bool ok) {
  std::lock_guard<std::recursive_mutex> lock(mu);
  if (ok && !first_written) {
    // The first message a Generate writes carries its first token: it is now with the client's
    // transport, which is what TTFT measures.
    first_written = true;
    if (metrics != nullptr) {
      metrics->ttft.Observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - arrival).count());
    }
  }
  if (!out.empty()) out.pop_front();
  writing = false;
  if (!ok) {  // the client went away: stop generating
    client_gone = true;
    out.clear();
    sink->cancelled.store(true);
  }
  if (reactor == nullptr) return;
  if (!out.empty()) {
    writing = true;
    reactor->StartWrite(&out.front());
  } else if (finish_pending) {
    finish_pending = false;
    reactor->Finish(final_status);
  }
}

DecodeServiceImpl::DecodeServiceImpl(model::Model* model, const tokenizer::Tokenizer* tok,
                                     DecodeOptions opts)
    : model_(model),
      tok_(tok),
      opts_(std::move(opts)),
      pool_(std::move(*kv::BlockPool::Create(model->kv_shape(opts_.block_size), opts_.kv_blocks))),
      sessions_(pool_.get(), opts_.session_ttl),
      prefill_(opts_.prefill_target, model->fingerprint(), model->kv_shape(opts_.block_size)),
      engine_(model, tok, opts_.max_batch, opts_.metrics, opts_.n_threads) {
  engine_.Start();
  reaper_ = std::thread([this] {
    while (!stop_reaper_.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      sessions_.ExpireIdle();
    }
  });
}

DecodeServiceImpl::~DecodeServiceImpl() { Shutdown(); }

void DecodeServiceImpl::Shutdown() {
  draining_.store(true);
  while (admitting_.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  engine_.Stop();
  stop_reaper_.store(true);
  if (reaper_.joinable()) reaper_.join();
}

grpc::ServerWriteReactor<v1::GenerateResponse>* DecodeServiceImpl::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* req) {
  auto stream = std::make_shared<Stream>();
  stream->metrics = opts_.metrics;
  auto* reactor = new GenerateReactor(stream, &open_streams_);
  if (draining_.load()) {
    stream->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "decode server is shutting down"));
    return reactor;
  }
  if (in_flight_.load() >= opts_.max_pending) {
    stream->Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                absl::StrCat("too many requests in flight (", opts_.max_pending,
                                             ")")));
    return reactor;
  }
  in_flight_.fetch_add(1);
  admitting_.fetch_add(1);
  // Admission may block (tokenizing, waiting for prefill): it runs on its own thread.
  std::thread([this, stream, request = *req, deadline = ctx->deadline()]() mutable {
    Admit(std::move(stream), std::move(request), deadline);
    admitting_.fetch_sub(1);
  }).detach();
  return reactor;
}

void DecodeServiceImpl::Admit(std::shared_ptr<Stream> stream, v1::GenerateRequest req,
                              std::chrono::system_clock::time_point deadline) {
  const auto arrival = stream->arrival;
  metrics::DecodeMetrics* const m = opts_.metrics;
  const model::ModelConfig& cfg = model_->config();
  auto fail = [&](const absl::Status& s) {
    stream->Finish(ToGrpc(s));
    in_flight_.fetch_sub(1);
  };

  // Sampling and stopping parameters.
  sampling::SamplingParams sp;
  const auto& rs = req.sampling();
  sp.temperature = rs.has_temperature() ? rs.temperature() : 1.0f;
  sp.top_k = rs.top_k();
  sp.top_p = rs.has_top_p() ? rs.top_p() : 1.0f;
  sp.min_p = rs.min_p();
  sp.repetition_penalty = rs.has_repetition_penalty() ? rs.repetition_penalty() : 1.0f;
  sp.seed = rs.seed();
  if (auto s = sampling::Validate(sp); !s.ok()) return fail(s);
  sampling::StopParams stop;
  stop.max_tokens = req.stopping().has_max_tokens() ? req.stopping().max_tokens() : 64;
  stop.stop_strings.assign(req.stopping().stop().begin(), req.stopping().stop().end());
  stop.ignore_eos = req.stopping().ignore_eos();
  stop.eos_ids = cfg.eos_token_ids;
  if (auto e = tok_->eos_id();
      e && std::find(stop.eos_ids.begin(), stop.eos_ids.end(), *e) == stop.eos_ids.end())
    stop.eos_ids.push_back(*e);
  if (auto s = sampling::Validate(stop); !s.ok()) return fail(s);

  // The session and this turn's new tokens.
  std::shared_ptr<Session> session;
  std::vector<int32_t> delta;
  switch (req.input_case()) {
    case v1::GenerateRequest::kPrompt:
      if (req.prompt().empty()) return fail(absl::InvalidArgumentError("prompt is empty"));
      delta = tok_->Encode(req.prompt(), /*add_special_tokens=*/true);
      break;
    case v1::GenerateRequest::kPromptTokens:
      delta.assign(req.prompt_tokens().token_ids().begin(), req.prompt_tokens().token_ids().end());
      if (delta.empty()) return fail(absl::InvalidArgumentError("prompt_tokens is empty"));
      for (int32_t t : delta) {
        if (t < 0 || t >= cfg.n_vocab) {
          return fail(absl::InvalidArgumentError(
              absl::StrCat("token id ", t, " out of range [0, ", cfg.n_vocab, ")")));
        }
      }
      break;
    case v1::GenerateRequest::kTurn: {
      if (req.turn().text().empty()) return fail(absl::InvalidArgumentError("turn text is empty"));
      auto s = sessions_.Acquire(req.turn().session_id());
      if (!s.ok()) return fail(s.status());
      session = *s;
      delta = tok_->Encode(req.turn().text(), /*add_special_tokens=*/false);
      if (delta.empty()) {
        sessions_.Release(session);
        return fail(absl::InvalidArgumentError("turn text has no tokens"));
      }
      break;
    }
    default:
      return fail(absl::InvalidArgumentError("request has no prompt, prompt_tokens or turn"));
  }
  const int64_t old_len = session ? static_cast<int64_t>(session->tokens.size()) : 0;
  const int64_t new_len = old_len + static_cast<int64_t>(delta.size());
  auto refuse = [&](const absl::Status& s) {
    if (session) sessions_.Release(session);
    fail(s);
  };
  if (new_len > cfg.n_ctx) {
    return refuse(absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", new_len, " tokens exceeds the model context of ", cfg.n_ctx)));
  }
  if (new_len + stop.max_tokens > cfg.n_ctx) {
    return refuse(absl::InvalidArgumentError(
        absl::StrCat("max_tokens ", stop.max_tokens, " past the context: ", new_len,
                     " prompt tokens + ", stop.max_tokens, " > ", cfg.n_ctx)));
  }
  if (!session) session = sessions_.Create(req.open_session());
  session->tokens.insert(session->tokens.end(), delta.begin(), delta.end());
  // Undo this turn: the conversation goes back to what it was, and its K/V is dropped (the
  // tokens stay, so the next turn re-prefills).
  auto rollback = [this, session, old_len](const absl::Status& s, Stream* st) {
    session->tokens.resize(old_len);
    session->kv.Release();
    sessions_.Release(session);
    st->Finish(ToGrpc(s));
    in_flight_.fetch_sub(1);
  };

  // K/V room for the whole turn, before asking prefill; idle sessions are evicted if needed.
  const int32_t total = static_cast<int32_t>(new_len + stop.max_tokens);
  absl::Status reserved = session->kv.Reserve(total);
  if (!reserved.ok()) {
    const int32_t need = (total + opts_.block_size - 1) / opts_.block_size -
                         static_cast<int32_t>(session->kv.blocks().size());
    if (sessions_.EvictFor(need)) reserved = session->kv.Reserve(total);
  }
  if (!reserved.ok()) return rollback(reserved, stream.get());

  // Prefill: a short continuation delta locally on the engine thread, anything else remotely.
  const int32_t cached = session->kv.n_tokens();
  const bool local = cached > 0 && new_len - cached <= opts_.local_prefill_max_tokens;
  SequenceStart start;
  int64_t kv_bytes = 0;
  if (!local) {
    session->kv.set_n_tokens(0);
    const auto prefill_deadline =
        std::min(deadline, std::chrono::system_clock::now() + opts_.prefill_timeout);
    auto r = prefill_.Prefill(session->tokens, opts_.kv_dtype, prefill_deadline, &session->kv,
                              &stream->sink->cancelled);
    if (!r.ok()) return rollback(r.status(), stream.get());
    kv_bytes = r->kv_bytes;
    if (m != nullptr) {
      m->kv_transfer.Observe(r->transfer_s);
      m->kv_transfer_bytes.Increment(static_cast<double>(r->kv_bytes));
    }
    start.logits = std::move(r->logits);
    if (static_cast<int32_t>(start.logits.size()) != cfg.n_vocab) {
      return rollback(absl::DataLossError(absl::StrCat("prefill sent ", start.logits.size(),
                                                       " logits, expected ", cfg.n_vocab)),
                      stream.get());
    }
  }
  sessions_.MarkDecoding(session);
  if (m != nullptr) m->prompt_tokens.Increment(static_cast<double>(local ? new_len - cached : new_len));

  // Hand the sequence to the engine; from here on, its callbacks drive the stream.
  struct TurnState {
    bool first = true;
    std::chrono::steady_clock::time_point first_token;
    std::chrono::steady_clock::time_point last_token;
    int64_t ttft_ns = 0;
  };
  auto ts = std::make_shared<TurnState>();
  const std::string sid = session->persistent ? session->id : std::string();
  const uint32_t prompt_tokens = static_cast<uint32_t>(local ? new_len - cached : new_len);
  Stream* sp_raw = stream.get();
  stream->sink->on_token = [stream, ts, sid, arrival, metrics = m](TokenEvent ev) {
    v1::GenerateResponse m;
    const auto now = std::chrono::steady_clock::now();
    if (ts->first) {
      m.set_session_id(sid);
      ts->first = false;
      ts->first_token = now;
      ts->ttft_ns = NsSince(arrival);
    } else if (metrics != nullptr) {
      metrics->inter_token.Observe(std::chrono::duration<double>(now - ts->last_token).count());
    }
    ts->last_token = now;
    if (metrics != nullptr) metrics->generation_tokens.Increment(static_cast<double>(ev.token_ids.size()));
    m.set_text(std::move(ev.text));
    m.mutable_token_ids()->Add(ev.token_ids.begin(), ev.token_ids.end());
    stream->Push(std::move(m));
  };
  stream->sink->on_finish = [this, stream, ts, session, sp_raw, prompt_tokens, kv_bytes, local,
                             rollback](FinishEvent ev) {
    if (!ev.status.ok()) return rollback(ev.status, sp_raw);
    v1::GenerateResponse m;
    auto* sum = m.mutable_summary();
    sum->set_finish_reason(ToProto(ev.reason));
    sum->set_prompt_tokens(prompt_tokens);
    sum->set_generated_tokens(static_cast<uint32_t>(ev.generated_tokens));
    sum->set_ttft_ns(static_cast<uint64_t>(ts->ttft_ns));
    sum->set_decode_ns(static_cast<uint64_t>(ts->first ? 0 : NsSince(ts->first_token)));
    sum->set_kv_transfer_bytes(static_cast<uint64_t>(kv_bytes));
    sum->set_prefilled_locally(local);
    stream->Push(std::move(m));
    stream->ok_reason = ev.reason == sampling::FinishReason::kMaxTokens ? metrics::kReasonLength
                                                                        : metrics::kReasonStop;
    sessions_.Release(session);
    stream->Finish(grpc::Status::OK);
    in_flight_.fetch_sub(1);
  };
  start.session = session;
  start.sink = stream->sink;
  start.sampling = sp;
  start.stop = stop;
  engine_.Submit(std::move(start));
}

void DecodeServiceImpl::RefreshMetrics() {
  metrics::DecodeMetrics* const m = opts_.metrics;
  if (m == nullptr) return;
  const auto n = sessions_.CountByState();
  m->sessions_prefilling.Set(n.prefilling);
  m->sessions_decoding.Set(n.decoding);
  m->sessions_idle.Set(n.idle);
  const int32_t running = engine_.running();
  m->running.Set(running);
  m->waiting.Set(std::max(0, in_flight_.load() - running));
  const int32_t total = pool_->n_blocks();
  m->kv_cache_usage.Set(total > 0 ? 1.0 - static_cast<double>(pool_->n_free()) / total : 0.0);
  std::lock_guard<std::mutex> lock(metrics_mu_);
  const int64_t ev = sessions_.evictions();
  if (ev > evictions_reported_) {
    m->evictions.Increment(static_cast<double>(ev - evictions_reported_));
    evictions_reported_ = ev;
  }
}

grpc::ServerUnaryReactor* DecodeServiceImpl::GetSession(grpc::CallbackServerContext* ctx,
                                                        const v1::GetSessionRequest* req,
                                                        v1::SessionInfo* resp) {
  auto* r = ctx->DefaultReactor();
  auto s = sessions_.Get(req->session_id());
  if (!s.ok()) {
    r->Finish(ToGrpc(s.status()));
  } else {
    Fill(*s, resp);
    r->Finish(grpc::Status::OK);
  }
  return r;
}

grpc::ServerUnaryReactor* DecodeServiceImpl::CloseSession(grpc::CallbackServerContext* ctx,
                                                          const v1::CloseSessionRequest* req,
                                                          v1::CloseSessionResponse*) {
  auto* r = ctx->DefaultReactor();
  r->Finish(ToGrpc(sessions_.Close(req->session_id())));
  return r;
}

grpc::ServerUnaryReactor* DecodeServiceImpl::ListSessions(grpc::CallbackServerContext* ctx,
                                                          const v1::ListSessionsRequest*,
                                                          v1::ListSessionsResponse* resp) {
  auto* r = ctx->DefaultReactor();
  for (const auto& s : sessions_.List()) Fill(s, resp->add_sessions());
  resp->set_kv_blocks_total(static_cast<uint32_t>(pool_->n_blocks()));
  resp->set_kv_blocks_free(static_cast<uint32_t>(pool_->n_free()));
  r->Finish(grpc::Status::OK);
  return r;
}

}  // namespace duet::decode
