// duet-decode against a prefill server that lies: an in-process PrefillService relays a real
// duet-prefill's K/V stream with one mutation, and decode must refuse it with the right status
// code and a message naming the problem, leak no K/V blocks, and keep serving.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "duet/kv/codec.h"
#include "duet/v1/decode.grpc.pb.h"
#include "duet/v1/prefill.grpc.pb.h"
#include "process.h"

using duet::testing::ServerProcess;
namespace v1 = duet::v1;

namespace {

const std::string kModel = std::string(DUET_SOURCE_DIR) + "/models/duet-tiny";

enum class Mutation {
  kNone,
  kFingerprint,  // (a) the header names another model
  kFlipByte,     // (b) one byte of one chunk's k flipped, crc32c left as it was
  kDropLayer,    // (c) every chunk of a middle layer dropped
  kTruncate,     // (d) half the chunks, then OK without a result
  kSwapLayers,   // (e) two layers' chunks swapped
  kHeads,        // (f) header n_kv_heads changed
  kShortK,       // (g) a chunk's k 2 bytes short, crc32c recomputed to match
  kTokenIds,     // (h) the header's token ids are not the ones asked for
};

uint32_t ChunkCrc(const v1::KvChunk& c) {
  uint32_t crc = duet::kv::Crc32c(c.k().data(), c.k().size());
  crc = duet::kv::Crc32c(c.v().data(), c.v().size(), crc);
  crc = duet::kv::Crc32c(c.k_scales().data(), c.k_scales().size(), crc);
  return duet::kv::Crc32c(c.v_scales().data(), c.v_scales().size(), crc);
}

// Applies `m` to a whole upstream stream (header, chunks, result). Returns false when the stream
// lacks what the mutation needs (the test then fails on the tampered call count).
bool Mutate(Mutation m, std::vector<v1::PrefillResponse>* msgs) {
  if (m == Mutation::kNone) return true;
  if (msgs->size() < 3 || !(*msgs)[0].has_header() || !msgs->back().has_result()) return false;
  v1::KvHeader* header = (*msgs)[0].mutable_header();
  std::vector<size_t> chunks;  // indexes of the chunk messages
  for (size_t i = 0; i < msgs->size(); ++i)
    if ((*msgs)[i].has_chunk()) chunks.push_back(i);
  if (chunks.size() < 4 || header->n_layers() < 3) return false;
  auto of_layer = [&](uint32_t layer) {
    std::vector<v1::PrefillResponse> out;
    for (size_t i : chunks)
      if ((*msgs)[i].chunk().layer() == layer) out.push_back((*msgs)[i]);
    return out;
  };
  const uint32_t middle = header->n_layers() / 2;  // neither the first nor the last layer
  v1::KvChunk* mid_chunk = (*msgs)[chunks[chunks.size() / 2]].mutable_chunk();
  switch (m) {
    case Mutation::kNone:
      return true;
    case Mutation::kFingerprint: {
      std::string fp = header->model_fingerprint();
      if (fp.empty()) return false;
      fp[0] = fp[0] == '0' ? '1' : '0';
      header->set_model_fingerprint(fp);
      return true;
    }
    case Mutation::kFlipByte: {
      std::string* k = mid_chunk->mutable_k();
      if (k->empty()) return false;
      (*k)[k->size() / 2] = static_cast<char>((*k)[k->size() / 2] ^ 0x5a);
      return true;
    }
    case Mutation::kDropLayer: {
      std::vector<v1::PrefillResponse> out;
      for (auto& msg : *msgs)
        if (!msg.has_chunk() || msg.chunk().layer() != middle) out.push_back(std::move(msg));
      *msgs = std::move(out);
      return true;
    }
    case Mutation::kTruncate:
      msgs->resize(1 + chunks.size() / 2);  // the header and the first half of the chunks
      return true;
    case Mutation::kSwapLayers: {
      // Layer `middle` before layer `middle - 1`.
      std::vector<v1::PrefillResponse> out = {(*msgs)[0]};
      for (uint32_t layer = 0; layer < header->n_layers(); ++layer) {
        const uint32_t from = layer == middle - 1 ? middle : layer == middle ? middle - 1 : layer;
        for (auto& c : of_layer(from)) out.push_back(std::move(c));
      }
      out.push_back(msgs->back());
      *msgs = std::move(out);
      return true;
    }
    case Mutation::kHeads:
      header->set_n_kv_heads(header->n_kv_heads() + 1);
      return true;
    case Mutation::kShortK:
      if (mid_chunk->k().size() < 2) return false;
      mid_chunk->mutable_k()->resize(mid_chunk->k().size() - 2);
      mid_chunk->set_crc32c(ChunkCrc(*mid_chunk));
      return true;
    case Mutation::kTokenIds:
      header->set_token_ids(1, header->token_ids(1) == 7 ? 8 : 7);
      return true;
  }
  return false;
}

// A PrefillService on 127.0.0.1:0 that forwards Prefill to a real duet-prefill, reads its whole
// stream, applies the current mutation and relays the result to the caller.
class TamperingPrefill final : public v1::PrefillService::Service {
 public:
  // Small chunks, so that every layer of a short prompt arrives in several of them.
  static constexpr uint32_t kChunkBytes = 2048;

  explicit TamperingPrefill(const std::string& upstream)
      : stub_(v1::PrefillService::NewStub(
            grpc::CreateChannel(upstream, grpc::InsecureChannelCredentials()))) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(this);
    server_ = builder.BuildAndStart();
    REQUIRE(server_ != nullptr);
    REQUIRE(port_ > 0);
  }
  ~TamperingPrefill() override {
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  void set_mutation(Mutation m) { mutation_.store(m); }
  int tampered() const { return tampered_.load(); }  // calls the mutation applied to
  int calls() const { return calls_.load(); }
  // The shape of the last untampered upstream stream.
  std::pair<int, int> last_stream_shape() {
    std::lock_guard<std::mutex> lock(mu_);
    return {last_n_chunks_, last_n_layers_};
  }

  grpc::Status Prefill(grpc::ServerContext* ctx, const v1::PrefillRequest* req,
                       grpc::ServerWriter<v1::PrefillResponse>* writer) override {
    calls_.fetch_add(1);
    const Mutation m = mutation_.load();
    grpc::ClientContext up;
    up.set_deadline(ctx->deadline());
    v1::PrefillRequest fwd = *req;
    if (fwd.max_chunk_bytes() == 0 || fwd.max_chunk_bytes() > kChunkBytes)
      fwd.set_max_chunk_bytes(kChunkBytes);
    auto reader = stub_->Prefill(&up, fwd);
    std::vector<v1::PrefillResponse> msgs;
    v1::PrefillResponse msg;
    while (reader->Read(&msg)) msgs.push_back(msg);
    const grpc::Status upstream = reader->Finish();
    if (!upstream.ok()) return upstream;  // relayed as is: only the stream is tampered with
    {
      std::lock_guard<std::mutex> lock(mu_);
      last_n_chunks_ = static_cast<int>(msgs.size()) - 2;
      last_n_layers_ = msgs.empty() ? 0 : static_cast<int>(msgs[0].header().n_layers());
    }
    if (!Mutate(m, &msgs)) {
      return grpc::Status(grpc::StatusCode::INTERNAL, "tampering: the stream is too short");
    }
    if (m != Mutation::kNone) tampered_.fetch_add(1);
    for (const auto& out : msgs)
      if (!writer->Write(out)) break;  // decode gave up on the stream: fine
    return grpc::Status::OK;
  }

 private:
  std::unique_ptr<v1::PrefillService::Stub> stub_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::atomic<Mutation> mutation_{Mutation::kNone};
  std::atomic<int> tampered_{0};
  std::atomic<int> calls_{0};
  std::mutex mu_;
  int last_n_chunks_ = 0;
  int last_n_layers_ = 0;
};

struct Reply {
  grpc::Status status;
  std::vector<int32_t> ids;
  std::string text;
};

Reply Generate(v1::DecodeService::Stub& stub, const std::string& prompt, int max_tokens,
               bool open_session) {
  v1::GenerateRequest req;
  req.set_prompt(prompt);
  req.mutable_sampling()->set_temperature(0.f);
  req.mutable_stopping()->set_max_tokens(max_tokens);
  req.mutable_stopping()->set_ignore_eos(true);
  req.set_open_session(open_session);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  auto reader = stub.Generate(&ctx, req);
  Reply r;
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    r.ids.insert(r.ids.end(), m.token_ids().begin(), m.token_ids().end());
    r.text += m.text();
  }
  r.status = reader->Finish();
  return r;
}

v1::ListSessionsResponse List(v1::DecodeService::Stub& stub) {
  grpc::ClientContext ctx;
  v1::ListSessionsResponse resp;
  const grpc::Status s = stub.ListSessions(&ctx, {}, &resp);
  REQUIRE(s.ok());
  return resp;
}

// duet-prefill <- TamperingPrefill <- duet-decode, all on 127.0.0.1.
struct Chain {
  ServerProcess prefill{
      DUET_PREFILL_BIN,
      {"--model", kModel, "--listen", "127.0.0.1:0", "--precision", "f32", "--threads", "1"}};
  TamperingPrefill tamper{prefill.address()};
  ServerProcess decode{
      DUET_DECODE_BIN,
      {"--model", kModel, "--listen", "127.0.0.1:0", "--prefill", tamper.address(), "--precision",
       "f32", "--threads", "1", "--kv-blocks", "256", "--prefill-timeout-ms", "5000"}};
  std::unique_ptr<v1::DecodeService::Stub> stub = v1::DecodeService::NewStub(
      grpc::CreateChannel(decode.address(), grpc::InsecureChannelCredentials()));
};

// ~15 tokens: with 2 KiB chunks every layer comes in several chunks.
const char kPrompt[] = "the meaning of a word and the king said unto them that a small animal";
constexpr int kMaxTokens = 4;

}  // namespace

TEST_CASE(
    "decode refuses a tampered K/V stream with the right code, leaks nothing, and "
    "serves on",
    "[pair][corrupt]") {
  Chain chain;
  TamperingPrefill& tamper = chain.tamper;
  v1::DecodeService::Stub& stub = *chain.stub;
  const std::string prompt = kPrompt;

  // The untampered baseline through the relay.
  const Reply baseline = Generate(stub, prompt, kMaxTokens, false);
  INFO(baseline.status.error_message());
  REQUIRE(baseline.status.ok());
  REQUIRE(baseline.ids.size() == static_cast<size_t>(kMaxTokens));
  REQUIRE(tamper.calls() == 1);
  const auto [n_chunks, n_layers] = tamper.last_stream_shape();
  INFO("upstream stream: " << n_chunks << " chunks over " << n_layers << " layers");
  REQUIRE(n_layers >= 3);
  REQUIRE(n_chunks >= 2 * n_layers);  // several chunks per layer

  struct Case {
    const char* name;
    Mutation mutation;
    grpc::StatusCode code;
    std::vector<std::string> needles;  // each must appear in the message
  };
  const std::string middle = std::to_string(n_layers / 2);
  const std::string before_middle = std::to_string(n_layers / 2 - 1);
  const std::vector<Case> cases = {
      {"(a) another model's fingerprint in the header",
       Mutation::kFingerprint,
       grpc::StatusCode::FAILED_PRECONDITION,
       {"fingerprint"}},
      {"(b) a byte of k flipped, crc32c unchanged",
       Mutation::kFlipByte,
       grpc::StatusCode::DATA_LOSS,
       {"crc32c"}},
      {"(c) a middle layer dropped",
       Mutation::kDropLayer,
       grpc::StatusCode::DATA_LOSS,
       {"layer", "expected layer " + middle}},
      {"(d) truncated after half the chunks, OK without a result",
       Mutation::kTruncate,
       grpc::StatusCode::DATA_LOSS,
       {"without a result"}},
      {"(e) two layers out of order",
       Mutation::kSwapLayers,
       grpc::StatusCode::DATA_LOSS,
       {"layer " + middle, "expected layer " + before_middle}},
      {"(f) header n_kv_heads changed",
       Mutation::kHeads,
       grpc::StatusCode::FAILED_PRECONDITION,
       {"n_kv_heads"}},
      {"(g) k 2 bytes short, crc32c recomputed",
       Mutation::kShortK,
       grpc::StatusCode::DATA_LOSS,
       {"k has", "bytes, expected"}},
  };

  int tampered = tamper.tampered();
  for (const Case& c : cases) {
    for (const bool open_session : {false, true}) {
      INFO(c.name << (open_session ? " (open_session)" : ""));
      tamper.set_mutation(c.mutation);
      const Reply r = Generate(stub, prompt, kMaxTokens, open_session);
      tamper.set_mutation(Mutation::kNone);
      INFO("decode said " << r.status.error_code() << ": " << r.status.error_message());
      REQUIRE(tamper.tampered() == ++tampered);  // the stream really was tampered with
      CHECK(r.status.error_code() == c.code);
      for (const auto& needle : c.needles) {
        INFO("expected in the message: \"" << needle << "\"");
        CHECK(r.status.error_message().find(needle) != std::string::npos);
      }
      CHECK(r.ids.empty());  // not one token from a refused stream

      // Nothing leaked, and an honest stream through the same decode still works.
      const auto list = List(stub);
      CHECK(list.kv_blocks_free() == list.kv_blocks_total());
      const Reply ok = Generate(stub, prompt, kMaxTokens, false);
      INFO("untampered afterwards: " << ok.status.error_message());
      CHECK(ok.status.ok());
      CHECK(ok.ids == baseline.ids);
    }
  }
  const auto list = List(stub);
  CHECK(list.kv_blocks_free() == list.kv_blocks_total());
  CHECK(list.kv_blocks_total() == 256);
}

// Decode checks the header's token ids against the prompt it asked for, not only their count.
TEST_CASE("decode refuses K/V whose header names other tokens than it asked for",
          "[pair][corrupt]") {
  Chain chain;
  const Reply baseline = Generate(*chain.stub, kPrompt, kMaxTokens, false);
  REQUIRE(baseline.status.ok());
  chain.tamper.set_mutation(Mutation::kTokenIds);
  const Reply r = Generate(*chain.stub, kPrompt, kMaxTokens, false);
  chain.tamper.set_mutation(Mutation::kNone);
  INFO("decode said " << r.status.error_code() << ": " << r.status.error_message());
  REQUIRE(chain.tamper.tampered() == 1);
  CHECK(r.status.error_code() == grpc::StatusCode::DATA_LOSS);
  CHECK(r.status.error_message().find("token") != std::string::npos);
  const auto list = List(*chain.stub);
  CHECK(list.kv_blocks_free() == list.kv_blocks_total());
  CHECK(Generate(*chain.stub, kPrompt, kMaxTokens, false).ids == baseline.ids);
}
