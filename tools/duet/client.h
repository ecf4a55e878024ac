// The `duet` subcommands that talk to a running duet-decode (duet.v1.DecodeService):
//   generate  one request, text streamed to stdout, timings to stderr
//   chat      a multi-turn conversation on one session, lines read from stdin
//   bench     M requests of P random prompt tokens, N in flight; latency percentiles
//
// Exit codes: 0 success, 1 runtime failure (an RPC failed, a file could not be written),
// 2 usage error (missing or malformed flag). Errors are one line on stderr,
// "duet <command>: <message>" or, for RPC failures, "duet <command>: <CODE>: <message>".
//
// The functions below the *Main entry points are the pieces those use, exposed for tests.
// Every function here uses the gRPC sync client API and blocks the calling thread.
#pragma once

#include <cstdint>
#include <functional>
#include <istream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "args.h"
#include "duet/v1/decode.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace duet::cli {

// argv after the subcommand.
int GenerateMain(int argc, char** argv);
int ChatMain(int argc, char** argv);
int BenchMain(int argc, char** argv);

// ChatMain reading its lines from `in` instead of std::cin.
int ChatMainWithInput(int argc, char** argv, std::istream& in);

// ---- one streamed Generate call ----

// What the client saw of one Generate stream. Times are seconds since the call was started.
struct StreamStats {
  std::string session_id;  // from the first message that carries one
  std::string text;        // every text delta, concatenated
  int64_t n_tokens = 0;    // token ids received
  int64_t n_messages = 0;
  std::optional<duet::v1::GenerateSummary> summary;  // the last message's, if any
  // Send -> first message carrying token ids; nullopt if there was none.
  std::optional<double> ttft_s;
  // Send -> last message carrying token ids; nullopt if there was none.
  std::optional<double> last_token_s;
  double e2e_s = 0;  // send -> stream finished (status received)
  // Inter-token latencies: the gap between successive token-bearing messages, split evenly
  // over the tokens of the later message (a message with k tokens adds k samples of gap / k),
  // so there are n_tokens - (tokens of the first token-bearing message) samples.
  std::vector<double> itl_s;
};

// Runs one Generate call on `stub` and fills `stats`. `on_text` (may be empty) is called with
// each non-empty text delta as it arrives. timeout_s > 0 sets the call's deadline.
// Returns the call's final status; `stats` holds what arrived before it either way.
grpc::Status StreamGenerate(duet::v1::DecodeService::StubInterface& stub,
                            const duet::v1::GenerateRequest& req, double timeout_s,
                            const std::function<void(const std::string&)>& on_text,
                            StreamStats* stats);

// Reads --temperature --top-k --top-p --min-p --repetition-penalty --seed --max-tokens
// --stop... --ignore-eos into req->sampling / req->stopping (defaults as `duet run`:
// temperature 0.8, max-tokens 128). INVALID_ARGUMENT naming the flag and value.
absl::Status ParseSamplingFlags(const Args& a, duet::v1::GenerateRequest* req);

// "UNAVAILABLE", "NOT_FOUND", ...
std::string StatusCodeName(grpc::StatusCode code);

// "eos", "stop", "length", "unspecified".
std::string FinishReasonName(duet::v1::FinishReason r);

// ---- bench ----

struct BenchOptions {
  int64_t concurrency = 1;    // requests in flight
  int64_t requests = 1;       // total
  int64_t prompt_tokens = 1;  // per request, random ids in [kBenchMinId, kBenchMaxId)
  int64_t max_tokens = 1;     // per request; ignore_eos makes each generate exactly this many
  uint64_t seed = 0;          // the prompts' random generator
  double timeout_s = 0;       // per request; 0 = no deadline
};

inline constexpr int32_t kBenchMinId = 10;
inline constexpr int32_t kBenchMaxId = 200;  // exclusive; valid for any vocabulary >= 256

// `requests` prompts of `prompt_tokens` ids each, drawn from std::mt19937_64(seed).
std::vector<std::vector<int32_t>> MakeBenchPrompts(const BenchOptions& opt);

// Percentiles over the bench's successful requests (ms); nullopt when there are no samples.
struct Percentiles {
  std::optional<double> p50, p90, p99;
};

struct BenchReport {
  BenchOptions options;
  int64_t n_ok = 0;
  std::map<std::string, int64_t> failures;  // status code name -> count
  int64_t output_tokens = 0;                // received by successful requests
  int64_t n_short = 0;      // successful requests that received other than max_tokens tokens
  std::string first_error;  // "CODE: message" of the first failed request, if any
  double wall_s = 0;
  double requests_per_s = 0;       // successful requests / wall
  double output_tokens_per_s = 0;  // output_tokens / wall
  Percentiles ttft_ms, itl_ms, e2e_ms;
};

// Runs the benchmark against `stub` (stubs are thread-safe; `concurrency` threads share it).
BenchReport RunBench(duet::v1::DecodeService::StubInterface& stub, const BenchOptions& opt);

// Linear interpolation between closest ranks (numpy's default); `v` is sorted in place.
// nullopt for an empty vector. q in [0, 100].
std::optional<double> Percentile(std::vector<double>& v, double q);

// The report as a human-readable table.
std::string FormatBenchTable(const BenchReport& r);

// The report as JSON: requests, failures {CODE: n}, wall_s, requests_per_s,
// output_tokens_per_s, ttft_ms / itl_ms / e2e_ms {p50, p90, p99} (null without samples), plus
// the run's parameters (concurrency, prompt_tokens, max_tokens, seed) and counts.
nlohmann::json BenchReportJson(const BenchReport& r);

}  // namespace duet::cli
