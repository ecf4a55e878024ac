#include "bench_pair.h"

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
constexpr int kTtftReps = 3;          // measured, after one warm-up
constexpr int kPrefillReps = 3;       // measured, after one warm-up
constexpr int kDecodeReps = 2;        // measured per session count, after one warm-up round
constexpr int kDecodePrompt = 32;
constexpr int kDecodeMaxTokens = 64;
constexpr int32_t kMinId = 10, kMaxId = 4096;  // prompt ids: valid in the tokenizer we copy
constexpr double kTtftRatioTarget = 1.15;
constexpr double kDecodeRatioTarget = 6.0;

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
                                                            const fs::path& log,
                                                            double timeout_s) {
    std::error_code ec;
    if (!fs::is_regular_file(binary, ec)) {
      return absl::NotFoundError(
          absl::StrCat(name, " binary not found at ", binary.string(),
                       " (build it, or pass --", name == "duet-prefill" ? "prefill" : "decode",
                       "-bin PATH)"));
    }
    int out[2];
    if (pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("pipe2 failed");
    const int log_fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (log_fd < 0) {
      close(out[0]);
      close(out[1]);
      return absl::InternalError(absl::StrCat("cannot open ", log.string(), ": ",
                                              std::strerror(errno)));
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

// Best-of-kPrefillReps one-process prefill time (s) of each prompt length, one warm-up first,
// each pass into a fresh cache.
absl::Status MeasureOneProcess(model::Model& model, std::mt19937_64& gen, json* prefill_s) {
  auto pool_or = kv::BlockPool::Create(model.kv_shape(16), 2 * (512 / 16) + 4);
  if (!pool_or.ok()) return pool_or.status();
  kv::BlockPool& pool = **pool_or;
  std::vector<float> logits;
  for (int n : kPromptLens) {
    double best = 1e30;
    for (int r = 0; r < 1 + kPrefillReps; ++r) {
      kv::SequenceKv kv(&pool);
      if (auto s = kv.Reserve(n); !s.ok()) return s;
      const std::vector<int32_t> tokens = RandomPrompt(gen, n);
      model::BatchItem item{tokens, &kv, false};
      const Clock::time_point t0 = Clock::now();
      if (auto s = model.Forward({&item, 1}, &logits); !s.ok()) return s;
      const double dt = Seconds(t0);
      if (r > 0) best = std::min(best, dt);
    }
    (*prefill_s)[std::to_string(n)] = best;
    std::fprintf(stderr, "one-process prefill %d tokens: %.1f ms\n", n, best * 1e3);
  }
  return absl::OkStatus();
}

absl::Status RpcError(const std::string& what, const grpc::Status& s) {
  return absl::InternalError(
      absl::StrCat(what, ": ", StatusCodeName(s.error_code()), ": ", s.error_message()));
}

// Best-of-kTtftReps client-side TTFT (s) through the pair, one warm-up first; one request at a
// time. *server_s gets the decode server's own TTFT (summary.ttft_ns) of the best request.
absl::Status MeasureTtft(v1::DecodeService::Stub& stub, std::mt19937_64& gen, json* ttft_s,
                         json* server_s) {
  for (int n : kPromptLens) {
    double best = 1e30, best_server = 0;
    for (int r = 0; r < 1 + kTtftReps; ++r) {
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
      if (r > 0 && *st.ttft_s < best) {
        best = *st.ttft_s;
        best_server = st.summary ? static_cast<double>(st.summary->ttft_ns()) * 1e-9 : 0;
      }
    }
    (*ttft_s)[std::to_string(n)] = best;
    (*server_s)[std::to_string(n)] = best_server;
    std::fprintf(stderr, "pair TTFT %d tokens: %.1f ms (server-side %.1f ms)\n", n, best * 1e3,
                 best_server * 1e3);
  }
  return absl::OkStatus();
}

// Aggregate decode tokens/s with `sessions` concurrent requests: generated tokens received /
// wall time from the first request's send to the last stream's end (prefill included).
absl::StatusOr<double> DecodeRun(v1::DecodeService::Stub& stub, int sessions, uint64_t seed) {
  BenchOptions opt;
  opt.concurrency = sessions;
  opt.requests = sessions;
  opt.prompt_tokens = kDecodePrompt;
  opt.max_tokens = kDecodeMaxTokens;
  opt.seed = seed;
  opt.timeout_s = 300;
  const BenchReport r = RunBench(stub, opt);
  if (!r.failures.empty()) {
    return absl::InternalError(absl::StrCat(sessions, " concurrent sessions: ",
                                            r.failures.size(), " kinds of failure; first: ",
                                            r.first_error));
  }
  if (r.n_short > 0) {
    return absl::InternalError(absl::StrCat(r.n_short, " of ", sessions,
                                            " sessions received other than ", kDecodeMaxTokens,
                                            " tokens"));
  }
  return r.output_tokens_per_s;
}

absl::Status MeasureDecode(v1::DecodeService::Stub& stub, json* tps) {
  uint64_t seed = 1;
  // Warm-up: every batch size from 1 to 16 passes through the decode engine once.
  if (auto w = DecodeRun(stub, 16, seed++); !w.ok()) return w.status();
  for (int sessions : {1, 16}) {
    double best = 0;
    for (int r = 0; r < kDecodeReps; ++r) {
      auto t = DecodeRun(stub, sessions, seed++);
      if (!t.ok()) return t.status();
      best = std::max(best, *t);
    }
    (*tps)[std::to_string(sessions)] = best;
    std::fprintf(stderr, "decode, %d session(s): %.1f tokens/s\n", sessions, best);
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
  auto a = Args::Parse(argc, argv,
                       {"json", "threads", "workdir", "prefill-bin", "decode-bin", "tokenizer"}, {});
  if (!a.ok()) return Usage(std::string(a.status().message()));
  const auto threads = a->GetInt("threads", 2);
  if (!threads.ok() || *threads <= 0 || *threads > 4096) {
    return Usage("--threads must be a positive integer");
  }
  const int n_threads = static_cast<int>(*threads);
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
  std::fprintf(stderr, "writing random %s weights to %s (skipped if present)\n",
               shape.name.c_str(), model_dir.c_str());
  if (auto s = WriteRandomModel(shape, model_dir); !s.ok()) return Fail(s);
  fs::copy_file(tokenizer, model_dir / "tokenizer.json", fs::copy_options::overwrite_existing,
                ec);
  if (ec) {
    return Fail(absl::InternalError(absl::StrCat("cannot copy ", tokenizer.string(), " to ",
                                                 model_dir.string(), ": ", ec.message())));
  }

  json out;
  out["model"] = shape.name;
  out["threads"] = n_threads;
  std::mt19937_64 gen(20240611);

  // 1 + 4: one process. The model is freed before the servers start.
  json prefill_s;
  kv::KvShape kv_shape;
  {
    kernels::SetNumThreads(n_threads);
    auto model = model::Model::Load(model_dir, {kernels::Precision::kBF16});
    if (!model.ok()) return Fail(model.status());
    kv_shape = (*model)->kv_shape(16);
    if (auto s = MeasureOneProcess(**model, gen, &prefill_s); !s.ok()) return Fail(s);
  }
  const std::pair<const char*, v1::KvDtype> kDtypes[] = {
      {"f32", v1::KV_DTYPE_F32}, {"bf16", v1::KV_DTYPE_BF16}, {"int8", v1::KV_DTYPE_INT8}};
  for (const auto& [name, dtype] : kDtypes) {
    out["kv_bytes_per_token"][name] = kv::WireBytesPerToken(kv_shape, dtype);
  }

  // 2 + 3: the pair. Servers are stopped when `prefill` and `decode` go out of scope, on every
  // path; the normal path stops them explicitly to report how they ended.
  json ttft_s, server_ttft_s, decode_tps;
  std::string prefill_end, decode_end;
  {
    const std::string threads_s = std::to_string(n_threads);
    std::fprintf(stderr, "starting %s\n", prefill_bin.c_str());
    auto prefill = ChildServer::Start(
        "duet-prefill", prefill_bin,
        {"--model", model_dir.string(), "--listen", "127.0.0.1:0", "--threads", threads_s},
        workdir / "duet-prefill.log", 120);
    if (!prefill.ok()) return Fail(prefill.status());
    std::fprintf(stderr, "starting %s\n", decode_bin.c_str());
    auto decode = ChildServer::Start(
        "duet-decode", decode_bin,
        {"--model", model_dir.string(), "--listen", "127.0.0.1:0", "--threads", threads_s,
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
    auto run = [&]() -> absl::Status {
      if (auto s = MeasureTtft(*stub, gen, &ttft_s, &server_ttft_s); !s.ok()) return s;
      return MeasureDecode(*stub, &decode_tps);
    };
    if (auto s = run(); !s.ok()) {
      return Fail(absl::Status(s.code(), absl::StrCat(s.message(), "\n(server logs: ",
                                                      (*prefill)->log().string(), ", ",
                                                      (*decode)->log().string(), ")")));
    }
    decode_end = (*decode)->Stop(30);
    prefill_end = (*prefill)->Stop(30);
  }

  for (int n : kPromptLens) {
    const std::string k = std::to_string(n);
    const double one = prefill_s[k].get<double>(), pair = ttft_s[k].get<double>();
    out["prefill_one_process_ms"][k] = one * 1e3;
    out["ttft_pair_ms"][k] = pair * 1e3;
    out["ttft_ratio"][k] = pair / one;
  }
  const double d1 = decode_tps["1"].get<double>(), d16 = decode_tps["16"].get<double>();
  out["decode_tokens_per_s"]["1"] = d1;
  out["decode_tokens_per_s"]["16"] = d16;
  out["decode_ratio_16_over_1"] = d16 / d1;

  auto verdict = [](bool ok) { return ok ? "meets target" : "MISSES target"; };
  std::printf("\nduet bench-pair  (%s shape, random bf16 weights, %d threads per process)\n",
              shape.name.c_str(), n_threads);
  std::printf("\nprefill vs TTFT (best of %d after 1 warm-up, one request at a time)\n",
              kTtftReps);
  std::printf("  %-8s %16s %14s %16s %8s\n", "prompt", "one-process ms", "pair TTFT ms",
              "(decode-side ms)", "ratio");
  for (int n : kPromptLens) {
    const std::string k = std::to_string(n);
    const double ratio = out["ttft_ratio"][k].get<double>();
    std::printf("  %-8d %16.1f %14.1f %16.1f %8.2f  %s (<= %.2f)\n", n,
                out["prefill_one_process_ms"][k].get<double>(),
                out["ttft_pair_ms"][k].get<double>(), server_ttft_s[k].get<double>() * 1e3, ratio,
                verdict(ratio <= kTtftRatioTarget), kTtftRatioTarget);
  }
  std::printf("  (pair TTFT: client send -> first token message, over gRPC on 127.0.0.1;\n"
              "   decode-side: the summary's ttft_ns, request arrival -> first token written)\n");
  std::printf("\ndecode through the pair (prompt %d tokens, %d generated, greedy, ignore_eos)\n",
              kDecodePrompt, kDecodeMaxTokens);
  std::printf("  %-12s %14.1f tokens/s\n", "1 session", d1);
  std::printf("  %-12s %14.1f tokens/s\n", "16 sessions", d16);
  std::printf("  %-12s %14.2fx  %s (>= %.0f)\n", "16 / 1", d16 / d1,
              verdict(d16 / d1 >= kDecodeRatioTarget), kDecodeRatioTarget);
  std::printf("  (all generated tokens / wall time from the first request's send to the last\n"
              "   stream's end, so each request's prefill and TTFT are included; best of %d\n"
              "   after one 16-session warm-up)\n",
              kDecodeReps);
  std::printf("\nK/V on the wire per token (%d layers x %d kv heads x head_dim %d, K and V)\n",
              kv_shape.n_layers, kv_shape.n_kv_heads, kv_shape.head_dim);
  for (const char* d : {"f32", "bf16", "int8"}) {
    std::printf("  %-6s %8lld bytes\n", d,
                static_cast<long long>(out["kv_bytes_per_token"][d].get<int64_t>()));
  }
#if __has_include("bench_codec.h")
  std::printf("\ncodec throughput: run `duet bench-codec`\n");
#endif
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
