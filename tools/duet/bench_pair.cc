#include "bench_pair.h"

#include "bench_codec.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "args.h"
#include "client.h"
#include "duet/kernels/threads.h"
#include "duet/kv/block_pool.h"
#include "duet/kv/codec.h"
#include "duet/model/model.h"
#include "duet/v1/decode.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "random_model.h"

#ifndef DUET_SOURCE_DIR
#define DUET_SOURCE_DIR ""
#endif

namespace duet::cli {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr const char* kCmd = "bench-pair";
constexpr const char* kShape = "gpt2-124m";
constexpr int kPromptLens[] = {128, 512};
constexpr int kTtftReps = 3;    // one-process and pair rounds measured, after one warm-up
constexpr int kDecodeReps = 4;  // measured per session count, after one warm-up round
constexpr int kDecodePrompt = 32;
constexpr int kDecodeMaxTokens = 64;
constexpr int32_t kMinId = 10, kMaxId = 4096;  // prompt ids: valid in the tokenizer we copy
constexpr double kTtftRatioTarget = 1.15;
constexpr double kDecodeRatioTarget = 6.0;
constexpr double kCodecTargetGbS = 2.0;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// The last `n` bytes of a file, for error messages about a server that failed.
std::string Tail(const fs::path& p, size_t n = 2000) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  if (s.size() > n) s = "..." + s.substr(s.size() - n);
  return s;
}

// A server binary run as a child process: stdout is read until its "listening on HOST:PORT"
// line, stderr goes to a log file. The child gets SIGTERM if this process dies first.
// Stop() (also run by the destructor) sends SIGTERM and waits, then SIGKILL after a grace period.
class ChildServer {
 public:
  static absl::StatusOr<std::unique_ptr<ChildServer>> Start(const std::string& name,
                                                            const fs::path& binary,
                                                            const std::vector<std::string>& args,
                                                            const fs::path& log, double timeout_s) {
    std::error_code ec;
    if (!fs::is_regular_file(binary, ec)) {
      return absl::NotFoundError(
          absl::StrCat(name, " binary not found at ", binary.string(), " (build it, or pass --",
                       name == "duet-prefill" ? "prefill" : "decode", "-bin PATH)"));
    }
    int out[2];
    if (pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("pipe2 failed");
    const int log_fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (log_fd < 0) {
      close(out[0]);
      close(out[1]);
      return absl::InternalError(
          absl::StrCat("cannot open ", log.string(), ": ", std::strerror(errno)));
    }
    // argv is built before fork: the child only makes async-signal-safe calls.
    const std::string bin = binary.string();
    std::vector<std::string> strings = args;
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(bin.c_str()));
    for (std::string& a : strings) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) {
      close(out[0]);
      close(out[1]);
      close(log_fd);
      return absl::InternalError("fork failed");
    }
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != parent) _exit(127);
      // dup2 clears FD_CLOEXEC on the new descriptors; everything else closes on exec.
      dup2(out[1], 1);
      dup2(log_fd, 2);
      execv(bin.c_str(), argv.data());
      static const char kMsg[] = "exec failed\n";
      (void)!write(2, kMsg, sizeof kMsg - 1);
      _exit(127);
    }
    close(out[1]);
    close(log_fd);
    auto child = std::unique_ptr<ChildServer>(new ChildServer(name, pid, out[0], log));
    if (auto s = child->AwaitListening(timeout_s); !s.ok()) return s;
    return child;
  }

  ~ChildServer() { Stop(30); }
  ChildServer(const ChildServer&) = delete;
  ChildServer& operator=(const ChildServer&) = delete;

  const std::string& address() const { return address_; }
  const std::string& name() const { return name_; }
  const fs::path& log() const { return log_; }

  // SIGTERM, then waits up to grace_s (SIGKILL after that). A description of how it ended;
  // empty if it had already been stopped.
  std::string Stop(double grace_s) {
    if (pid_ <= 0) return "";
    kill(pid_, SIGTERM);
    const Clock::time_point t0 = Clock::now();
    int status = 0;
    std::string how;
    for (;;) {
      const pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        how = WIFEXITED(status) ? absl::StrCat("exited ", WEXITSTATUS(status))
                                : absl::StrCat("killed by signal ", WTERMSIG(status));
        break;
      }
      if (r < 0) {
        how = "already reaped";
        break;
      }
      if (Seconds(t0) > grace_s) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
        how = absl::StrCat("did not stop within ", grace_s, " s; killed");
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    pid_ = -1;
    close(out_);
    return absl::StrCat(how, " after ", static_cast<int>(Seconds(t0) * 1e3), " ms");
  }

 private:
  ChildServer(std::string name, pid_t pid, int out, fs::path log)
      : name_(std::move(name)), pid_(pid), out_(out), log_(std::move(log)) {}

  absl::Status AwaitListening(double timeout_s) {
    const Clock::time_point t0 = Clock::now();
    std::string buf;
    while (Seconds(t0) < timeout_s) {
      pollfd p{out_, POLLIN, 0};
      if (poll(&p, 1, 100) > 0) {
        char c[512];
        const ssize_t n = read(out_, c, sizeof c);
        if (n <= 0) {  // stdout closed: the child is exiting
          const std::string how = Stop(5);
          return absl::UnavailableError(absl::StrCat(name_, " closed its stdout before listening (",
                                                     how, "); its log (", log_.string(), "):\n",
                                                     Tail(log_)));
        }
        buf.append(c, static_cast<size_t>(n));
        const size_t pos = buf.find("listening on ");
        const size_t nl = pos == std::string::npos ? pos : buf.find('\n', pos);
        if (nl != std::string::npos) {
          address_ = buf.substr(pos + 13, nl - pos - 13);
          return absl::OkStatus();
        }
      }
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        close(out_);
        return absl::UnavailableError(absl::StrCat(name_, " exited before listening; its log (",
                                                   log_.string(), "):\n", Tail(log_)));
      }
    }
    Stop(5);
    return absl::DeadlineExceededError(absl::StrCat(name_, " did not print its address within ",
                                                    timeout_s, " s; its log (", log_.string(),
                                                    "):\n", Tail(log_)));
  }

  std::string name_;
  pid_t pid_ = -1;
  int out_ = -1;
  fs::path log_;
  std::string address_;
};

std::vector<int32_t> RandomPrompt(std::mt19937_64& gen, int n) {
  std::uniform_int_distribution<int32_t> dist(kMinId, kMaxId - 1);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t& x : t) x = dist(gen);
  return t;
}

absl::Status RpcError(const std::string& what, const grpc::Status& s) {
  return absl::InternalError(
      absl::StrCat(what, ": ", StatusCodeName(s.error_code()), ": ", s.error_message()));
}

struct PrefillFigures {
  double one_process_s = 1e30;  // best Model::Forward of the prompt into a fresh cache
  double pair_ttft_s = 1e30;    // best client-side send -> first token message
  double server_ttft_s = 0;     // the decode server's summary.ttft_ns of that best request
};

// For each prompt length: 1 + kTtftReps rounds (the first a warm-up), each round one
// one-process pass and then one request through the pair, so both see the same machine load.
// Prompts are fresh random ids every time. One request at a time; the caller's thread runs the
// passes.
absl::Status MeasurePrefill(model::Model& model, v1::DecodeService::Stub& stub,
                            std::mt19937_64& gen, std::map<int, PrefillFigures>* figures) {
  auto pool_or = kv::BlockPool::Create(model.kv_shape(16), 2 * (512 / 16) + 4);
  if (!pool_or.ok()) return pool_or.status();
  kv::BlockPool& pool = **pool_or;
  std::vector<float> logits;
  for (int n : kPromptLens) {
    PrefillFigures& f = (*figures)[n];
    for (int r = 0; r < 1 + kTtftReps; ++r) {
      {
        kv::SequenceKv kv(&pool);
        if (auto s = kv.Reserve(n); !s.ok()) return s;
        const std::vector<int32_t> tokens = RandomPrompt(gen, n);
        model::BatchItem item{tokens, &kv, false};
        const Clock::time_point t0 = Clock::now();
        if (auto s = model.Forward({&item, 1}, &logits); !s.ok()) return s;
        const double dt = Seconds(t0);
        if (r > 0) f.one_process_s = std::min(f.one_process_s, dt);
      }
      const std::vector<int32_t> prompt = RandomPrompt(gen, n);
      v1::GenerateRequest req;
      req.mutable_prompt_tokens()->mutable_token_ids()->Add(prompt.begin(), prompt.end());
      req.mutable_sampling()->set_temperature(0);
      req.mutable_stopping()->set_max_tokens(1);
      req.mutable_stopping()->set_ignore_eos(true);
      StreamStats st;
      const grpc::Status s = StreamGenerate(stub, req, 120, {}, &st);
      if (!s.ok()) return RpcError(absl::StrCat("Generate (", n, " prompt tokens)"), s);
      if (!st.ttft_s) {
        return absl::InternalError(
            absl::StrCat("Generate (", n, " prompt tokens) returned no token"));
      }
      if (r > 0 && *st.ttft_s < f.pair_ttft_s) {
        f.pair_ttft_s = *st.ttft_s;
        f.server_ttft_s = st.summary ? static_cast<double>(st.summary->ttft_ns()) * 1e-9 : 0;
      }
    }
    std::fprintf(stderr,
                 "%d prompt tokens: one-process %.1f ms, pair TTFT %.1f ms (decode-side "
                 "%.1f ms)\n",
                 n, f.one_process_s * 1e3, f.pair_ttft_s * 1e3, f.server_ttft_s * 1e3);
  }
  return absl::OkStatus();
}

struct DecodeFigures {
  double tokens_per_s = 0;  // all generated tokens / (last stream's end - first send)
  // Tokens received while every session was past its first token and none had its last yet,
  // per second of that window; nullopt when the window is empty.
  std::optional<double> steady_tokens_per_s;
};

// `sessions` concurrent Generate calls of kDecodePrompt random prompt tokens and
// kDecodeMaxTokens greedy tokens each (ignore_eos), all sent at once.
absl::StatusOr<DecodeFigures> DecodeRun(v1::DecodeService::Stub& stub, int sessions,
                                        std::mt19937_64& gen) {
  struct Outcome {
    grpc::Status status;
    StreamStats stats;
    double start_s = 0;  // send time, since t0
  };
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < sessions; ++i) prompts.push_back(RandomPrompt(gen, kDecodePrompt));
  std::vector<Outcome> outcomes(static_cast<size_t>(sessions));
  const Clock::time_point t0 = Clock::now();
  std::vector<std::thread> threads;
  for (int i = 0; i < sessions; ++i) {
    threads.emplace_back([&, i] {
      v1::GenerateRequest req;
      req.mutable_prompt_tokens()->mutable_token_ids()->Add(prompts[i].begin(), prompts[i].end());
      req.mutable_sampling()->set_temperature(0);
      req.mutable_stopping()->set_max_tokens(kDecodeMaxTokens);
      req.mutable_stopping()->set_ignore_eos(true);
      Outcome& o = outcomes[static_cast<size_t>(i)];
      o.start_s = Seconds(t0);
      o.status = StreamGenerate(stub, req, 300, {}, &o.stats);
    });
  }
  for (std::thread& t : threads) t.join();

  double first_send = 1e30, last_end = 0, window_begin = 0, window_end = 1e30;
  int64_t tokens = 0;
  for (const Outcome& o : outcomes) {
    if (!o.status.ok()) return RpcError(absl::StrCat(sessions, " concurrent sessions"), o.status);
    if (o.stats.n_tokens != kDecodeMaxTokens || !o.stats.ttft_s || !o.stats.last_token_s) {
      return absl::InternalError(absl::StrCat("a session received ", o.stats.n_tokens,
                                              " tokens, expected ", kDecodeMaxTokens));
    }
    tokens += o.stats.n_tokens;
    first_send = std::min(first_send, o.start_s);
    last_end = std::max(last_end, o.start_s + o.stats.e2e_s);
    window_begin = std::max(window_begin, o.start_s + *o.stats.ttft_s);
    window_end = std::min(window_end, o.start_s + *o.stats.last_token_s);
  }
  DecodeFigures f;
  f.tokens_per_s = static_cast<double>(tokens) / (last_end - first_send);
  if (window_end > window_begin) {
    // Token arrival times: the first token-bearing message, then the inter-token gaps.
    int64_t in_window = 0;
    for (const Outcome& o : outcomes) {
      double t = o.start_s + *o.stats.ttft_s;
      for (double gap : o.stats.itl_s) {
        t += gap;
        if (t > window_begin && t <= window_end) ++in_window;
      }
    }
    f.steady_tokens_per_s = static_cast<double>(in_window) / (window_end - window_begin);
  }
  return f;
}

// Best of kDecodeReps runs (by tokens_per_s) for 1 and 16 sessions, after one 16-session
// warm-up (so the decode engine has seen every batch size up to 16).
absl::Status MeasureDecode(v1::DecodeService::Stub& stub, std::mt19937_64& gen,
                           std::map<int, DecodeFigures>* figures) {
  if (auto w = DecodeRun(stub, 16, gen); !w.ok()) return w.status();
  for (int sessions : {1, 16}) {
    DecodeFigures best;
    for (int r = 0; r < kDecodeReps; ++r) {
      auto f = DecodeRun(stub, sessions, gen);
      if (!f.ok()) return f.status();
      if (f->tokens_per_s > best.tokens_per_s) best = *f;
    }
    (*figures)[sessions] = best;
    std::fprintf(stderr, "decode, %d session(s): %.1f tokens/s (steady %.1f)\n", sessions,
                 best.tokens_per_s, best.steady_tokens_per_s.value_or(0));
  }
  return absl::OkStatus();
}

fs::path DefaultBinary(const char* rel) {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return fs::path(rel).filename();
  return (exe.parent_path() / rel).lexically_normal();
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "duet %s: %s\n", kCmd, std::string(s.message()).c_str());
  return 1;
}

int Usage(const std::string& msg) {
  std::fprintf(stderr, "duet %s: %s\n", kCmd, msg.c_str());
  return 2;
}

}  // namespace

int BenchPairMain(int argc, char** argv) {
  auto a = Args::Parse(
      argc, argv,
      {"json", "threads", "workdir", "prefill-bin", "decode-bin", "tokenizer", "kv-cache-dtype"},
      {});
  if (!a.ok()) return Usage(std::string(a.status().message()));
  // Both servers run on this one machine, as they would on two nodes of their own: by default each
  // gets half the cores (and the one-process reference the same count). Giving each all cores
  // oversubscribes them, and OpenMP barriers then wait for descheduled threads.
  const int half_cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / 2);
  const auto threads = a->GetInt("threads", half_cores);
  if (!threads.ok() || *threads <= 0 || *threads > 4096) {
    return Usage("--threads must be a positive integer");
  }
  const int n_threads = static_cast<int>(*threads);
  const std::string kv_cache_s = a->Get("kv-cache-dtype").value_or("f32");
  const auto kv_cache_dtype = model::ParseKvCacheDtype(kv_cache_s);
  if (!kv_cache_dtype.ok()) return Usage(std::string(kv_cache_dtype.status().message()));
  const fs::path workdir =
      a->Get("workdir").value_or((fs::temp_directory_path() / "duet-bench-pair").string());
  const fs::path prefill_bin =
      a->Get("prefill-bin").value_or(DefaultBinary("../../prefill_service/duet-prefill").string());
  const fs::path decode_bin =
      a->Get("decode-bin").value_or(DefaultBinary("../../decode_service/duet-decode").string());
  const std::string default_tok =
      std::string(DUET_SOURCE_DIR).empty()
          ? std::string()
          : (fs::path(DUET_SOURCE_DIR) / "models" / "duet-tiny" / "tokenizer.json").string();
  const fs::path tokenizer = a->Get("tokenizer").value_or(default_tok);
  std::error_code ec;
  if (tokenizer.empty() || !fs::is_regular_file(tokenizer, ec)) {
    return Usage(absl::StrCat("no tokenizer.json at \"", tokenizer.string(),
                              "\"; pass --tokenizer FILE (e.g. models/duet-tiny/tokenizer.json)"));
  }

  // The model: random bf16 weights of the GPT-2-124M shape, plus a tokenizer for the servers.
  const ModelShape shape = ShapeByName(kShape);
  const fs::path model_dir = workdir / shape.name;
  std::fprintf(stderr, "writing random %s weights to %s (skipped if present)\n", shape.name.c_str(),
               model_dir.c_str());
  if (auto s = WriteRandomModel(shape, model_dir); !s.ok()) return Fail(s);
  fs::copy_file(tokenizer, model_dir / "tokenizer.json", fs::copy_options::overwrite_existing, ec);
  if (ec) {
    return Fail(absl::InternalError(absl::StrCat("cannot copy ", tokenizer.string(), " to ",
                                                 model_dir.string(), ": ", ec.message())));
  }

  json out;
  out["model"] = shape.name;
  out["threads"] = n_threads;
  out["kv_cache_dtype"] = kv_cache_s;
  std::mt19937_64 gen(20240611);

  // The in-process model (for the one-process figures and the K/V shape).
  kernels::SetNumThreads(n_threads);
  auto model = model::Model::Load(model_dir, {kernels::Precision::kBF16, *kv_cache_dtype});
  if (!model.ok()) return Fail(model.status());
  const kv::KvShape kv_shape = (*model)->kv_shape(16);
  const std::pair<const char*, v1::KvDtype> kDtypes[] = {
      {"f32", v1::KV_DTYPE_F32}, {"bf16", v1::KV_DTYPE_BF16}, {"int8", v1::KV_DTYPE_INT8}};
  for (const auto& [name, dtype] : kDtypes) {
    out["kv_bytes_per_token"][name] = kv::WireBytesPerToken(kv_shape, dtype);
  }

  // The pair. Servers are stopped when `prefill` and `decode` go out of scope, on every path;
  // the normal path stops them explicitly to report how they ended. They are started from this
  // (the main) thread, which lives until the end: the children's PR_SET_PDEATHSIG follows it.
  std::map<int, PrefillFigures> prefill_figs;
  std::map<int, DecodeFigures> decode_figs;
  std::string prefill_end, decode_end;
  {
    const std::string threads_s = std::to_string(n_threads);
    std::fprintf(stderr, "starting %s\n", prefill_bin.c_str());
    auto prefill = ChildServer::Start(
        "duet-prefill", prefill_bin,
        {"--model", model_dir.string(), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--threads", threads_s, "--kv-cache-dtype", kv_cache_s},
        workdir / "duet-prefill.log", 120);
    if (!prefill.ok()) return Fail(prefill.status());
    std::fprintf(stderr, "starting %s\n", decode_bin.c_str());
    auto decode = ChildServer::Start(
        "duet-decode", decode_bin,
        {"--model", model_dir.string(), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--threads", threads_s, "--kv-cache-dtype", kv_cache_s,
         "--prefill", (*prefill)->address(), "--kv-dtype", "bf16", "--kv-cache-mb", "256"},
        workdir / "duet-decode.log", 120);
    if (!decode.ok()) return Fail(decode.status());
    std::fprintf(stderr, "duet-prefill on %s, duet-decode on %s (logs in %s)\n",
                 (*prefill)->address().c_str(), (*decode)->address().c_str(), workdir.c_str());

    auto channel = grpc::CreateChannel((*decode)->address(), grpc::InsecureChannelCredentials());
    if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(30))) {
      return Fail(absl::UnavailableError(
          absl::StrCat("cannot connect to duet-decode at ", (*decode)->address())));
    }
    auto stub = v1::DecodeService::NewStub(channel);
    // The measurements run on an engine thread that sets its own thread count, as duet-prefill
    // runs its passes (the weights were loaded on the main thread, as there). On a loaded
    // machine this matters: passes on the main thread measured several times slower than
    // duet-prefill's in our runs, and as fast once GOMP_SPINCOUNT was lowered, so most likely
    // libgomp spins longer (against other processes) when a process has no more OpenMP threads
    // than CPUs, as with main thread + one worker.
    absl::Status st;
    std::thread engine([&] {
      kernels::SetNumThreads(n_threads);
      st = MeasurePrefill(**model, *stub, gen, &prefill_figs);
      model->reset();  // not needed for decode; frees its memory
      if (st.ok()) st = MeasureDecode(*stub, gen, &decode_figs);
    });
    engine.join();
    if (!st.ok()) {
      return Fail(absl::Status(
          st.code(), absl::StrCat(st.message(), "\n(server logs: ", (*prefill)->log().string(),
                                  ", ", (*decode)->log().string(), ")")));
    }
    decode_end = (*decode)->Stop(30);
    prefill_end = (*prefill)->Stop(30);
  }

  for (int n : kPromptLens) {
    const std::string k = std::to_string(n);
    const double one = prefill_figs[n].one_process_s, pair = prefill_figs[n].pair_ttft_s;
    out["prefill_one_process_ms"][k] = one * 1e3;
    out["ttft_pair_ms"][k] = pair * 1e3;
    out["ttft_ratio"][k] = pair / one;
  }
  const double d1 = decode_figs[1].tokens_per_s, d16 = decode_figs[16].tokens_per_s;
  out["decode_tokens_per_s"]["1"] = d1;
  out["decode_tokens_per_s"]["16"] = d16;
  out["decode_ratio_16_over_1"] = d16 / d1;
  for (int n : {1, 16}) {
    const auto& steady = decode_figs[n].steady_tokens_per_s;
    out["decode_steady_tokens_per_s"][std::to_string(n)] = steady ? json(*steady) : json(nullptr);
  }
  // 0 when a run had no window in which every session was decoding.
  const double steady_ratio =
      decode_figs[1].steady_tokens_per_s && decode_figs[16].steady_tokens_per_s
          ? decode_figs[16].steady_tokens_per_s.value_or(0) /
                decode_figs[1].steady_tokens_per_s.value_or(1)
          : 0.0;
  out["decode_steady_ratio_16_over_1"] = steady_ratio;

  auto verdict = [](bool ok) { return ok ? "meets target" : "MISSES target"; };
  std::printf("\nduet bench-pair  (%s shape, random bf16 weights, %d threads per process)\n",
              shape.name.c_str(), n_threads);
  std::printf(
      "\nprefill vs TTFT (best of %d after 1 warm-up, one request at a time, the two\n"
      "alternating)\n",
      kTtftReps);
  std::printf("  %-8s %16s %14s %16s %8s\n", "prompt", "one-process ms", "pair TTFT ms",
              "(decode-side ms)", "ratio");
  for (int n : kPromptLens) {
    const std::string k = std::to_string(n);
    const double ratio = out["ttft_ratio"][k].get<double>();
    std::printf("  %-8d %16.1f %14.1f %16.1f %8.2f  %s (<= %.2f)\n", n,
                out["prefill_one_process_ms"][k].get<double>(),
                out["ttft_pair_ms"][k].get<double>(), prefill_figs[n].server_ttft_s * 1e3, ratio,
                verdict(ratio <= kTtftRatioTarget), kTtftRatioTarget);
  }
  std::printf(
      "  (pair TTFT: client send -> first token message, over gRPC on 127.0.0.1;\n"
      "   decode-side: the summary's ttft_ns, request arrival -> first token written)\n");
  std::printf("\ndecode through the pair (prompt %d tokens, %d generated, greedy, ignore_eos)\n",
              kDecodePrompt, kDecodeMaxTokens);
  auto steady = [&](int n) {
    const auto& v = decode_figs[n].steady_tokens_per_s;
    return v ? absl::StrFormat("%14.1f", *v) : absl::StrFormat("%14s", "-");
  };
  std::printf("  %-12s %14s %14s\n", "", "tokens/s", "steady");
  std::printf("  %-12s %14.1f %s\n", "1 session", d1, steady(1).c_str());
  std::printf("  %-12s %14.1f %s\n", "16 sessions", d16, steady(16).c_str());
  std::printf("  %-12s %13.2fx %13.2fx\n", "16 / 1", d16 / d1, steady_ratio);
  std::printf("  16 / 1, wall time:   %s (>= %.0f)\n", verdict(d16 / d1 >= kDecodeRatioTarget),
              kDecodeRatioTarget);
  std::printf("  16 / 1, steady:      %s (>= %.0f)\n",
              verdict(steady_ratio >= kDecodeRatioTarget), kDecodeRatioTarget);
  std::printf(
      "  (tokens/s: all generated tokens / wall time from the first request's send to the\n"
      "   last stream's end, so the 16 prompts' prefill and K/V transfer are included.\n"
      "   steady: tokens received while every session was between its first and last\n"
      "   token, per second of that window: the decode service's own rate. Both ratios are\n"
      "   printed; the wall-time one is the stricter. Best of %d runs after one 16-session\n"
      "   warm-up)\n",
      kDecodeReps);
  std::printf("\nK/V on the wire per token (%d layers x %d kv heads x head_dim %d, K and V)\n",
              kv_shape.n_layers, kv_shape.n_kv_heads, kv_shape.head_dim);
  for (const char* d : {"f32", "bf16", "int8"}) {
    std::printf("  %-6s %8lld bytes\n", d,
                static_cast<long long>(out["kv_bytes_per_token"][d].get<int64_t>()));
  }
  // The K/V codec on the same K/V shape, in this run (its own table, then the verdicts).
  {
    std::printf("\n");
    std::fflush(stdout);
    const std::string codec_json = (workdir / "bench-codec.json").string();
    std::vector<std::string> cargs = {"--runs", "5", "--json", codec_json};
    std::vector<char*> cargv;
    for (auto& c : cargs) cargv.push_back(c.data());
    if (BenchCodecMain(static_cast<int>(cargv.size()), cargv.data()) != 0)
      return Fail(absl::InternalError("the codec benchmark failed"));
    std::ifstream f(codec_json);
    const json codec = json::parse(f, nullptr, /*allow_exceptions=*/false);
    if (codec.is_discarded() || !codec.contains("results"))
      return Fail(absl::InternalError(absl::StrCat("cannot read ", codec_json)));
    out["codec"] = codec;
    for (const auto& r : codec["results"]) {
      const double enc = r["encode_gb_s"].get<double>(), dec = r["decode_gb_s"].get<double>();
      std::printf(
          "  codec %-4s cache, %-4s wire: encode %6.2f GB/s, decode %6.2f GB/s: %s (>= %.0f GB/s "
          "each)",
          r["cache"].get<std::string>().c_str(), r["dtype"].get<std::string>().c_str(), enc, dec,
          verdict(enc >= kCodecTargetGbS && dec >= kCodecTargetGbS), kCodecTargetGbS);
      // GB/s counts the cache's bytes; a wire wider than the cache (an int8 cache sent as f32)
      // moves more, which the per-wire-byte figure shows.
      const double wire = r["wire_bytes_per_token"].get<double>();
      const double cache = r["cache_bytes_per_token"].get<double>();
      if (wire > cache) {
        std::printf("; the wire carries %.1fx the cache's bytes: %.2f / %.2f GB/s of wire",
                    wire / cache, enc * wire / cache, dec * wire / cache);
      }
      std::printf("\n");
    }
  }
  std::printf("\nservers stopped: duet-decode %s; duet-prefill %s\n", decode_end.c_str(),
              prefill_end.c_str());

  if (auto path = a->Get("json")) {
    std::ofstream f(*path);
    f << out.dump(2) << "\n";
    f.close();
    if (!f) {
      return Fail(absl::InternalError(absl::StrCat("cannot write ", *path)));
    }
  }
  return 0;
}

}  // namespace duet::cli
