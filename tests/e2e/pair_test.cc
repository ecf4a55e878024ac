// The service pair as real processes on 127.0.0.1: duet-prefill ships K/V over gRPC to
// duet-decode, which must produce exactly what one process produces.
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <catch2/catch.hpp>
#include <future>
#include <thread>

#include "duet/v1/decode.grpc.pb.h"
#include "generate.h"
#include "process.h"

using duet::testing::ServerProcess;
namespace v1 = duet::v1;

namespace {

const std::string kModel = std::string(DUET_SOURCE_DIR) + "/models/duet-tiny";

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

std::unique_ptr<ServerProcess> StartPrefill(int port = 0, const std::string& kv_cache = "f32") {
  return std::make_unique<ServerProcess>(
      DUET_PREFILL_BIN,
      std::vector<std::string>{"--model", kModel, "--listen", "127.0.0.1:" + std::to_string(port),
                               "--precision", "f32", "--threads", "1", "--kv-cache-dtype",
                               kv_cache});
}

std::unique_ptr<ServerProcess> StartDecode(const std::string& prefill, const std::string& kv_dtype,
                                           int kv_blocks = 512,
                                           const std::string& kv_cache = "f32") {
  return std::make_unique<ServerProcess>(
      DUET_DECODE_BIN,
      std::vector<std::string>{"--model", kModel, "--listen", "127.0.0.1:0", "--prefill", prefill,
                               "--precision", "f32", "--threads", "1", "--kv-dtype", kv_dtype,
                               "--kv-blocks", std::to_string(kv_blocks), "--prefill-timeout-ms",
                               "5000", "--kv-cache-dtype", kv_cache});
}

std::unique_ptr<v1::DecodeService::Stub> Client(const ServerProcess& decode) {
  return v1::DecodeService::NewStub(
      grpc::CreateChannel(decode.address(), grpc::InsecureChannelCredentials()));
}

struct Reply {
  grpc::Status status;
  std::string session_id;
  std::string text;
  std::vector<int32_t> ids;
  v1::GenerateSummary summary;
};

Reply Generate(v1::DecodeService::Stub& stub, const v1::GenerateRequest& req,
               int timeout_ms = 20000) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  auto reader = stub.Generate(&ctx, req);
  Reply r;
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    if (!m.session_id().empty()) r.session_id = m.session_id();
    r.text += m.text();
    r.ids.insert(r.ids.end(), m.token_ids().begin(), m.token_ids().end());
    if (m.has_summary()) r.summary = m.summary();
  }
  r.status = reader->Finish();
  return r;
}

v1::GenerateRequest Greedy(const std::string& prompt, int max_tokens, bool open = false) {
  v1::GenerateRequest req;
  req.set_prompt(prompt);
  req.mutable_sampling()->set_temperature(0.f);
  req.mutable_stopping()->set_max_tokens(max_tokens);
  req.mutable_stopping()->set_ignore_eos(true);
  req.set_open_session(open);
  return req;
}

v1::GenerateRequest Turn(const std::string& session, const std::string& text, int max_tokens) {
  v1::GenerateRequest req;
  req.mutable_turn()->set_session_id(session);
  req.mutable_turn()->set_text(text);
  req.mutable_sampling()->set_temperature(0.f);
  req.mutable_stopping()->set_max_tokens(max_tokens);
  req.mutable_stopping()->set_ignore_eos(true);
  return req;
}

// The one-process reference (what `duet run` does), f32.
struct Reference {
  std::unique_ptr<duet::model::Model> model;
  std::unique_ptr<duet::tokenizer::Tokenizer> tok;
  explicit Reference(duet::kernels::KvDtype cache = duet::kernels::KvDtype::kF32) {
    auto m = duet::model::Model::Load(kModel, {duet::kernels::Precision::kF32, cache});
    REQUIRE(m.ok());
    model = std::move(*m);
    auto t = duet::tokenizer::Tokenizer::Load(kModel);
    REQUIRE(t.ok());
    tok = std::move(*t);
  }
  std::vector<int32_t> Greedy(std::vector<int32_t> ids, int max_tokens) {
    duet::cli::GenerateOptions opt;
    opt.sampling.temperature = 0.f;
    opt.stop.max_tokens = max_tokens;
    opt.stop.ignore_eos = true;
    auto r = duet::cli::GenerateFromIds(*model, *tok, std::move(ids), opt, nullptr);
    REQUIRE(r.ok());
    return r->output_ids;
  }
};

v1::ListSessionsResponse List(v1::DecodeService::Stub& stub) {
  grpc::ClientContext ctx;
  v1::ListSessionsResponse resp;
  REQUIRE(stub.ListSessions(&ctx, {}, &resp).ok());
  return resp;
}

const char* kPrompts[] = {"the meaning of a word", "a small animal that lives in",
                          "and the king said unto them"};

}  // namespace

namespace {

// Every prompt of kPrompts, 24 greedy tokens through the pair, equals the one-process reference.
void CheckGreedyEqualsReference(v1::DecodeService::Stub& stub, Reference& ref) {
  for (const char* p : kPrompts) {
    auto r = Generate(stub, Greedy(p, 24));
    INFO(p << ": " << r.status.error_message());
    REQUIRE(r.status.ok());
    const auto expect = ref.Greedy(ref.tok->Encode(p, true), 24);
    CHECK(r.ids == expect);
    CHECK(r.text == ref.tok->Decode(expect));
    CHECK(r.summary.generated_tokens() == 24);
    CHECK(r.summary.finish_reason() == v1::FINISH_REASON_LENGTH);
    CHECK(r.summary.kv_transfer_bytes() > 0);
  }
}

}  // namespace

TEST_CASE("greedy output through the pair equals one-process generation", "[pair]") {
  Reference ref;
  auto prefill = StartPrefill();
  for (const std::string dtype : {"f32", "bf16"}) {
    SECTION("K/V on the wire in " + dtype) {
      auto decode = StartDecode(prefill->address(), dtype);
      CheckGreedyEqualsReference(*Client(*decode), ref);
    }
  }
  SECTION("K/V on the wire in int8: token agreement is printed") {
    auto decode = StartDecode(prefill->address(), "int8");
    auto stub = Client(*decode);
    int agree = 0, total = 0;
    for (const char* p : kPrompts) {
      auto r = Generate(*stub, Greedy(p, 64));
      REQUIRE(r.status.ok());
      const auto expect = ref.Greedy(ref.tok->Encode(p, true), 64);
      REQUIRE(r.ids.size() == 64);
      // The first token comes from prefill's own logits, untouched by the wire dtype.
      CHECK(r.ids[0] == expect[0]);
      size_t i = 0;
      while (i < 64 && r.ids[i] == expect[i]) ++i;
      agree += static_cast<int>(i);
      total += 64;
    }
    WARN("int8 K/V: greedy tokens identical to the f32 reference for " << agree << " of "
                                                                       << total
                                                                       << " (prefix lengths)");
  }
}

// Both servers with f16 K/V caches (--kv-cache-dtype f16), f32 on the wire: decode holds exactly
// what prefill's cache held, so the pair still equals one process with an f16 cache.
TEST_CASE("greedy output through the pair with f16 K/V caches equals one-process generation",
          "[pair]") {
  Reference ref(duet::kernels::KvDtype::kF16);
  auto prefill = StartPrefill(0, "f16");
  auto decode = StartDecode(prefill->address(), "f32", 256, "f16");
  CheckGreedyEqualsReference(*Client(*decode), ref);
}

// Both servers with int8 K/V caches (--kv-cache-dtype int8) and int8 on the wire: each cached
// row is a scale and int8 values, the wire's int8 rows are the same, so decode holds exactly what
// prefill's cache held and the pair equals one process with an int8 cache.
TEST_CASE("greedy output through the pair with int8 K/V caches equals one-process generation",
          "[pair]") {
  Reference ref(duet::kernels::KvDtype::kI8);
  auto prefill = StartPrefill(0, "int8");
  auto decode = StartDecode(prefill->address(), "int8", 256, "int8");
  CheckGreedyEqualsReference(*Client(*decode), ref);
}

TEST_CASE("a multi-turn session equals one-process generation over the conversation, also "
          "after eviction",
          "[pair]") {
  Reference ref;
  auto prefill = StartPrefill();
  // A pool of 40 blocks of 16 tokens: enough for one conversation, not for two.
  auto decode = StartDecode(prefill->address(), "f32", 40);
  auto stub = Client(*decode);

  auto r1 = Generate(*stub, Greedy("the meaning of a word", 16, /*open=*/true));
  REQUIRE(r1.status.ok());
  REQUIRE(!r1.session_id.empty());
  std::vector<int32_t> conv = ref.tok->Encode("the meaning of a word", true);
  CHECK(r1.ids == ref.Greedy(conv, 16));
  conv.insert(conv.end(), r1.ids.begin(), r1.ids.end());

  // A short turn: prefilled locally on decode.
  auto r2 = Generate(*stub, Turn(r1.session_id, " and so", 16));
  REQUIRE(r2.status.ok());
  CHECK(r2.summary.prefilled_locally());
  auto t2 = ref.tok->Encode(" and so", false);
  conv.insert(conv.end(), t2.begin(), t2.end());
  CHECK(r2.ids == ref.Greedy(conv, 16));
  conv.insert(conv.end(), r2.ids.begin(), r2.ids.end());

  // Another session big enough to evict the first one's K/V.
  // 600 tokens: a minute of deadline, so a loaded CI machine does not turn it into a failure.
  auto big =
      Generate(*stub, Greedy("a small animal that lives in the water", 600, true), 60000);
  REQUIRE(big.status.ok());
  {
    grpc::ClientContext ctx;
    v1::GetSessionRequest req;
    req.set_session_id(r1.session_id);
    v1::SessionInfo info;
    REQUIRE(stub->GetSession(&ctx, req, &info).ok());
    CHECK(info.state() == v1::SESSION_STATE_EVICTED);
    CHECK(info.n_blocks() == 0);
    CHECK(info.n_tokens() == conv.size());
  }
  // The evicted session's next turn is re-prefilled remotely and continues exactly.
  auto r3 = Generate(*stub, Turn(r1.session_id, " then", 16));
  REQUIRE(r3.status.ok());
  CHECK_FALSE(r3.summary.prefilled_locally());
  auto t3 = ref.tok->Encode(" then", false);
  conv.insert(conv.end(), t3.begin(), t3.end());
  CHECK(r3.ids == ref.Greedy(conv, 16));
}

TEST_CASE("8 concurrent sessions produce what they produce alone", "[pair]") {
  auto prefill = StartPrefill();
  auto decode = StartDecode(prefill->address(), "f32");
  auto stub = Client(*decode);
  const std::vector<std::string> prompts = {
      "the meaning of", "a small animal", "and the king", "of or relating to",
      "the act of",     "a person who",   "in a manner",  "the quality of being"};
  std::vector<std::vector<int32_t>> alone;
  for (const auto& p : prompts) {
    auto r = Generate(*stub, Greedy(p, 20));
    REQUIRE(r.status.ok());
    alone.push_back(r.ids);
  }
  std::vector<std::future<Reply>> futures;
  for (const auto& p : prompts)
    futures.push_back(std::async(std::launch::async, [&stub, p] { return Generate(*stub, Greedy(p, 20)); }));
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto r = futures[i].get();
    REQUIRE(r.status.ok());
    CHECK(r.ids == alone[i]);
  }
  const auto list = List(*stub);
  CHECK(list.kv_blocks_free() == list.kv_blocks_total());
}

TEST_CASE("bad requests get their status code and a message naming the value", "[pair]") {
  auto prefill = StartPrefill();
  auto decode = StartDecode(prefill->address(), "bf16");
  auto stub = Client(*decode);
  struct Case {
    std::string name;
    v1::GenerateRequest req;
    grpc::StatusCode code;
    std::string needle;
  };
  std::vector<Case> cases;
  auto base = Greedy("hello there", 8);
  {
    auto r = base;
    r.set_prompt("");
    cases.push_back({"empty prompt", r, grpc::StatusCode::INVALID_ARGUMENT, "empty"});
  }
  {
    auto r = base;
    std::string huge;
    for (int i = 0; i < 3000; ++i) huge += "the word ";
    r.set_prompt(huge);
    cases.push_back({"prompt longer than the context", r, grpc::StatusCode::INVALID_ARGUMENT, "2048"});
  }
  for (int mt : {0, -5}) {
    auto r = base;
    r.mutable_stopping()->set_max_tokens(mt);
    cases.push_back({"max_tokens " + std::to_string(mt), r, grpc::StatusCode::INVALID_ARGUMENT,
                     std::to_string(mt)});
  }
  {
    auto r = base;
    r.mutable_stopping()->set_max_tokens(5000);
    cases.push_back({"max_tokens past the context", r, grpc::StatusCode::INVALID_ARGUMENT, "5000"});
  }
  {
    v1::GenerateRequest r = base;
    r.mutable_prompt_tokens()->add_token_ids(5);
    r.mutable_prompt_tokens()->add_token_ids(99999);
    cases.push_back({"token id out of range", r, grpc::StatusCode::INVALID_ARGUMENT, "99999"});
  }
  {
    auto r = base;
    r.mutable_sampling()->set_temperature(-0.5f);
    cases.push_back({"temperature < 0", r, grpc::StatusCode::INVALID_ARGUMENT, "-0.5"});
  }
  for (float p : {0.f, 1.5f}) {
    auto r = base;
    r.mutable_sampling()->set_top_p(p);
    cases.push_back({"top_p " + std::to_string(p), r, grpc::StatusCode::INVALID_ARGUMENT,
                     p == 0.f ? "0" : "1.5"});
  }
  cases.push_back({"unknown session", Turn("0123456789abcdef0123456789abcdef", "hi", 4),
                   grpc::StatusCode::NOT_FOUND, "0123456789abcdef0123456789abcdef"});
  for (auto& c : cases) {
    auto r = Generate(*stub, c.req);
    INFO(c.name << ": " << r.status.error_code() << " " << r.status.error_message());
    CHECK(r.status.error_code() == c.code);
    CHECK(r.status.error_message().find(c.needle) != std::string::npos);
  }
  // A closed session is gone.
  auto open = Generate(*stub, Greedy("hello there", 4, true));
  REQUIRE(open.status.ok());
  {
    grpc::ClientContext ctx;
    v1::CloseSessionRequest req;
    req.set_session_id(open.session_id);
    v1::CloseSessionResponse resp;
    REQUIRE(stub->CloseSession(&ctx, req, &resp).ok());
  }
  auto closed = Generate(*stub, Turn(open.session_id, " more", 4));
  CHECK(closed.status.error_code() == grpc::StatusCode::NOT_FOUND);
  // After all of that, the server still serves and every block is free.
  auto ok = Generate(*stub, Greedy("hello there", 8));
  CHECK(ok.status.ok());
  const auto list = List(*stub);
  CHECK(list.kv_blocks_free() == list.kv_blocks_total());
}

TEST_CASE("prefill down: UNAVAILABLE quickly, blocks freed, and service resumes", "[pair]") {
  const int port = FreePort();
  auto prefill = StartPrefill(port);
  auto decode = StartDecode("127.0.0.1:" + std::to_string(port), "bf16");
  auto stub = Client(*decode);
  REQUIRE(Generate(*stub, Greedy("hello there", 4)).status.ok());
  // Kill prefill while a long prompt is being prefilled.
  std::string longp;
  for (int i = 0; i < 250; ++i) longp += "the king of the land ";
  auto pending = std::async(std::launch::async, [&] { return Generate(*stub, Greedy(longp, 8)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  prefill->Kill();
  const auto t0 = std::chrono::steady_clock::now();
  auto r = pending.get();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(r.status.error_message());
  // Either the stream was cut (UNAVAILABLE) or it had already finished before the kill.
  CHECK((r.status.error_code() == grpc::StatusCode::UNAVAILABLE || r.status.ok()));
  CHECK(waited < 3.0);
  auto down = Generate(*stub, Greedy("hello there", 4));
  CHECK(down.status.error_code() == grpc::StatusCode::UNAVAILABLE);
  auto list = List(*stub);
  CHECK(list.kv_blocks_free() == list.kv_blocks_total());
  // Back up on the same port: decode serves again.
  prefill = StartPrefill(port);
  bool served = false;
  for (int i = 0; i < 50 && !served; ++i) {
    served = Generate(*stub, Greedy("hello there", 4)).status.ok();
    if (!served) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(served);
}

TEST_CASE("a cancelled stream frees its blocks", "[pair]") {
  auto prefill = StartPrefill();
  auto decode = StartDecode(prefill->address(), "bf16");
  auto stub = Client(*decode);
  const auto before = List(*stub);
  {
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, Greedy("the meaning of a word", 1500, true));
    v1::GenerateResponse m;
    REQUIRE(reader->Read(&m));  // the first token arrived: it is generating
    ctx.TryCancel();
    while (reader->Read(&m)) {
    }
    CHECK(reader->Finish().error_code() == grpc::StatusCode::CANCELLED);
  }
  bool freed = false;
  for (int i = 0; i < 100 && !freed; ++i) {
    freed = List(*stub).kv_blocks_free() == before.kv_blocks_free();
    if (!freed) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  CHECK(freed);
  CHECK(Generate(*stub, Greedy("hello there", 4)).status.ok());
}
