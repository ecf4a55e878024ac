// The `duet generate|chat|bench` client against a fake DecodeService: a real gRPC server on
// 127.0.0.1, port 0, that streams canned replies and records what it was sent.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "client.h"
#include "duet/v1/decode.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace {

namespace v1 = duet::v1;

v1::GenerateResponse Msg(const std::string& text, std::vector<int32_t> ids) {
  v1::GenerateResponse m;
  m.set_text(text);
  for (int32_t id : ids) m.add_token_ids(id);
  return m;
}

// Replies:
//  - prompt "fail": RESOURCE_EXHAUSTED "no K/V room", nothing streamed.
//  - prompt X: a first message with only the session id ("s-1" if open_session), then
//    "Hello" [1], ", " [2, 3] (two tokens in one message), "world" [4], then a summary-only
//    message (LENGTH, prompt 7, generated 4, ttft 2 ms, decode 3 ms, 1234 K/V bytes).
//  - turn: NOT_FOUND unless the session is open (a turn "forget me" closes it first); else
//    "re: <text>" [5] and a summary (STOP).
//  - prompt_tokens: the first `fail_token_prompts` of them fail with UNAVAILABLE; the rest get
//    max_tokens messages of one token each and a summary (LENGTH).
class FakeDecode final : public v1::DecodeService::Service {
 public:
  grpc::Status Generate(grpc::ServerContext*, const v1::GenerateRequest* req,
                        grpc::ServerWriter<v1::GenerateResponse>* w) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      requests_.push_back(*req);
    }
    const int now = ++in_flight_;
    for (int m = max_in_flight_; now > m && !max_in_flight_.compare_exchange_weak(m, now);) {
    }
    grpc::Status s = Reply(*req, w);
    --in_flight_;
    return s;
  }

  grpc::Status CloseSession(grpc::ServerContext*, const v1::CloseSessionRequest* req,
                            v1::CloseSessionResponse*) override {
    std::lock_guard<std::mutex> l(mu_);
    if (!open_.erase(req->session_id())) return {grpc::StatusCode::NOT_FOUND, "no such session"};
    closed_.push_back(req->session_id());
    return grpc::Status::OK;
  }

  std::vector<v1::GenerateRequest> requests() {
    std::lock_guard<std::mutex> l(mu_);
    return requests_;
  }
  std::vector<std::string> closed() {
    std::lock_guard<std::mutex> l(mu_);
    return closed_;
  }
  void Reset() {
    std::lock_guard<std::mutex> l(mu_);
    requests_.clear();
    closed_.clear();
    open_.clear();
    max_in_flight_ = 0;
  }

  std::atomic<int> fail_token_prompts{0};
  std::atomic<int> max_in_flight_{0};

 private:
  grpc::Status Reply(const v1::GenerateRequest& req, grpc::ServerWriter<v1::GenerateResponse>* w) {
    v1::GenerateResponse last;
    v1::GenerateSummary* sum = last.mutable_summary();
    if (req.has_prompt_tokens()) {
      if (fail_token_prompts.fetch_sub(1) > 0) return {grpc::StatusCode::UNAVAILABLE, "down"};
      for (int i = 0; i < req.stopping().max_tokens(); ++i) w->Write(Msg("x", {100 + i}));
      sum->set_finish_reason(v1::FINISH_REASON_LENGTH);
      sum->set_prompt_tokens(req.prompt_tokens().token_ids_size());
      sum->set_generated_tokens(req.stopping().max_tokens());
    } else if (req.has_turn()) {
      {
        std::lock_guard<std::mutex> l(mu_);
        // "forget me" plays a server that lost the session (its pod went away).
        if (req.turn().text() == "forget me") open_.erase(req.turn().session_id());
        if (!open_.count(req.turn().session_id())) {
          return {grpc::StatusCode::NOT_FOUND, "unknown session " + req.turn().session_id()};
        }
      }
      v1::GenerateResponse first = Msg("re: " + req.turn().text(), {5});
      first.set_session_id(req.turn().session_id());
      w->Write(first);
      sum->set_finish_reason(v1::FINISH_REASON_STOP);
      sum->set_generated_tokens(1);
    } else {
      if (req.prompt() == "fail") return {grpc::StatusCode::RESOURCE_EXHAUSTED, "no K/V room"};
      v1::GenerateResponse first;
      if (req.open_session()) {
        std::lock_guard<std::mutex> l(mu_);
        first.set_session_id("s-1");
        open_.insert("s-1");
      }
      w->Write(first);
      w->Write(Msg("Hello", {1}));
      w->Write(Msg(", ", {2, 3}));
      w->Write(Msg("world", {4}));
      sum->set_finish_reason(v1::FINISH_REASON_LENGTH);
      sum->set_prompt_tokens(7);
      sum->set_generated_tokens(4);
      sum->set_ttft_ns(2'000'000);
      sum->set_decode_ns(3'000'000);
      sum->set_kv_transfer_bytes(1234);
    }
    w->Write(last);
    return grpc::Status::OK;
  }

  std::mutex mu_;
  std::vector<v1::GenerateRequest> requests_;
  std::set<std::string> open_;
  std::vector<std::string> closed_;
  std::atomic<int> in_flight_{0};
};

// A fake server on 127.0.0.1, port 0, for one test; shut down when the test ends.
struct Fixture {
  FakeDecode service;
  std::unique_ptr<grpc::Server> server;
  std::string addr;

  Fixture() {
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(&service);
    server = b.BuildAndStart();
    REQUIRE(server != nullptr);
    REQUIRE(port > 0);
    addr = "127.0.0.1:" + std::to_string(port);
  }
  ~Fixture() { server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5)); }
};

struct Run {
  int code;
  std::string out, err;
};

std::string ReadFd(int fd) {
  std::string s;
  ::lseek(fd, 0, SEEK_SET);
  char buf[4096];
  for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) s.append(buf, static_cast<size_t>(n));
  return s;
}

// Runs `main(args)` in this process with stdout and stderr sent to temporary files.
template <typename F>
Run Capture(F fn, std::vector<std::string> args) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  char out_name[] = "/tmp/duet_client_out_XXXXXX";
  char err_name[] = "/tmp/duet_client_err_XXXXXX";
  const int out_fd = ::mkstemp(out_name), err_fd = ::mkstemp(err_name);
  REQUIRE(out_fd >= 0);
  REQUIRE(err_fd >= 0);
  std::fflush(stdout);
  std::fflush(stderr);
  const int saved_out = ::dup(1), saved_err = ::dup(2);
  ::dup2(out_fd, 1);
  ::dup2(err_fd, 2);
  Run r;
  r.code = fn(static_cast<int>(argv.size()), argv.data());
  std::fflush(stdout);
  std::fflush(stderr);
  ::dup2(saved_out, 1);
  ::dup2(saved_err, 2);
  ::close(saved_out);
  ::close(saved_err);
  r.out = ReadFd(out_fd);
  r.err = ReadFd(err_fd);
  ::close(out_fd);
  ::close(err_fd);
  ::unlink(out_name);
  ::unlink(err_name);
  return r;
}

using Catch::Matchers::Contains;

}  // namespace

TEST_CASE("duet generate streams the text and reports the summary", "[client]") {
  Fixture f;
  auto r = Capture(
      duet::cli::GenerateMain,
      {"--server", f.addr, "--prompt", "hi", "--max-tokens", "4", "--temperature", "0", "--top-k",
       "5", "--seed", "42", "--stop", "a", "--stop", "b", "--open-session", "--timeout-s", "30"});
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(r.out == "Hello, world\n");
  CHECK_THAT(r.err, Contains("session: s-1"));
  CHECK_THAT(r.err, Contains("finish: length"));
  CHECK_THAT(r.err, Contains("prompt tokens: 7  generated tokens: 4"));
  CHECK_THAT(r.err, Contains("2.0 ms (server)"));
  CHECK_THAT(r.err, Contains("1000.0 tokens/s (server)"));  // 3 tokens in 3 ms

  const auto reqs = f.service.requests();
  REQUIRE(reqs.size() == 1);
  const v1::GenerateRequest& q = reqs[0];
  CHECK(q.prompt() == "hi");
  CHECK(q.open_session());
  CHECK(q.sampling().temperature() == 0.0f);
  CHECK(q.sampling().top_k() == 5);
  CHECK(q.sampling().top_p() == 1.0f);
  CHECK(q.sampling().repetition_penalty() == 1.0f);
  CHECK(q.sampling().seed() == 42);
  CHECK(q.stopping().max_tokens() == 4);
  REQUIRE(q.stopping().stop_size() == 2);
  CHECK(q.stopping().stop(0) == "a");
  CHECK(q.stopping().stop(1) == "b");
  CHECK_FALSE(q.stopping().ignore_eos());
}

TEST_CASE("StreamGenerate measures TTFT and splits multi-token gaps", "[client]") {
  Fixture f;
  auto stub =
      v1::DecodeService::NewStub(grpc::CreateChannel(f.addr, grpc::InsecureChannelCredentials()));
  v1::GenerateRequest req;
  req.set_prompt("hi");
  std::string streamed;
  duet::cli::StreamStats st;
  const grpc::Status s = duet::cli::StreamGenerate(
      *stub, req, 30, [&](const std::string& t) { streamed += t; }, &st);
  REQUIRE(s.ok());
  CHECK(streamed == "Hello, world");
  CHECK(st.text == streamed);
  CHECK(st.session_id.empty());  // not opened
  CHECK(st.n_messages == 5);
  CHECK(st.n_tokens == 4);
  REQUIRE(st.ttft_s.has_value());
  REQUIRE(st.last_token_s.has_value());
  CHECK(*st.ttft_s <= *st.last_token_s);
  CHECK(*st.last_token_s <= st.e2e_s);
  // The first token-bearing message has 1 token; ", " brings 2 (two samples of half its gap).
  REQUIRE(st.itl_s.size() == 3);
  CHECK(st.itl_s[0] == st.itl_s[1]);
  double sum = 0;
  for (double x : st.itl_s) sum += x;
  CHECK(sum == Approx(*st.last_token_s - *st.ttft_s));
  REQUIRE(st.summary.has_value());
  CHECK(st.summary->generated_tokens() == 4);
}

TEST_CASE("duet generate --session sends a turn", "[client]") {
  Fixture f;
  REQUIRE(Capture(duet::cli::GenerateMain, {"--server", f.addr, "--prompt", "a", "--open-session"})
              .code == 0);
  auto r = Capture(duet::cli::GenerateMain,
                   {"--server", f.addr, "--session", "s-1", "--prompt", "more", "--ignore-eos"});
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(r.out == "re: more\n");
  CHECK_THAT(r.err, Contains("finish: stop"));
  const auto reqs = f.service.requests();
  REQUIRE(reqs.size() == 2);
  CHECK(reqs[1].has_turn());
  CHECK(reqs[1].turn().session_id() == "s-1");
  CHECK(reqs[1].turn().text() == "more");
  CHECK(reqs[1].open_session());
  CHECK(reqs[1].stopping().ignore_eos());
}

TEST_CASE("duet generate reports RPC failures as CODE: message, exit 1", "[client]") {
  Fixture f;
  auto r = Capture(duet::cli::GenerateMain, {"--server", f.addr, "--prompt", "fail"});
  CHECK(r.code == 1);
  CHECK(r.out.empty());
  CHECK_THAT(r.err, Contains("duet generate: RESOURCE_EXHAUSTED: no K/V room\n"));

  r = Capture(duet::cli::GenerateMain, {"--server", f.addr, "--session", "nope", "--prompt", "x"});
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("duet generate: NOT_FOUND: unknown session nope\n"));
}

TEST_CASE("duet generate: no server listening is UNAVAILABLE", "[client]") {
  // Bind a port, then close it, so that nothing listens there.
  const int sock = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(sock >= 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(sock, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0);
  socklen_t len = sizeof sa;
  REQUIRE(::getsockname(sock, reinterpret_cast<sockaddr*>(&sa), &len) == 0);
  const int port = ntohs(sa.sin_port);
  ::close(sock);
  auto r = Capture(duet::cli::GenerateMain, {"--server", "127.0.0.1:" + std::to_string(port),
                                             "--prompt", "x", "--timeout-s", "10"});
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("duet generate: UNAVAILABLE: "));
}

TEST_CASE("duet generate/chat/bench reject bad flags with exit 2 and no RPC", "[client]") {
  Fixture f;
  struct Case {
    std::vector<std::string> args;
    std::string err;
  };
  for (const Case& c : std::vector<Case>{
           {{"--prompt", "x"}, "duet generate: missing required flag --server\n"},
           {{"--server", f.addr}, "duet generate: missing required flag --prompt\n"},
           {{"--server", f.addr, "--prompt", "x", "--max-tokens", "abc"},
            "duet generate: --max-tokens: not an integer: \"abc\"\n"},
           {{"--server", f.addr, "--prompt", "x", "--max-tokens", "0"},
            "duet generate: --max-tokens must be in [1, 2147483647], got 0\n"},
           {{"--server", f.addr, "--prompt", "x", "--temperature", "hot"},
            "duet generate: --temperature: not a number: \"hot\"\n"},
           {{"--server", f.addr, "--prompt", "x", "--temperature", "-1"},
            "duet generate: bad sampling flag: "},
           {{"--server", f.addr, "--prompt", "x", "--bogus", "1"},
            "duet generate: unknown flag --bogus\n"},
           {{"--server", f.addr, "--prompt", "x", "--timeout-s", "-3"},
            "duet generate: --timeout-s must be in"},
       }) {
    auto r = Capture(duet::cli::GenerateMain, c.args);
    INFO(r.err);
    CHECK(r.code == 2);
    CHECK(r.out.empty());
    CHECK_THAT(r.err, Contains(c.err));
  }
  std::istringstream in("hello\n");
  auto r =
      Capture([&](int argc, char** argv) { return duet::cli::ChatMainWithInput(argc, argv, in); },
              {"--top-k", "x"});
  CHECK(r.code == 2);
  CHECK_THAT(r.err, Contains("duet chat: missing required flag --server\n"));

  r = Capture(duet::cli::BenchMain, {"--server", f.addr, "--concurrency", "2"});
  CHECK(r.code == 2);
  CHECK_THAT(r.err, Contains("duet bench: missing required flag --requests\n"));
  r = Capture(duet::cli::BenchMain, {"--server", f.addr, "--concurrency", "0", "--requests", "1",
                                     "--prompt-tokens", "1", "--max-tokens", "1"});
  CHECK(r.code == 2);
  CHECK_THAT(r.err, Contains("duet bench: --concurrency must be in [1, 4096], got 0\n"));
  CHECK(f.service.requests().empty());
}

TEST_CASE("duet chat keeps one session across turns and closes it", "[client]") {
  Fixture f;
  std::istringstream in("hello\n\nhow are you\r\n/quit\nnot sent\n");
  auto r =
      Capture([&](int argc, char** argv) { return duet::cli::ChatMainWithInput(argc, argv, in); },
              {"--server", f.addr, "--temperature", "0", "--max-tokens", "8"});
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(r.out == "Hello, world\nre: how are you\n");  // prompts and stats went to stderr
  CHECK_THAT(r.err, Contains("> "));
  const auto reqs = f.service.requests();
  REQUIRE(reqs.size() == 2);
  CHECK(reqs[0].prompt() == "hello");
  CHECK(reqs[0].open_session());
  CHECK(reqs[0].stopping().max_tokens() == 8);
  CHECK(reqs[1].turn().session_id() == "s-1");
  CHECK(reqs[1].turn().text() == "how are you");
  CHECK(reqs[1].stopping().max_tokens() == 8);
  CHECK(f.service.closed() == std::vector<std::string>{"s-1"});

  // EOF ends the chat the same way.
  f.service.Reset();
  std::istringstream eof("one\n");
  r = Capture([&](int argc, char** argv) { return duet::cli::ChatMainWithInput(argc, argv, eof); },
              {"--server", f.addr});
  REQUIRE(r.code == 0);
  CHECK(r.out == "Hello, world\n");
  CHECK(f.service.closed() == std::vector<std::string>{"s-1"});
}

TEST_CASE("duet chat carries on in a new session with the whole conversation when the server lost "
          "the session",
          "[client]") {
  Fixture f;
  std::istringstream in("hello\nforget me\nand then\n");
  auto r =
      Capture([&](int argc, char** argv) { return duet::cli::ChatMainWithInput(argc, argv, in); },
              {"--server", f.addr, "--temperature", "0"});
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK_THAT(r.err, Contains("[session s-1 is gone on the server (unknown session s-1)"));
  const auto reqs = f.service.requests();
  REQUIRE(reqs.size() == 4);
  CHECK(reqs[1].turn().text() == "forget me");  // refused: NOT_FOUND
  // The retry: a new session whose prompt is the conversation so far and the new line.
  CHECK(reqs[2].prompt() == "helloHello, worldforget me");
  CHECK(reqs[2].open_session());
  CHECK(reqs[3].turn().session_id() == "s-1");
  CHECK(reqs[3].turn().text() == "and then");
  CHECK(r.out == "Hello, world\nHello, world\nre: and then\n");
}

TEST_CASE("duet bench sends random token prompts and reports percentiles", "[client]") {
  Fixture f;
  const std::string json_path = "/tmp/duet_client_bench_" + std::to_string(::getpid()) + ".json";
  auto r = Capture(duet::cli::BenchMain,
                   {"--server", f.addr, "--concurrency", "3", "--requests", "7", "--prompt-tokens",
                    "5", "--max-tokens", "4", "--seed", "9", "--json", json_path});
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK_THAT(r.out, Contains("requests"));
  CHECK_THAT(r.out, Contains("TTFT"));
  CHECK_THAT(r.out, Contains("ITL"));
  CHECK_THAT(r.out, Contains("E2E"));

  const auto reqs = f.service.requests();
  REQUIRE(reqs.size() == 7);
  std::set<std::vector<int32_t>> prompts;
  for (const auto& q : reqs) {
    REQUIRE(q.has_prompt_tokens());
    std::vector<int32_t> ids(q.prompt_tokens().token_ids().begin(),
                             q.prompt_tokens().token_ids().end());
    CHECK(ids.size() == 5);
    for (int32_t id : ids) {
      CHECK(id >= 10);
      CHECK(id < 200);
    }
    prompts.insert(ids);
    CHECK(q.sampling().temperature() == 0.0f);
    CHECK(q.stopping().max_tokens() == 4);
    CHECK(q.stopping().ignore_eos());
    CHECK_FALSE(q.open_session());
  }
  CHECK(prompts.size() == 7);  // every prompt differs
  CHECK(f.service.max_in_flight_.load() <= 3);

  std::ifstream in(json_path);
  const auto j = nlohmann::json::parse(in);
  std::remove(json_path.c_str());
  CHECK(j["requests"] == 7);
  CHECK(j["succeeded"] == 7);
  CHECK(j["failures"].empty());
  CHECK(j["output_tokens"] == 28);
  CHECK(j["seed"] == 9);
  CHECK(j["wall_s"].get<double>() > 0);
  CHECK(j["requests_per_s"].get<double>() > 0);
  CHECK(j["output_tokens_per_s"].get<double>() > 0);
  for (const char* k : {"ttft_ms", "itl_ms", "e2e_ms"}) {
    INFO(k);
    const double p50 = j[k]["p50"], p90 = j[k]["p90"], p99 = j[k]["p99"];
    CHECK(p50 >= 0);
    CHECK(p50 <= p90);
    CHECK(p90 <= p99);
  }
  CHECK(j["ttft_ms"]["p99"].get<double>() <= j["e2e_ms"]["p99"].get<double>());

  // Same seed, same prompts.
  duet::cli::BenchOptions opt;
  opt.requests = 7;
  opt.prompt_tokens = 5;
  opt.seed = 9;
  std::set<std::vector<int32_t>> again;
  for (auto& p : duet::cli::MakeBenchPrompts(opt)) again.insert(p);
  CHECK(again == prompts);
}

TEST_CASE("duet bench counts failures by status code and exits 1", "[client]") {
  Fixture f;
  f.service.fail_token_prompts = 2;
  const std::string json_path = "/tmp/duet_client_bench_f_" + std::to_string(::getpid()) + ".json";
  auto r = Capture(duet::cli::BenchMain,
                   {"--server", f.addr, "--concurrency", "2", "--requests", "5", "--prompt-tokens",
                    "3", "--max-tokens", "2", "--json", json_path});
  INFO(r.out);
  INFO(r.err);
  CHECK(r.code == 1);
  CHECK_THAT(r.out, Contains("failures           2 (UNAVAILABLE: 2)"));
  CHECK_THAT(r.err, Contains("first failure: UNAVAILABLE: down"));
  std::ifstream in(json_path);
  const auto j = nlohmann::json::parse(in);
  std::remove(json_path.c_str());
  CHECK(j["failures"]["UNAVAILABLE"] == 2);
  CHECK(j["succeeded"] == 3);
  CHECK(j["output_tokens"] == 6);
}

TEST_CASE("Percentile interpolates linearly between ranks", "[client]") {
  std::vector<double> none;
  CHECK_FALSE(duet::cli::Percentile(none, 50).has_value());
  std::vector<double> one{7};
  CHECK(*duet::cli::Percentile(one, 99) == 7);
  std::vector<double> v{4, 1, 3, 2};
  CHECK(*duet::cli::Percentile(v, 50) == Approx(2.5));
  CHECK(*duet::cli::Percentile(v, 0) == 1);
  CHECK(*duet::cli::Percentile(v, 100) == 4);
  CHECK(*duet::cli::Percentile(v, 90) == Approx(3.7));
}
