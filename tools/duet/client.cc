#include "client.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <random>
#include <set>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "duet/sampling/sampler.h"

namespace duet::cli {
namespace {

namespace v1 = duet::v1;
using Clock = std::chrono::steady_clock;

// Flags shared by generate and chat (see ParseSamplingFlags).
const std::set<std::string> kSamplingFlags = {"max-tokens", "temperature",        "top-k", "top-p",
                                              "min-p",      "repetition-penalty", "seed",  "stop"};

std::set<std::string> With(std::set<std::string> a, std::initializer_list<std::string> b) {
  a.insert(b);
  return a;
}

// A malformed command line: one line on stderr, exit 2.
int UsageError(const char* cmd, const absl::Status& s) {
  std::fprintf(stderr, "duet %s: %s\n", cmd, std::string(s.message()).c_str());
  return 2;
}

// A failed RPC: "duet <cmd>: <CODE>: <message>", exit 1.
int RpcError(const char* cmd, const grpc::Status& s) {
  std::fprintf(stderr, "duet %s: %s: %s\n", cmd, StatusCodeName(s.error_code()).c_str(),
               s.error_message().c_str());
  return 1;
}

absl::StatusOr<std::string> ParseServer(const Args& a) {
  auto server = a.Require("server");
  if (!server.ok()) return server.status();
  if (server->empty()) return absl::InvalidArgumentError("--server must not be empty");
  return server;
}

// --timeout-s: seconds, 0 (the default) = no deadline.
absl::StatusOr<double> ParseTimeout(const Args& a) {
  auto t = a.GetDouble("timeout-s", 0);
  if (!t.ok()) return t.status();
  if (*t < 0 || *t > 1e7) {
    return absl::InvalidArgumentError(
        absl::StrCat("--timeout-s must be in [0, 1e7] seconds, got ", *t));
  }
  return t;
}

// --name: an integer in [lo, hi]; `fallback` when absent.
absl::StatusOr<int64_t> IntInRange(const Args& a, const std::string& name, int64_t fallback,
                                   int64_t lo, int64_t hi) {
  auto v = a.GetInt(name, fallback);
  if (!v.ok()) return v.status();
  if (*v < lo || *v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be in [", lo, ", ", hi, "], got ", *v));
  }
  return v;
}

std::unique_ptr<v1::DecodeService::Stub> MakeStub(const std::string& server) {
  return v1::DecodeService::NewStub(
      grpc::CreateChannel(server, grpc::InsecureChannelCredentials()));
}

void WriteStdout(const std::string& text) {
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

// Client-side decode rate: tokens after the first token-bearing message over the time from it
// to the last one. 0 when there is not enough to measure.
double ClientDecodeRate(const StreamStats& st) {
  double sum = 0;
  for (double x : st.itl_s) sum += x;
  return sum > 0 ? static_cast<double>(st.itl_s.size()) / sum : 0.0;
}

// The end-of-reply report of `duet generate`, on stderr.
void PrintGenerateSummary(const StreamStats& st) {
  if (!st.session_id.empty()) std::fprintf(stderr, "session: %s\n", st.session_id.c_str());
  if (st.summary) {
    const v1::GenerateSummary& s = *st.summary;
    std::fprintf(stderr, "finish: %s  prompt tokens: %u  generated tokens: %u",
                 FinishReasonName(s.finish_reason()).c_str(), s.prompt_tokens(),
                 s.generated_tokens());
    if (s.generated_tokens() != st.n_tokens)
      std::fprintf(stderr, " (received %" PRId64 ")", st.n_tokens);
    if (s.prefilled_locally()) {
      std::fprintf(stderr, "  prefilled locally");
    } else if (s.kv_transfer_bytes() > 0) {
      std::fprintf(stderr, "  K/V received: %" PRIu64 " bytes", s.kv_transfer_bytes());
    }
    std::fprintf(stderr, "\n");
  } else {
    std::fprintf(stderr,
                 "finish: none (the server sent no summary)  generated tokens: %" PRId64
                 " (received)\n",
                 st.n_tokens);
  }
  if (st.ttft_s) {
    std::fprintf(stderr, "TTFT: %.1f ms (client)", *st.ttft_s * 1e3);
  } else {
    std::fprintf(stderr, "TTFT: - (client, no tokens)");
  }
  if (st.summary) std::fprintf(stderr, ", %.1f ms (server)", st.summary->ttft_ns() / 1e6);
  std::fprintf(stderr, "  decode: %.1f tokens/s (client)", ClientDecodeRate(st));
  if (st.summary && st.summary->decode_ns() > 0 && st.summary->generated_tokens() > 1) {
    std::fprintf(stderr, ", %.1f tokens/s (server)",
                 (st.summary->generated_tokens() - 1) / (st.summary->decode_ns() / 1e9));
  }
  std::fprintf(stderr, "\n");
}

}  // namespace

std::string StatusCodeName(grpc::StatusCode code) {
  // gRPC's codes are the canonical codes, numbered as absl::StatusCode is.
  std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? absl::StrCat("CODE_", static_cast<int>(code)) : name;
}

std::string FinishReasonName(v1::FinishReason r) {
  switch (r) {
    case v1::FINISH_REASON_EOS:
      return "eos";
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_LENGTH:
      return "length";
    default:
      return "unspecified";
  }
}

absl::Status ParseSamplingFlags(const Args& a, v1::GenerateRequest* req) {
  auto temperature = a.GetDouble("temperature", 0.8);
  auto top_k = IntInRange(a, "top-k", 0, 0, INT32_MAX);
  auto top_p = a.GetDouble("top-p", 1.0);
  auto min_p = a.GetDouble("min-p", 0.0);
  auto rep = a.GetDouble("repetition-penalty", 1.0);
  auto seed = IntInRange(a, "seed", 0, 0, INT64_MAX);
  auto max_tokens = IntInRange(a, "max-tokens", 128, 1, INT32_MAX);
  for (const absl::Status& s : {temperature.status(), top_k.status(), top_p.status(),
                                min_p.status(), rep.status(), seed.status(), max_tokens.status()})
    if (!s.ok()) return s;
  // The same rules the server applies, so obvious mistakes fail here, before any RPC.
  duet::sampling::SamplingParams p;
  p.temperature = static_cast<float>(*temperature);
  p.top_k = static_cast<int32_t>(*top_k);
  p.top_p = static_cast<float>(*top_p);
  p.min_p = static_cast<float>(*min_p);
  p.repetition_penalty = static_cast<float>(*rep);
  p.seed = static_cast<uint64_t>(*seed);
  if (auto s = duet::sampling::Validate(p); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("bad sampling flag: ", s.message()));
  }
  v1::SamplingParams* sp = req->mutable_sampling();
  sp->set_temperature(p.temperature);
  sp->set_top_k(p.top_k);
  sp->set_top_p(p.top_p);
  sp->set_min_p(p.min_p);
  sp->set_repetition_penalty(p.repetition_penalty);
  sp->set_seed(p.seed);
  v1::StoppingParams* stop = req->mutable_stopping();
  stop->set_max_tokens(static_cast<int32_t>(*max_tokens));
  for (const std::string& s : a.GetAll("stop")) {
    if (s.empty()) return absl::InvalidArgumentError("--stop must not be empty");
    stop->add_stop(s);
  }
  stop->set_ignore_eos(a.Has("ignore-eos"));
  return absl::OkStatus();
}

grpc::Status StreamGenerate(v1::DecodeService::StubInterface& stub, const v1::GenerateRequest& req,
                            double timeout_s,
                            const std::function<void(const std::string&)>& on_text,
                            StreamStats* stats) {
  *stats = StreamStats{};
  grpc::ClientContext ctx;
  if (timeout_s > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::microseconds(static_cast<int64_t>(timeout_s * 1e6)));
  }
  const Clock::time_point t0 = Clock::now();
  auto since_start = [t0] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  std::unique_ptr<grpc::ClientReaderInterface<v1::GenerateResponse>> reader =
      stub.Generate(&ctx, req);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    const double t = since_start();
    ++stats->n_messages;
    if (stats->session_id.empty() && !msg.session_id().empty()) {
      stats->session_id = msg.session_id();
    }
    if (const int k = msg.token_ids_size(); k > 0) {
      if (stats->last_token_s) {
        const double gap = (t - *stats->last_token_s) / k;
        stats->itl_s.insert(stats->itl_s.end(), k, gap);
      } else {
        stats->ttft_s = t;
      }
      stats->last_token_s = t;
      stats->n_tokens += k;
    }
    if (!msg.text().empty()) {
      stats->text += msg.text();
      if (on_text) on_text(msg.text());
    }
    if (msg.has_summary()) stats->summary = msg.summary();
  }
  grpc::Status status = reader->Finish();
  stats->e2e_s = since_start();
  return status;
}

// ---- generate ----

int GenerateMain(int argc, char** argv) {
  constexpr const char* kCmd = "generate";
  auto a =
      Args::Parse(argc, argv, With(kSamplingFlags, {"server", "prompt", "session", "timeout-s"}),
                  {"ignore-eos", "open-session"});
  if (!a.ok()) return UsageError(kCmd, a.status());
  auto server = ParseServer(*a);
  if (!server.ok()) return UsageError(kCmd, server.status());
  auto prompt = a->Require("prompt");
  if (!prompt.ok()) return UsageError(kCmd, prompt.status());
  auto timeout = ParseTimeout(*a);
  if (!timeout.ok()) return UsageError(kCmd, timeout.status());
  v1::GenerateRequest req;
  if (auto s = ParseSamplingFlags(*a, &req); !s.ok()) return UsageError(kCmd, s);
  if (auto session = a->Get("session")) {
    if (session->empty()) {
      return UsageError(kCmd, absl::InvalidArgumentError("--session must not be empty"));
    }
    req.mutable_turn()->set_session_id(*session);
    req.mutable_turn()->set_text(*prompt);
    req.set_open_session(true);  // a turn always keeps its session
  } else {
    req.set_prompt(*prompt);
    req.set_open_session(a->Has("open-session"));
  }

  auto stub = MakeStub(*server);
  StreamStats st;
  const grpc::Status s = StreamGenerate(*stub, req, *timeout, WriteStdout, &st);
  if (s.ok() || !st.text.empty()) WriteStdout("\n");
  if (!s.ok()) return RpcError(kCmd, s);
  PrintGenerateSummary(st);
  return 0;
}

// ---- chat ----

int ChatMainWithInput(int argc, char** argv, std::istream& in) {
  constexpr const char* kCmd = "chat";
  auto a = Args::Parse(argc, argv, With(kSamplingFlags, {"server", "timeout-s"}), {"ignore-eos"});
  if (!a.ok()) return UsageError(kCmd, a.status());
  auto server = ParseServer(*a);
  if (!server.ok()) return UsageError(kCmd, server.status());
  auto timeout = ParseTimeout(*a);
  if (!timeout.ok()) return UsageError(kCmd, timeout.status());
  v1::GenerateRequest base;  // sampling and stopping, shared by every turn
  if (auto s = ParseSamplingFlags(*a, &base); !s.ok()) return UsageError(kCmd, s);

  auto stub = MakeStub(*server);
  std::string session_id;  // empty until the first reply names the session
  // The conversation as text (prompts, replies and turns, joined as the session joins their
  // tokens): if the server loses the session (its decode pod went away, its TTL passed), the next
  // turn opens a new session with all of it.
  std::string conversation;
  int rc = 0;
  for (std::string line;;) {
    std::fputs("> ", stderr);
    std::fflush(stderr);
    if (!std::getline(in, line)) {
      std::fputs("\n", stderr);
      break;
    }
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line == "/quit") break;
    if (line.empty()) continue;

    auto request = [&]() {
      v1::GenerateRequest req = base;
      req.set_open_session(true);
      if (session_id.empty()) {
        req.set_prompt(conversation + line);
      } else {
        req.mutable_turn()->set_session_id(session_id);
        req.mutable_turn()->set_text(line);
      }
      return req;
    };
    StreamStats st;
    grpc::Status s = StreamGenerate(*stub, request(), *timeout, WriteStdout, &st);
    if (!s.ok() && s.error_code() == grpc::StatusCode::NOT_FOUND && !session_id.empty() &&
        st.text.empty()) {
      std::fprintf(stderr,
                   "[session %s is gone on the server (%s); continuing in a new session with the "
                   "conversation so far]\n",
                   session_id.c_str(), s.error_message().c_str());
      session_id.clear();
      st = StreamStats();
      s = StreamGenerate(*stub, request(), *timeout, WriteStdout, &st);
    }
    if (s.ok() || !st.text.empty()) WriteStdout("\n");
    if (!s.ok()) {
      rc = RpcError(kCmd, s);
      break;
    }
    conversation += line + st.text;
    if (session_id.empty()) {
      if (st.session_id.empty()) {
        std::fprintf(stderr, "duet %s: the server opened no session (empty session_id)\n", kCmd);
        rc = 1;
        break;
      }
      session_id = st.session_id;
    }
    std::fprintf(stderr, "[%s, %" PRId64 " tokens, TTFT %.1f ms]\n",
                 st.summary ? FinishReasonName(st.summary->finish_reason()).c_str() : "no summary",
                 st.n_tokens, st.ttft_s ? *st.ttft_s * 1e3 : 0.0);
  }

  if (!session_id.empty()) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::CloseSessionRequest close;
    close.set_session_id(session_id);
    v1::CloseSessionResponse closed;
    const grpc::Status s = stub->CloseSession(&ctx, close, &closed);
    // NOT_FOUND: the session is already gone (its TTL expired); nothing is left to free.
    if (!s.ok() && s.error_code() != grpc::StatusCode::NOT_FOUND) {
      std::fprintf(stderr, "duet %s: CloseSession %s: %s: %s\n", kCmd, session_id.c_str(),
                   StatusCodeName(s.error_code()).c_str(), s.error_message().c_str());
      rc = 1;
    }
  }
  return rc;
}

int ChatMain(int argc, char** argv) { return ChatMainWithInput(argc, argv, std::cin); }

// ---- bench ----

std::vector<std::vector<int32_t>> MakeBenchPrompts(const BenchOptions& opt) {
  std::mt19937_64 rng(opt.seed);
  std::uniform_int_distribution<int32_t> id(kBenchMinId, kBenchMaxId - 1);
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(opt.requests));
  for (auto& p : prompts) {
    p.resize(static_cast<size_t>(opt.prompt_tokens));
    for (int32_t& t : p) t = id(rng);
  }
  return prompts;
}

std::optional<double> Percentile(std::vector<double>& v, double q) {
  if (v.empty()) return std::nullopt;
  std::sort(v.begin(), v.end());
  const double pos = q / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

namespace {

Percentiles PercentilesOf(std::vector<double> v_ms) {
  Percentiles p;
  p.p50 = Percentile(v_ms, 50);
  p.p90 = Percentile(v_ms, 90);
  p.p99 = Percentile(v_ms, 99);
  return p;
}

}  // namespace

BenchReport RunBench(v1::DecodeService::StubInterface& stub, const BenchOptions& opt) {
  const std::vector<std::vector<int32_t>> prompts = MakeBenchPrompts(opt);
  struct Outcome {
    grpc::Status status;
    StreamStats stats;
  };
  std::vector<Outcome> outcomes(prompts.size());
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i; (i = next.fetch_add(1)) < prompts.size();) {
      v1::GenerateRequest req;
      req.mutable_prompt_tokens()->mutable_token_ids()->Add(prompts[i].begin(), prompts[i].end());
      req.mutable_sampling()->set_temperature(0);
      req.mutable_stopping()->set_max_tokens(static_cast<int32_t>(opt.max_tokens));
      req.mutable_stopping()->set_ignore_eos(true);
      outcomes[i].status = StreamGenerate(stub, req, opt.timeout_s, {}, &outcomes[i].stats);
    }
  };
  const int64_t n_threads = std::max<int64_t>(1, std::min(opt.concurrency, opt.requests));
  const Clock::time_point t0 = Clock::now();
  std::vector<std::thread> threads;
  for (int64_t t = 0; t < n_threads; ++t) threads.emplace_back(worker);
  for (std::thread& t : threads) t.join();

  BenchReport r;
  r.options = opt;
  r.wall_s = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<double> ttft_ms, itl_ms, e2e_ms;
  for (const Outcome& o : outcomes) {
    if (!o.status.ok()) {
      ++r.failures[StatusCodeName(o.status.error_code())];
      if (r.first_error.empty()) {
        r.first_error =
            absl::StrCat(StatusCodeName(o.status.error_code()), ": ", o.status.error_message());
      }
      continue;
    }
    ++r.n_ok;
    r.output_tokens += o.stats.n_tokens;
    if (o.stats.n_tokens != opt.max_tokens) ++r.n_short;
    if (o.stats.ttft_s) ttft_ms.push_back(*o.stats.ttft_s * 1e3);
    for (double x : o.stats.itl_s) itl_ms.push_back(x * 1e3);
    e2e_ms.push_back(o.stats.e2e_s * 1e3);
  }
  if (r.wall_s > 0) {
    r.requests_per_s = static_cast<double>(r.n_ok) / r.wall_s;
    r.output_tokens_per_s = static_cast<double>(r.output_tokens) / r.wall_s;
  }
  r.ttft_ms = PercentilesOf(std::move(ttft_ms));
  r.itl_ms = PercentilesOf(std::move(itl_ms));
  r.e2e_ms = PercentilesOf(std::move(e2e_ms));
  return r;
}

std::string FormatBenchTable(const BenchReport& r) {
  auto line = [](const char* fmt, auto... args) {
    char buf[256];
    std::snprintf(buf, sizeof buf, fmt, args...);
    return std::string(buf);
  };
  auto cell = [](const std::optional<double>& v) {
    if (!v) return std::string("-");
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f", *v);
    return std::string(buf);
  };
  const BenchOptions& o = r.options;
  std::string out = line("duet bench: concurrency %" PRId64 ", prompt %" PRId64 " tokens, %" PRId64
                         " output tokens, seed %" PRIu64 "\n",
                         o.concurrency, o.prompt_tokens, o.max_tokens, o.seed);
  out += line("%-18s %" PRId64 "\n", "requests", o.requests);
  out += line("%-18s %" PRId64 "\n", "succeeded", r.n_ok);
  int64_t n_failed = 0;
  std::string by_code;
  for (const auto& [code, n] : r.failures) {
    n_failed += n;
    by_code += absl::StrCat(by_code.empty() ? " (" : ", ", code, ": ", n);
  }
  if (!by_code.empty()) by_code += ")";
  out += line("%-18s %" PRId64 "%s\n", "failures", n_failed, by_code.c_str());
  out += line("%-18s %.3f s\n", "wall time", r.wall_s);
  out += line("%-18s %.2f\n", "requests/s", r.requests_per_s);
  out += line("%-18s %.1f\n", "output tokens/s", r.output_tokens_per_s);
  out += line("%-18s %10s %10s %10s\n", "latency (ms)", "p50", "p90", "p99");
  for (const auto& [name, p] : {std::pair<const char*, const Percentiles&>{"TTFT", r.ttft_ms},
                                {"ITL", r.itl_ms},
                                {"E2E", r.e2e_ms}}) {
    out += line("%-18s %10s %10s %10s\n", name, cell(p.p50).c_str(), cell(p.p90).c_str(),
                cell(p.p99).c_str());
  }
  return out;
}

nlohmann::json BenchReportJson(const BenchReport& r) {
  auto ms = [](const Percentiles& p) {
    auto v = [](const std::optional<double>& x) { return x ? nlohmann::json(*x) : nullptr; };
    return nlohmann::json{{"p50", v(p.p50)}, {"p90", v(p.p90)}, {"p99", v(p.p99)}};
  };
  nlohmann::json failures = nlohmann::json::object();
  int64_t n_failed = 0;
  for (const auto& [code, n] : r.failures) {
    failures[code] = n;
    n_failed += n;
  }
  return nlohmann::json{
      {"requests", r.options.requests},
      {"succeeded", r.n_ok},
      {"failed", n_failed},
      {"failures", failures},
      {"wall_s", r.wall_s},
      {"requests_per_s", r.requests_per_s},
      {"output_tokens", r.output_tokens},
      {"output_tokens_per_s", r.output_tokens_per_s},
      {"ttft_ms", ms(r.ttft_ms)},
      {"itl_ms", ms(r.itl_ms)},
      {"e2e_ms", ms(r.e2e_ms)},
      {"concurrency", r.options.concurrency},
      {"prompt_tokens", r.options.prompt_tokens},
      {"max_tokens", r.options.max_tokens},
      {"seed", r.options.seed},
  };
}

int BenchMain(int argc, char** argv) {
  constexpr const char* kCmd = "bench";
  auto a = Args::Parse(argc, argv,
                       {"server", "concurrency", "requests", "prompt-tokens", "max-tokens", "seed",
                        "json", "timeout-s"},
                       {});
  if (!a.ok()) return UsageError(kCmd, a.status());
  auto server = ParseServer(*a);
  if (!server.ok()) return UsageError(kCmd, server.status());
  for (const char* name : {"concurrency", "requests", "prompt-tokens", "max-tokens"}) {
    if (!a->Has(name)) {
      return UsageError(kCmd, absl::InvalidArgumentError(
                                  absl::StrCat("missing required flag --", std::string(name))));
    }
  }
  auto concurrency = IntInRange(*a, "concurrency", 1, 1, 4096);
  auto requests = IntInRange(*a, "requests", 1, 1, 10'000'000);
  auto prompt_tokens = IntInRange(*a, "prompt-tokens", 1, 1, 1 << 20);
  auto max_tokens = IntInRange(*a, "max-tokens", 1, 1, 1 << 20);
  auto seed = IntInRange(*a, "seed", 0, 0, INT64_MAX);
  auto timeout = ParseTimeout(*a);
  for (const absl::Status& s : {concurrency.status(), requests.status(), prompt_tokens.status(),
                                max_tokens.status(), seed.status(), timeout.status()})
    if (!s.ok()) return UsageError(kCmd, s);
  auto json_path = a->Get("json");
  if (json_path && json_path->empty()) {
    return UsageError(kCmd, absl::InvalidArgumentError("--json must not be empty"));
  }

  BenchOptions opt;
  opt.concurrency = *concurrency;
  opt.requests = *requests;
  opt.prompt_tokens = *prompt_tokens;
  opt.max_tokens = *max_tokens;
  // Without --seed, fresh prompts every run, so a prefix cache left by an earlier run cannot
  // help. The seed is reported so a run can be repeated with --seed; 53 bits keep it exact in
  // JSON and within --seed's range.
  if (a->Has("seed")) {
    opt.seed = static_cast<uint64_t>(*seed);
  } else {
    std::random_device rd;
    opt.seed = ((uint64_t{rd()} << 32) | rd()) & ((uint64_t{1} << 53) - 1);
  }
  opt.timeout_s = *timeout;

  auto stub = MakeStub(*server);
  const BenchReport r = RunBench(*stub, opt);
  WriteStdout(FormatBenchTable(r));
  if (!r.first_error.empty()) {
    std::fprintf(stderr, "duet %s: first failure: %s\n", kCmd, r.first_error.c_str());
  }
  if (r.n_short > 0) {
    std::fprintf(stderr,
                 "duet %s: warning: %" PRId64 " successful requests received other than %" PRId64
                 " tokens\n",
                 kCmd, r.n_short, opt.max_tokens);
  }
  if (json_path) {
    std::ofstream f(*json_path);
    f << BenchReportJson(r).dump(2) << "\n";
    f.close();
    if (!f) {
      std::fprintf(stderr, "duet %s: cannot write %s: %s\n", kCmd, json_path->c_str(),
                   std::strerror(errno));
      return 1;
    }
  }
  return r.failures.empty() ? 0 : 1;
}

}  // namespace duet::cli
