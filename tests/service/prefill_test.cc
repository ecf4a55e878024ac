// duet-prefill in-process: a PrefillServer on 127.0.0.1, port 0, called through a real gRPC
// stub. The streamed K/V must decode (kv::KvStreamDecoder) to what a local forward pass of the
// same prompt computes, the logits must match the torch reference, and every failure must come
// back with its status code and the offending value, freeing what it held.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "duet/kv/block_pool.h"
#include "duet/kv/codec.h"
#include "duet/model/model.h"
#include "duet/prefill/engine.h"
#include "duet/prefill/flags.h"
#include "duet/prefill/server.h"
#include "duet/v1/prefill.grpc.pb.h"

namespace v1 = duet::v1;
using duet::kernels::Precision;
using duet::kv::BlockPool;
using duet::kv::SequenceKv;
using duet::model::Model;
using duet::prefill::PrefillFlags;
using duet::prefill::PrefillServer;
using duet::prefill::PrefillSink;
using duet::prefill::ServerOptions;
using namespace std::chrono_literals;

namespace {

std::string ModelDir(const std::string& name) {
  if (name == "duet-tiny") return std::string(DUET_SOURCE_DIR) + "/models/duet-tiny";
  return std::string(DUET_SOURCE_DIR) + "/tests/data/models/" + name;
}

struct Golden {
  std::vector<int32_t> token_ids;
  std::vector<float> last_logits;  // the reference's logits of the last position
};

Golden LoadGolden(const std::string& name) {
  std::ifstream in(ModelDir(name) + "/golden.json");
  const auto j = nlohmann::json::parse(in);
  Golden g;
  g.token_ids = j["token_ids"].get<std::vector<int32_t>>();
  g.last_logits = j["logits"].back().get<std::vector<float>>();
  return g;
}

// Tiny settings: 4-token blocks, a short queue, no request log.
ServerOptions Options(const std::string& name, Precision precision = Precision::kF32) {
  ServerOptions o;
  o.model_dir = ModelDir(name);
  o.listen = "127.0.0.1:0";
  o.model.precision = precision;
  o.engine.block_size = 4;
  o.engine.max_queue = 4;
  o.engine.log_requests = false;
  return o;
}

bool WaitUntil(const std::function<bool()>& done, std::chrono::milliseconds timeout = 10s) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

struct Reply {
  std::vector<v1::PrefillResponse> messages;
  grpc::Status status;
};

// A server under test and a stub connected to it; the server stops at scope exit.
struct Harness {
  explicit Harness(const ServerOptions& options) {
    auto s = PrefillServer::Start(options);
    INFO(s.status().ToString());
    REQUIRE(s.ok());
    server = std::move(*s);
    channel = grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials());
    stub = v1::PrefillService::NewStub(channel);
  }
  ~Harness() { server->Shutdown(0ms); }

  // One whole call; `context` (if given) is the caller's, e.g. to cancel it from another thread.
  Reply Prefill(const v1::PrefillRequest& request, grpc::ClientContext* context = nullptr) {
    grpc::ClientContext own;
    if (context == nullptr) {
      own.set_deadline(std::chrono::system_clock::now() + 30s);
      context = &own;
    }
    auto reader = stub->Prefill(context, request);
    Reply r;
    v1::PrefillResponse m;
    while (reader->Read(&m)) r.messages.push_back(m);
    r.status = reader->Finish();
    return r;
  }

  duet::prefill::EngineStats stats() { return server->engine().stats(); }
  // Waits until the engine is idle: nothing running, nothing waiting.
  bool WaitIdle() {
    return WaitUntil([this] {
      const auto s = stats();
      return !s.running && s.queued == 0;
    });
  }

  std::unique_ptr<PrefillServer> server;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::PrefillService::Stub> stub;
};

v1::PrefillRequest Request(const std::vector<int32_t>& tokens,
                           v1::KvDtype dtype = v1::KV_DTYPE_UNSPECIFIED,
                           uint32_t max_chunk_bytes = 0) {
  v1::PrefillRequest r;
  r.mutable_token_ids()->Add(tokens.begin(), tokens.end());
  r.set_kv_dtype(dtype);
  r.set_max_chunk_bytes(max_chunk_bytes);
  return r;
}

// The prompt's K/V and last logits from a local forward pass, as the server computes them.
struct LocalRun {
  std::unique_ptr<Model> model;
  std::unique_ptr<BlockPool> pool;
  std::unique_ptr<SequenceKv> kv;
  std::vector<float> logits;
};

LocalRun RunLocally(const std::string& name, Precision precision,
                    const std::vector<int32_t>& tokens) {
  LocalRun run;
  auto m = Model::Load(ModelDir(name), {precision});
  REQUIRE(m.ok());
  run.model = std::move(*m);
  // The server's block size: the same blocks make the same attention sums, so f32 is exact.
  auto pool = BlockPool::Create(run.model->kv_shape(4), 64);
  REQUIRE(pool.ok());
  run.pool = std::move(*pool);
  run.kv = std::make_unique<SequenceKv>(run.pool.get());
  REQUIRE(run.kv->Reserve(static_cast<int32_t>(tokens.size())).ok());
  const duet::model::BatchItem item{tokens, run.kv.get(), false};
  REQUIRE(run.model->Forward({&item, 1}, &run.logits).ok());
  return run;
}

// Decodes a reply's header and chunks into `dest` (a sequence of a client-side pool).
void Decode(const Reply& r, const Model& model, SequenceKv* dest) {
  duet::kv::KvExpectation expect;
  expect.model_fingerprint = model.fingerprint();
  expect.shape = dest->pool()->shape();
  expect.max_tokens = model.config().n_ctx;
  duet::kv::KvStreamDecoder decoder(expect);
  REQUIRE(!r.messages.empty());
  REQUIRE(r.messages.front().has_header());
  const v1::KvHeader& header = r.messages.front().header();
  REQUIRE(dest->Reserve(static_cast<int32_t>(header.n_tokens())).ok());
  const absl::Status h = decoder.OnHeader(header, dest);
  INFO(h.ToString());
  REQUIRE(h.ok());
  for (const auto& m : r.messages) {
    if (!m.has_chunk()) continue;
    const absl::Status c = decoder.OnChunk(m.chunk());
    INFO(c.ToString());
    REQUIRE(c.ok());
  }
  REQUIRE(decoder.Finish().ok());
  REQUIRE(dest->n_tokens() == static_cast<int32_t>(header.n_tokens()));
}

// K then V of every kv head at (layer, position): [2][n_kv_heads][head_dim].
std::vector<float> KvAt(const SequenceKv& seq, int32_t layer, int32_t pos) {
  const duet::kernels::PagedKvLayout l = seq.pool()->Layout(layer);
  const int32_t block = seq.blocks()[pos / l.block_size];
  const int32_t slot = pos % l.block_size;
  const int32_t d = l.head_dim;
  std::vector<float> out(2 * static_cast<size_t>(l.n_kv_heads) * d);
  for (int32_t h = 0; h < l.n_kv_heads; ++h) {
    l.LoadK(block, h, slot, out.data() + static_cast<size_t>(h) * d);
    l.LoadV(block, h, slot, out.data() + static_cast<size_t>(l.n_kv_heads + h) * d);
  }
  return out;
}

// Largest |a - b| relative to bf16's rounding of b (<= 1 when a is b rounded to bf16).
double Bf16Ulps(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double tol = std::fabs(double{b[i]}) * std::ldexp(1.0, -8) + 1e-30;
    worst = std::max(worst, std::fabs(double{a[i]} - b[i]) / tol);
  }
  return worst;
}

// The whole stream of `name`'s golden prompt with small chunks, checked message by message.
void CheckStream(const std::string& name, v1::KvDtype wire) {
  Harness h(Options(name));
  const Golden g = LoadGolden(name);
  const int32_t n = static_cast<int32_t>(g.token_ids.size());
  constexpr uint32_t kChunkBytes = 1024;  // forces several chunks per layer
  const Reply r = h.Prefill(Request(g.token_ids, wire, kChunkBytes));
  INFO(r.status.error_message());
  REQUIRE(r.status.ok());
  REQUIRE(r.messages.size() >= 3);
  LocalRun local = RunLocally(name, Precision::kF32, g.token_ids);
  const auto& c = local.model->config();

  for (const auto& m : r.messages) CHECK(m.ByteSizeLong() < (4u << 20));

  const v1::KvHeader& header = r.messages.front().header();
  CHECK(header.format_version() == duet::kv::kKvFormatVersion);
  CHECK(header.model_fingerprint() == local.model->fingerprint());
  CHECK(header.n_layers() == static_cast<uint32_t>(c.n_layers));
  CHECK(header.n_kv_heads() == static_cast<uint32_t>(c.n_kv_heads));
  CHECK(header.head_dim() == static_cast<uint32_t>(c.head_dim));
  CHECK(header.dtype() == wire);
  CHECK(header.layout() == v1::KV_LAYOUT_HEAD_TOKEN_DIM);
  CHECK(header.n_tokens() == static_cast<uint32_t>(n));
  CHECK(std::vector<int32_t>(header.token_ids().begin(), header.token_ids().end()) == g.token_ids);

  // Layers in order, each covering [0, n) in order, in several chunks of <= kChunkBytes.
  uint32_t layer = 0, next = 0;
  std::vector<int> chunks_per_layer(c.n_layers, 0);
  for (size_t i = 1; i + 1 < r.messages.size(); ++i) {
    REQUIRE(r.messages[i].has_chunk());
    const v1::KvChunk& chunk = r.messages[i].chunk();
    if (next == static_cast<uint32_t>(n)) {
      ++layer;
      next = 0;
    }
    REQUIRE(chunk.layer() == layer);
    REQUIRE(chunk.token_begin() == next);
    REQUIRE(chunk.token_end() > chunk.token_begin());
    CHECK(chunk.k().size() + chunk.v().size() <= kChunkBytes);
    next = chunk.token_end();
    ++chunks_per_layer[layer];
  }
  CHECK(layer == static_cast<uint32_t>(c.n_layers - 1));
  CHECK(next == static_cast<uint32_t>(n));
  for (int k : chunks_per_layer) CHECK(k >= 2);

  // The result: the last position's logits, as the torch reference computes them.
  REQUIRE(r.messages.back().has_result());
  const v1::KvResult& result = r.messages.back().result();
  CHECK(result.n_prompt_tokens() == static_cast<uint32_t>(n));
  REQUIRE(result.logits_size() == c.n_vocab);
  double max_diff = 0;
  for (int32_t v = 0; v < c.n_vocab; ++v) {
    max_diff = std::max(max_diff, std::fabs(double{result.logits(v)} - g.last_logits[v]));
  }
  INFO("max |dlogit| vs torch = " << max_diff);
  CHECK(max_diff <= 1e-3);
  CHECK(result.timings().compute_ns() > 0);
  CHECK(result.timings().total_ns() >= result.timings().compute_ns());
  CHECK(result.timings().total_ns() >= result.timings().queue_ns());

  // The K/V, decoded into a client pool with another block size, equal the local pass's.
  auto client_pool = BlockPool::Create(local.model->kv_shape(8), 16);
  REQUIRE(client_pool.ok());
  SequenceKv received(client_pool->get());
  Decode(r, *local.model, &received);
  double worst_ulps = 0;
  int mismatches = 0;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    for (int32_t p = 0; p < n; ++p) {
      const auto got = KvAt(received, l, p);
      const auto want = KvAt(*local.kv, l, p);
      if (wire == v1::KV_DTYPE_F32) {
        mismatches += got == want ? 0 : 1;
      } else {
        worst_ulps = std::max(worst_ulps, Bf16Ulps(got, want));
      }
    }
  }
  CHECK(mismatches == 0);
  CHECK(worst_ulps <= 1.0);
  CHECK(h.WaitIdle());
  const auto s = h.stats();
  CHECK(s.completed == 1);
  CHECK(s.pool_free_blocks == s.pool_blocks);
}

}  // namespace

TEST_CASE("Prefill streams header, chunks and result; f32 K/V equal a local pass exactly",
          "[prefill]") {
  CheckStream("llama-tiny-gqa", v1::KV_DTYPE_F32);
}

TEST_CASE("Prefill streams GPT-2 K/V in bf16 within rounding of a local pass", "[prefill]") {
  CheckStream("gpt2-tiny", v1::KV_DTYPE_BF16);
}

TEST_CASE("Prefill serves the bundled model in bf16 with the default chunking", "[prefill]") {
  Harness h(Options("duet-tiny", Precision::kBF16));
  std::vector<int32_t> tokens(200);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 37 + 11) % 4096);
  const Reply r = h.Prefill(Request(tokens));
  INFO(r.status.error_message());
  REQUIRE(r.status.ok());
  LocalRun local = RunLocally("duet-tiny", Precision::kBF16, tokens);
  const auto& c = local.model->config();
  const v1::KvHeader& header = r.messages.front().header();
  CHECK(header.dtype() == v1::KV_DTYPE_BF16);                       // UNSPECIFIED means bf16
  CHECK(r.messages.size() == static_cast<size_t>(c.n_layers) + 2);  // one chunk per layer

  const v1::KvResult& result = r.messages.back().result();
  REQUIRE(result.logits_size() == c.n_vocab);
  double max_diff = 0;
  for (int32_t v = 0; v < c.n_vocab; ++v) {
    max_diff = std::max(max_diff, std::fabs(double{result.logits(v)} - local.logits[v]));
  }
  INFO("max |dlogit| vs local = " << max_diff);
  CHECK(max_diff <= 1e-2);

  auto client_pool = BlockPool::Create(local.model->kv_shape(16), 16);
  REQUIRE(client_pool.ok());
  SequenceKv received(client_pool->get());
  Decode(r, *local.model, &received);
  double worst = 0;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    for (int32_t p = 0; p < static_cast<int32_t>(tokens.size()); ++p) {
      worst = std::max(worst, Bf16Ulps(KvAt(received, l, p), KvAt(*local.kv, l, p)));
    }
  }
  CHECK(worst <= 1.0);
}

TEST_CASE("Prefill rejects bad requests with the status and the offending value", "[prefill]") {
  Harness h(Options("llama-tiny-gqa"));  // vocab 128, context 64
  const std::string fingerprint = h.server->engine().model().fingerprint();
  struct Case {
    const char* what;
    v1::PrefillRequest request;
    grpc::StatusCode code;
    std::vector<std::string> in_message;
  };
  std::vector<Case> cases;
  cases.push_back({"empty prompt", Request({}), grpc::INVALID_ARGUMENT, {"empty"}});
  cases.push_back({"id >= vocab", Request({1, 128, 3}), grpc::INVALID_ARGUMENT, {"128", "[1]"}});
  cases.push_back({"negative id", Request({-5}), grpc::INVALID_ARGUMENT, {"-5"}});
  cases.push_back(
      {"too long", Request(std::vector<int32_t>(65, 7)), grpc::INVALID_ARGUMENT, {"65", "64"}});
  cases.push_back({"unknown dtype",
                   Request({1, 2}, static_cast<v1::KvDtype>(9)),
                   grpc::INVALID_ARGUMENT,
                   {"9"}});
  v1::PrefillRequest other = Request({1, 2});
  other.set_model_fingerprint("0123456789abcdef0123456789abcdef");
  cases.push_back({"other model",
                   other,
                   grpc::FAILED_PRECONDITION,
                   {"0123456789abcdef0123456789abcdef", fingerprint}});
  for (const Case& c : cases) {
    INFO(c.what);
    const Reply r = h.Prefill(c.request);
    CHECK(r.status.error_code() == c.code);
    CHECK(r.messages.empty());
    for (const auto& s : c.in_message) {
      INFO(r.status.error_message());
      CHECK(r.status.error_message().find(s) != std::string::npos);
    }
  }
  // The right fingerprint and a full-context prompt are fine.
  v1::PrefillRequest same = Request(std::vector<int32_t>(64, 7));
  same.set_model_fingerprint(fingerprint);
  CHECK(h.Prefill(same).status.ok());
  const auto s = h.stats();
  CHECK(s.completed == 1);
  CHECK(s.failed == 0);
}

TEST_CASE("A full queue answers RESOURCE_EXHAUSTED; the waiting request still runs", "[prefill]") {
  ServerOptions o = Options("llama-tiny-gqa");
  o.engine.max_queue = 1;
  Harness h(o);
  h.server->engine().Pause();
  Reply first;
  std::thread caller([&] { first = h.Prefill(Request({1, 2, 3})); });
  REQUIRE(WaitUntil([&] { return h.stats().queued == 1; }));
  const Reply rejected = h.Prefill(Request({4, 5}));
  CHECK(rejected.status.error_code() == grpc::RESOURCE_EXHAUSTED);
  CHECK(rejected.status.error_message().find("1") != std::string::npos);
  h.server->engine().Resume();
  caller.join();
  CHECK(first.status.ok());
  REQUIRE(!first.messages.empty());
  CHECK(first.messages.back().has_result());
}

TEST_CASE("Queued prefills run together in one pass; each equals its own pass", "[prefill]") {
  ServerOptions o = Options("llama-tiny-gqa");
  o.engine.max_queue = 8;
  // During the pass, the engine and /metrics count every job of it as running.
  std::atomic<PrefillServer*> server{nullptr};
  std::atomic<int> running_jobs{0};
  std::string running_metric;
  o.engine.after_layer_for_test = [&](int32_t layer, const PrefillSink&) {
    PrefillServer* srv = server.load();
    if (layer != 0 || srv == nullptr || running_jobs.load() != 0) return;
    running_jobs = srv->engine().stats().running_jobs;
    running_metric = srv->metrics_text();
  };
  Harness h(o);
  server = h.server.get();
  const Golden g = LoadGolden("llama-tiny-gqa");
  // Three prompts of different lengths (one of them the golden prompt), f32 on the wire; together
  // within the model's context of 64, so one pass takes them all.
  std::vector<std::vector<int32_t>> prompts = {g.token_ids, {5, 9, 2, 7, 1}, {}};
  for (int i = 0; i < 9; ++i) prompts[2].push_back((i * 37 + 11) % 96);
  REQUIRE(prompts[0].size() + prompts[1].size() + prompts[2].size() <= 64);
  h.server->engine().Pause();
  std::vector<Reply> replies(prompts.size());
  std::vector<std::thread> callers;
  for (size_t i = 0; i < prompts.size(); ++i) {
    callers.emplace_back([&, i] { replies[i] = h.Prefill(Request(prompts[i], v1::KV_DTYPE_F32)); });
    REQUIRE(WaitUntil([&] { return h.stats().queued == static_cast<int32_t>(i + 1); }));
  }
  const int64_t passes_before = h.stats().passes;
  h.server->engine().Resume();
  for (auto& c : callers) c.join();
  REQUIRE(h.WaitIdle());
  CHECK(h.stats().passes - passes_before == 1);  // all three in one forward pass
  CHECK(running_jobs.load() == 3);
  CHECK(running_metric.find("duet_prefill_requests_running{model_name=\"llama-tiny-gqa\",role=\"prefill\"} 3") !=
        std::string::npos);
  CHECK(h.stats().completed == 3);
  CHECK(h.stats().pool_free_blocks == h.stats().pool_blocks);

  for (size_t i = 0; i < prompts.size(); ++i) {
    INFO("prompt " << i << ": " << replies[i].status.error_message());
    REQUIRE(replies[i].status.ok());
    LocalRun local = RunLocally("llama-tiny-gqa", Precision::kF32, prompts[i]);
    const v1::KvResult& result = replies[i].messages.back().result();
    REQUIRE(result.logits_size() == static_cast<int>(local.logits.size()));
    double max_diff = 0;
    for (int v = 0; v < result.logits_size(); ++v)
      max_diff = std::max(max_diff, std::fabs(double{result.logits(v)} - local.logits[v]));
    CHECK(max_diff <= 1e-4);
    auto client_pool = BlockPool::Create(local.model->kv_shape(8), 16);
    REQUIRE(client_pool.ok());
    SequenceKv received(client_pool->get());
    Decode(replies[i], *local.model, &received);
    double worst = 0;
    const int32_t n = static_cast<int32_t>(prompts[i].size());
    for (int32_t l = 0; l < local.model->config().n_layers; ++l)
      for (int32_t p = 0; p < n; ++p) {
        const auto got = KvAt(received, l, p), want = KvAt(*local.kv, l, p);
        for (size_t j = 0; j < got.size(); ++j)
          worst = std::max(worst, std::fabs(double{got[j]} - want[j]));
      }
    CHECK(worst <= 1e-5);
  }
}

TEST_CASE("A call cancelled in the middle of a batched pass ends alone; the others complete",
          "[prefill]") {
  ServerOptions o = Options("llama-tiny-gqa");
  o.engine.max_queue = 8;
  // The pass calls the hook for each job after each layer, in queue order: the second job's call
  // after layer 0 waits until that job's caller has cancelled, so the cancellation lands mid-pass.
  std::atomic<int> layer0_calls{0};
  o.engine.after_layer_for_test = [&layer0_calls](int32_t layer, const PrefillSink& sink) {
    if (layer == 0 && layer0_calls.fetch_add(1) == 1) WaitUntil([&sink] { return sink.cancelled(); });
  };
  Harness h(o);
  h.server->engine().Pause();
  Reply a, b;
  grpc::StatusCode victim_code = grpc::OK;
  bool victim_result = false;
  std::thread ta([&] { a = h.Prefill(Request({1, 2, 3, 4, 5, 6, 7})); });
  REQUIRE(WaitUntil([&] { return h.stats().queued == 1; }));
  std::thread tv([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 30s);
    auto reader = h.stub->Prefill(&ctx, Request({8, 9, 10}, v1::KV_DTYPE_F32, 256));
    v1::PrefillResponse m;
    if (reader->Read(&m)) ctx.TryCancel();  // the header came: the pass has started
    while (reader->Read(&m)) victim_result = victim_result || m.has_result();
    victim_code = reader->Finish().error_code();
  });
  REQUIRE(WaitUntil([&] { return h.stats().queued == 2; }));
  std::thread tb([&] { b = h.Prefill(Request({11, 12, 13, 14})); });
  REQUIRE(WaitUntil([&] { return h.stats().queued == 3; }));
  const int64_t passes_before = h.stats().passes;
  h.server->engine().Resume();
  ta.join();
  tv.join();
  tb.join();
  CHECK(victim_code == grpc::CANCELLED);
  CHECK_FALSE(victim_result);
  CHECK(a.status.ok());
  CHECK(b.status.ok());
  CHECK(a.messages.back().has_result());
  CHECK(b.messages.back().has_result());
  REQUIRE(h.WaitIdle());
  const auto s = h.stats();
  CHECK(s.passes - passes_before == 1);
  CHECK(s.completed == 2);
  CHECK(s.cancelled == 1);
  CHECK(s.pool_free_blocks == s.pool_blocks);
}

TEST_CASE("A call cancelled after its first message ends CANCELLED and frees everything",
          "[prefill]") {
  ServerOptions o = Options("llama-tiny-gqa");
  // Hold the engine after layer 0 until the server has seen the cancellation, so that the job
  // is certainly aborted in the middle of its forward pass.
  std::atomic<bool> hold{true};
  o.engine.after_layer_for_test = [&hold](int32_t layer, const PrefillSink& sink) {
    if (layer == 0 && hold.load()) WaitUntil([&sink] { return sink.cancelled(); });
  };
  Harness h(o);
  const Golden g = LoadGolden("llama-tiny-gqa");

  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 30s);
  auto reader = h.stub->Prefill(&ctx, Request(g.token_ids, v1::KV_DTYPE_F32, 256));
  v1::PrefillResponse first;
  REQUIRE(reader->Read(&first));
  CHECK(first.has_header());
  ctx.TryCancel();
  v1::PrefillResponse m;
  bool got_result = false;
  while (reader->Read(&m)) got_result = got_result || m.has_result();
  CHECK(reader->Finish().error_code() == grpc::CANCELLED);
  CHECK_FALSE(got_result);

  REQUIRE(h.WaitIdle());
  auto s = h.stats();
  CHECK(s.cancelled == 1);
  CHECK(s.completed == 0);
  CHECK(s.pool_free_blocks == s.pool_blocks);

  hold = false;
  const Reply next = h.Prefill(Request(g.token_ids));
  CHECK(next.status.ok());
  CHECK(h.stats().completed == 1);
}

TEST_CASE("A call cancelled while queued is dropped and frees its queue slot", "[prefill]") {
  ServerOptions o = Options("llama-tiny-gqa");
  o.engine.max_queue = 1;
  Harness h(o);
  h.server->engine().Pause();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 30s);
  Reply cancelled;
  std::thread caller([&] { cancelled = h.Prefill(Request({1, 2, 3}), &ctx); });
  REQUIRE(WaitUntil([&] { return h.stats().queued == 1; }));
  ctx.TryCancel();
  caller.join();
  CHECK(cancelled.status.error_code() == grpc::CANCELLED);
  CHECK(cancelled.messages.empty());
  // Once the server has seen it, the cancelled job no longer holds the only slot.
  REQUIRE(WaitUntil([&] { return h.stats().queued == 0; }));
  Reply next;
  std::thread caller2([&] { next = h.Prefill(Request({4, 5, 6})); });
  REQUIRE(WaitUntil([&] { return h.stats().queued == 1; }));
  h.server->engine().Resume();
  caller2.join();
  CHECK(next.status.ok());
  REQUIRE(h.WaitIdle());
  const auto s = h.stats();
  CHECK(s.cancelled == 1);
  CHECK(s.completed == 1);
}

TEST_CASE("Deadlines: already passed, or passing during the pass", "[prefill]") {
  ServerOptions o = Options("llama-tiny-gqa");
  std::atomic<bool> hold{false};
  o.engine.after_layer_for_test = [&hold](int32_t layer, const PrefillSink& sink) {
    if (layer == 0 && hold.load()) WaitUntil([&sink] { return sink.cancelled(); });
  };
  Harness h(o);

  SECTION("already passed") {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() - 1s);
    const Reply r = h.Prefill(Request({1, 2, 3}), &ctx);
    CHECK(r.status.error_code() == grpc::DEADLINE_EXCEEDED);
    CHECK(r.messages.empty());
  }
  SECTION("passing while the engine computes") {
    hold = true;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 300ms);
    const Reply r = h.Prefill(Request({1, 2, 3}), &ctx);
    CHECK(r.status.error_code() == grpc::DEADLINE_EXCEEDED);
    REQUIRE(h.WaitIdle());
    const auto s = h.stats();
    CHECK(s.cancelled == 1);
    CHECK(s.pool_free_blocks == s.pool_blocks);
    hold = false;
  }
  const Reply next = h.Prefill(Request({1, 2, 3}));
  CHECK(next.status.ok());
}

TEST_CASE("Info describes the model and the limits", "[prefill]") {
  ServerOptions o = Options("llama-tiny-gqa");
  SECTION("defaults") {
    Harness h(o);
    grpc::ClientContext ctx;
    v1::InfoResponse info;
    REQUIRE(h.stub->Info(&ctx, v1::InfoRequest(), &info).ok());
    CHECK(info.model_name() == "llama-tiny-gqa");
    CHECK(info.model_fingerprint() == h.server->engine().model().fingerprint());
    CHECK(info.model_fingerprint().size() == 32);
    CHECK(info.vocab_size() == 128);
    CHECK(info.max_context() == 64);
    CHECK(info.n_layers() == 2);
    CHECK(info.n_kv_heads() == 2);
    CHECK(info.head_dim() == 8);
    CHECK(info.max_queue() == 4);
    CHECK(std::vector<int32_t>(info.eos_token_ids().begin(), info.eos_token_ids().end()) ==
          std::vector<int32_t>{2});
  }
  SECTION("a name and a shorter context") {
    o.model_name = "tiny";
    o.engine.max_context = 16;
    Harness h(o);
    grpc::ClientContext ctx;
    v1::InfoResponse info;
    REQUIRE(h.stub->Info(&ctx, v1::InfoRequest(), &info).ok());
    CHECK(info.model_name() == "tiny");
    CHECK(info.max_context() == 16);
    const Reply r = h.Prefill(Request(std::vector<int32_t>(17, 3)));
    CHECK(r.status.error_code() == grpc::INVALID_ARGUMENT);
    CHECK(r.status.error_message().find("17") != std::string::npos);
    // 16 tokens of 4-token blocks, plus one partly filled block per sequence of a batched pass.
    CHECK(h.server->engine().stats().pool_blocks == 4 + o.engine.max_batch);
  }
  SECTION("a context longer than the model's is refused at start") {
    o.engine.max_context = 65;
    auto s = PrefillServer::Start(o);
    CHECK(absl::IsInvalidArgument(s.status()));
    CHECK(s.status().message().find("65") != std::string::npos);
  }
}

TEST_CASE("The health service answers SERVING", "[prefill]") {
  Harness h(Options("gpt2-tiny"));
  grpc::GenericStub generic(h.channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 10s);
  grpc::ByteBuffer request;  // grpc.health.v1.HealthCheckRequest{service: ""}: no bytes
  grpc::Slice empty("");
  request = grpc::ByteBuffer(&empty, 1);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                    [&done](grpc::Status s) { done.set_value(std::move(s)); });
  const grpc::Status status = done.get_future().get();
  INFO(status.error_message());
  REQUIRE(status.ok());
  std::vector<grpc::Slice> slices;
  REQUIRE(response.Dump(&slices).ok());
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  CHECK(bytes == std::string("\x08\x01", 2));  // HealthCheckResponse{status: SERVING}
}

TEST_CASE("Shutdown lets a running stream finish, then refuses calls", "[prefill]") {
  ServerOptions o = Options("llama-tiny-gqa");
  std::atomic<bool> hold{true};
  o.engine.after_layer_for_test = [&hold](int32_t layer, const PrefillSink&) {
    if (layer == 0) WaitUntil([&hold] { return !hold.load(); });
  };
  Harness h(o);
  Reply running;
  std::thread caller([&] { running = h.Prefill(Request({1, 2, 3, 4, 5})); });
  REQUIRE(WaitUntil([&] { return h.stats().running; }));
  std::thread stopper([&] { h.server->Shutdown(10s); });
  std::this_thread::sleep_for(50ms);  // let Shutdown begin
  hold = false;
  caller.join();
  stopper.join();
  CHECK(running.status.ok());
  REQUIRE(!running.messages.empty());
  CHECK(running.messages.back().has_result());

  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 500ms);
  const Reply refused = h.Prefill(Request({1}), &ctx);
  CHECK_FALSE(refused.status.ok());
}

TEST_CASE("Flags: env twins, precedence, validation", "[prefill][flags]") {
  std::map<std::string, std::string> env;
  auto getenv = [&env](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  };
  auto parse = [&](std::vector<const char*> args) {
    args.insert(args.begin(), "duet-prefill");
    return duet::prefill::ParseFlags(static_cast<int>(args.size()), args.data(), getenv);
  };
  const std::string dir = ModelDir("gpt2-tiny");

  SECTION("defaults") {
    auto f = parse({"--model", dir.c_str()});
    REQUIRE(f.ok());
    CHECK(f->server.listen == "127.0.0.1:50052");
    CHECK(f->server.engine.max_queue == 16);
    CHECK(f->server.engine.max_chunk_bytes == (1u << 20));
    CHECK(f->server.model.precision == Precision::kBF16);
    CHECK(f->server.model.kv_cache_dtype == duet::kernels::KvDtype::kF32);
    CHECK(f->server.model_name.empty());
    auto i8 = parse({"--model", dir.c_str(), "--kv-cache-dtype", "int8"});
    REQUIRE(i8.ok());
    CHECK(i8->server.model.kv_cache_dtype == duet::kernels::KvDtype::kI8);
  }
  SECTION("environment twins, and flags win over them") {
    env = {{"DUET_MODEL", dir},       {"DUET_MAX_QUEUE", "3"},
           {"DUET_PRECISION", "f32"}, {"DUET_LISTEN", "127.0.0.1:0"},
           {"DUET_THREADS", "2"},     {"DUET_MODEL_NAME", "x"},
           {"DUET_BLOCK_SIZE", "8"},  {"DUET_MAX_CHUNK_BYTES", "4096"},
           {"DUET_KV_CACHE_DTYPE", "f16"}};
    auto f = parse({"--max-queue=5", "--model-name", "y"});
    REQUIRE(f.ok());
    CHECK(f->server.model_dir == dir);
    CHECK(f->server.engine.max_queue == 5);
    CHECK(f->server.model_name == "y");
    CHECK(f->server.model.precision == Precision::kF32);
    CHECK(f->server.listen == "127.0.0.1:0");
    CHECK(f->server.engine.n_threads == 2);
    CHECK(f->server.engine.block_size == 8);
    CHECK(f->server.engine.max_chunk_bytes == 4096);
    CHECK(f->server.model.kv_cache_dtype == duet::kernels::KvDtype::kF16);
  }
  SECTION("errors name the flag or variable and the value") {
    auto expect_error = [&](std::vector<const char*> args, std::vector<std::string> needles) {
      auto f = parse(std::move(args));
      REQUIRE_FALSE(f.ok());
      CHECK(absl::IsInvalidArgument(f.status()));
      for (const auto& s : needles) {
        INFO(f.status().message());
        CHECK(f.status().message().find(s) != std::string::npos);
      }
    };
    expect_error({}, {"--model"});
    expect_error({"--model", "/nonexistent/dir"}, {"/nonexistent/dir"});
    expect_error({"--model", dir.c_str(), "--precision", "fp8"}, {"--precision", "fp8"});
    expect_error({"--model", dir.c_str(), "--kv-cache-dtype", "bf16"}, {"--kv-cache-dtype", "bf16"});
    expect_error({"--model", dir.c_str(), "--max-queue", "0"}, {"--max-queue", "0"});
    expect_error({"--model", dir.c_str(), "--listen", "localhost"}, {"--listen", "localhost"});
    expect_error({"--model", dir.c_str(), "--listen", "h:99999"}, {"99999"});
    expect_error({"--model", dir.c_str(), "--max-chunk-bytes", "8388608"}, {"8388608"});
    expect_error({"--model", dir.c_str(), "--bogus", "1"}, {"--bogus"});
    expect_error({"--model"}, {"--model"});
    env["DUET_THREADS"] = "many";
    expect_error({"--model", dir.c_str()}, {"DUET_THREADS", "many"});
  }
}
