// What operators rely on, shown on the real binaries on 127.0.0.1: SIGTERM drains each server
// (health NOT_SERVING, new calls UNAVAILABLE, running streams finish, exit 0), and /metrics
// counts what happened (requests, tokens, errors by code, cancellations, K/V usage).
#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "duet/v1/decode.grpc.pb.h"
#include "duet/v1/prefill.grpc.pb.h"
#include "probe.h"
#include "process.h"

using duet::testing::HealthStatus;
using duet::testing::HttpGet;
using duet::testing::MetricValue;
using duet::testing::ServerProcess;
namespace v1 = duet::v1;
using namespace std::chrono_literals;

namespace {

const std::string kModel = std::string(DUET_SOURCE_DIR) + "/models/duet-tiny";

std::unique_ptr<ServerProcess> StartPrefill(std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"--model", kModel, "--listen", "127.0.0.1:0", "--threads", "1"};
  args.insert(args.end(), extra.begin(), extra.end());
  return std::make_unique<ServerProcess>(DUET_PREFILL_BIN, args);
}

std::unique_ptr<ServerProcess> StartDecode(const std::string& prefill,
                                           std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"--model",   kModel,    "--listen",  "127.0.0.1:0",
                                "--prefill", prefill,   "--threads", "1",
                                "--kv-blocks", "512"};
  args.insert(args.end(), extra.begin(), extra.end());
  return std::make_unique<ServerProcess>(DUET_DECODE_BIN, args);
}

v1::GenerateRequest Greedy(const std::string& prompt, int max_tokens) {
  v1::GenerateRequest req;
  req.set_prompt(prompt);
  req.mutable_sampling()->set_temperature(0.f);
  req.mutable_stopping()->set_max_tokens(max_tokens);
  req.mutable_stopping()->set_ignore_eos(true);
  return req;
}

// Runs one Generate to the end; returns its status and the number of tokens received.
std::pair<grpc::Status, int> Generate(v1::DecodeService::Stub& stub, const v1::GenerateRequest& req,
                                      std::chrono::milliseconds timeout = 20000ms) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse m;
  int n = 0;
  while (reader->Read(&m)) n += m.token_ids_size();
  return {reader->Finish(), n};
}

// Polls the health service until it reports `want` (or 5 s pass).
int WaitForHealth(const std::string& address, int want) {
  int got = -1;
  for (int i = 0; i < 100 && got != want; ++i) {
    got = HealthStatus(address);
    if (got != want) std::this_thread::sleep_for(50ms);
  }
  return got;
}

std::string Series(const std::string& name, const std::string& role, const std::string& extra = "") {
  return name + "{model_name=\"duet-tiny\",role=\"" + role + "\"" + (extra.empty() ? "" : "," + extra) + "}";
}

double Value(const std::string& text, const std::string& series) {
  auto v = MetricValue(text, series);
  INFO("series " << series << " in\n" << text);
  REQUIRE(v.has_value());
  return *v;
}

// A Prefill call of 1500 tokens (about 3 MB of bf16 K/V: more than flow control lets through
// unread) that the test reads only when it wants: it keeps a draining prefill server busy.
struct HeldPrefill {
  explicit HeldPrefill(const std::string& address)
      : stub(v1::PrefillService::NewStub(
            grpc::CreateChannel(address, grpc::InsecureChannelCredentials()))) {
    v1::PrefillRequest req;
    for (int i = 0; i < 1500; ++i) req.add_token_ids(100 + i % 2000);
    ctx.set_deadline(std::chrono::system_clock::now() + 60s);
    reader = stub->Prefill(&ctx, req);
  }
  // Reads the rest; counts chunks and whether the result came.
  grpc::Status Drain(int* chunks = nullptr, bool* result = nullptr) {
    v1::PrefillResponse m;
    while (reader->Read(&m)) {
      if (chunks != nullptr) *chunks += m.has_chunk() ? 1 : 0;
      if (result != nullptr) *result = *result || m.has_result();
    }
    return reader->Finish();
  }
  std::unique_ptr<v1::PrefillService::Stub> stub;
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<v1::PrefillResponse>> reader;
};

// Threads named duet-engine in /proc/PID/task: the engine thread and the OpenMP workers it
// started (they inherit its name).
int EngineThreads(pid_t pid) {
  int n = 0;
  const std::filesystem::path dir = "/proc/" + std::to_string(pid) + "/task";
  for (const auto& task : std::filesystem::directory_iterator(dir)) {
    std::ifstream comm(task.path() / "comm");
    std::string name;
    std::getline(comm, name);
    n += name == "duet-engine";
  }
  return n;
}

}  // namespace

TEST_CASE("the threads flag is the kernels' thread count in both servers' engines", "[ops]") {
  for (const std::string n : {"1", "2"}) {
    SECTION("--threads " + n) {
      ServerProcess prefill(DUET_PREFILL_BIN, {"--model", kModel, "--listen", "127.0.0.1:0",
                                               "--threads", n, "--metrics-listen", "off"});
      ServerProcess decode(DUET_DECODE_BIN,
                           {"--model", kModel, "--listen", "127.0.0.1:0", "--prefill",
                            prefill.address(), "--threads", n, "--kv-blocks", "64",
                            "--metrics-listen", "off"});
      auto stub = v1::DecodeService::NewStub(
          grpc::CreateChannel(decode.address(), grpc::InsecureChannelCredentials()));
      // A prompt long enough for prefill's parallel kernels, and some decode steps.
      std::string prompt;
      for (int i = 0; i < 40; ++i) prompt += "the king said unto them ";
      const auto [st, tokens] = Generate(*stub, Greedy(prompt, 8));
      INFO(st.error_message());
      REQUIRE(st.ok());
      CHECK(tokens == 8);
      CHECK(EngineThreads(decode.pid()) == std::stoi(n));
      CHECK(EngineThreads(prefill.pid()) == std::stoi(n));
    }
  }
}

TEST_CASE("decode SIGTERM: NOT_SERVING, new requests UNAVAILABLE, the running stream finishes, exit 0",
          "[ops]") {
  auto prefill = StartPrefill();
  // The drain and the deadline leave a loaded CI machine ten times the idle run time (~4 s).
  auto decode = StartDecode(prefill->address(), {"--drain-s", "60"});
  REQUIRE(HealthStatus(decode->address()) == duet::testing::kServing);
  auto stub = v1::DecodeService::NewStub(
      grpc::CreateChannel(decode->address(), grpc::InsecureChannelCredentials()));

  // A long generation; wait until it streams, then SIGTERM.
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 120s);
  auto reader = stub->Generate(&ctx, Greedy("the king said", 1900));
  v1::GenerateResponse m;
  REQUIRE(reader->Read(&m));
  int tokens = m.token_ids_size();
  decode->Signal(SIGTERM);

  CHECK(WaitForHealth(decode->address(), duet::testing::kNotServing) == duet::testing::kNotServing);
  const auto [refused, n_refused] = Generate(*stub, Greedy("a new request", 4));
  CHECK(refused.error_code() == grpc::StatusCode::UNAVAILABLE);
  CHECK(refused.error_message().find("shutting down") != std::string::npos);
  CHECK(n_refused == 0);
  CHECK(decode->Running());  // still draining

  while (reader->Read(&m)) tokens += m.token_ids_size();
  const grpc::Status st = reader->Finish();
  INFO(st.error_message());
  CHECK(st.ok());
  CHECK(tokens == 1900);
  CHECK(decode->Wait(15000ms) == 0);
}

TEST_CASE("prefill SIGTERM: NOT_SERVING, new calls UNAVAILABLE, the running stream finishes, exit 0",
          "[ops]") {
  auto prefill = StartPrefill({"--drain-s", "30"});
  REQUIRE(HealthStatus(prefill->address()) == duet::testing::kServing);
  HeldPrefill held(prefill->address());
  v1::PrefillResponse m;
  REQUIRE(held.reader->Read(&m));
  REQUIRE(m.has_header());
  prefill->Signal(SIGTERM);

  CHECK(WaitForHealth(prefill->address(), duet::testing::kNotServing) == duet::testing::kNotServing);
  {
    v1::PrefillRequest small;
    small.add_token_ids(1);
    grpc::ClientContext c2;
    c2.set_deadline(std::chrono::system_clock::now() + 10s);
    auto r2 = held.stub->Prefill(&c2, small);
    v1::PrefillResponse ignored;
    while (r2->Read(&ignored)) {
    }
    const grpc::Status st = r2->Finish();
    CHECK(st.error_code() == grpc::StatusCode::UNAVAILABLE);
  }
  CHECK(prefill->Running());

  bool result = false;
  int chunks = 0;
  const grpc::Status st = held.Drain(&chunks, &result);
  INFO(st.error_message());
  CHECK(st.ok());
  CHECK(chunks > 0);
  CHECK(result);
  CHECK(prefill->Wait(15000ms) == 0);
}

TEST_CASE("/metrics counts requests, tokens, errors by code and cancellations, and K/V usage returns "
          "to zero",
          "[ops]") {
  auto prefill = StartPrefill();
  auto decode = StartDecode(prefill->address());
  auto stub = v1::DecodeService::NewStub(
      grpc::CreateChannel(decode->address(), grpc::InsecureChannelCredentials()));

  const auto [ok, n_ok] = Generate(*stub, Greedy("the meaning of a word", 16));
  REQUIRE(ok.ok());
  REQUIRE(n_ok == 16);
  v1::GenerateRequest bad = Greedy("x", 4);
  bad.mutable_sampling()->set_temperature(-1.f);
  CHECK(Generate(*stub, bad).first.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  // A stream cut by its deadline.
  const auto [cut, n_cut] = Generate(*stub, Greedy("and the king said unto them", 1900), 300ms);
  CHECK(cut.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED);

  std::string d;
  // The server notices the deadline at its next step; give it a moment to retire the sequence.
  for (int i = 0; i < 50; ++i) {
    d = HttpGet(decode->metrics_address(), "/metrics");
    auto running = MetricValue(d, Series("duet_requests_running", "decode"));
    auto usage = MetricValue(d, Series("duet_kv_cache_usage_ratio", "decode"));
    if (running && *running == 0 && usage && *usage == 0) break;
    std::this_thread::sleep_for(100ms);
  }
  CHECK(Value(d, Series("duet_time_to_first_token_seconds_count", "decode")) == 2);
  CHECK(Value(d, Series("duet_e2e_request_latency_seconds_count", "decode")) == 1);
  CHECK(Value(d, Series("duet_inter_token_latency_seconds_count", "decode")) >= 15);
  CHECK(Value(d, Series("duet_generation_tokens_total", "decode")) >= 16 + n_cut);
  CHECK(Value(d, Series("duet_requests_finished_total", "decode", "finished_reason=\"length\"")) == 1);
  CHECK(Value(d, Series("duet_requests_finished_total", "decode", "finished_reason=\"error\"")) == 1);
  CHECK(Value(d, Series("duet_requests_finished_total", "decode", "finished_reason=\"cancelled\"")) == 1);
  CHECK(Value(d, Series("duet_request_errors_total", "decode", "code=\"INVALID_ARGUMENT\"")) == 1);
  CHECK(Value(d, Series("duet_kv_cache_usage_ratio", "decode")) == 0);
  CHECK(Value(d, Series("duet_requests_running", "decode")) == 0);
  CHECK(Value(d, Series("duet_kv_transfer_seconds_count", "decode")) == 2);
  CHECK(Value(d, Series("duet_kv_transfer_bytes_total", "decode")) > 0);

  const std::string p = HttpGet(prefill->metrics_address(), "/metrics");
  CHECK(Value(p, Series("duet_prefill_time_seconds_count", "prefill")) == 2);
  CHECK(Value(p, Series("duet_prefill_queue_time_seconds_count", "prefill")) == 2);
  CHECK(Value(p, Series("duet_prefill_tokens_total", "prefill")) ==
        Value(d, Series("duet_prompt_tokens_total", "decode")));
  CHECK(Value(p, Series("duet_prefill_requests_running", "prefill")) == 0);
}

TEST_CASE("decode skips a draining prefill server: every request succeeds through the other one",
          "[ops]") {
  auto a = StartPrefill({"--drain-s", "30"});
  auto b = StartPrefill();
  auto decode = StartDecode(a->address() + "," + b->address());
  auto stub = v1::DecodeService::NewStub(
      grpc::CreateChannel(decode->address(), grpc::InsecureChannelCredentials()));
  for (int i = 0; i < 4; ++i) REQUIRE(Generate(*stub, Greedy("warm up " + std::to_string(i), 2)).first.ok());

  // Hold prefill A in its drain.
  HeldPrefill held(a->address());
  v1::PrefillResponse hm;
  REQUIRE(held.reader->Read(&hm));
  a->Signal(SIGTERM);
  REQUIRE(WaitForHealth(a->address(), duet::testing::kNotServing) == duet::testing::kNotServing);

  // Decode's round_robin sees A's health change (or retries on B): no request fails.
  int failed = 0;
  for (int i = 0; i < 12; ++i) {
    const auto [st, n] = Generate(*stub, Greedy("request number " + std::to_string(i), 2));
    if (!st.ok()) {
      ++failed;
      UNSCOPED_INFO("request " << i << ": " << st.error_code() << " " << st.error_message());
    }
  }
  CHECK(failed == 0);
  held.ctx.TryCancel();
  held.Drain();
}
