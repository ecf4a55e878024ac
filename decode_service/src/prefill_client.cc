#include "duet/decode/prefill_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "duet/kv/codec.h"

namespace duet::decode {

namespace {
std::string ChannelTarget(const std::string& target) {
  // A plain "a:1,b:2" list becomes gRPC's ipv4 resolver form; named targets pass through.
  if (target.find(',') != std::string::npos && target.find("://") == std::string::npos &&
      target.rfind("ipv4:", 0) != 0) {
    return "ipv4:" + target;
  }
  return target;
}
}  // namespace

PrefillClient::PrefillClient(const std::string& target, std::string model_fingerprint,
                             kv::KvShape shape)
    : target_(ChannelTarget(target)), fingerprint_(std::move(model_fingerprint)), shape_(shape) {
  grpc::ChannelArguments args;
  // round_robin over every address the target resolves to, skipping servers whose health service
  // does not say SERVING (a draining prefill pod says NOT_SERVING before it refuses calls), and
  // one retry on another server for a call refused with UNAVAILABLE before any reply arrived.
  args.SetServiceConfigJSON(R"json({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [{
      "name": [{"service": "duet.v1.PrefillService"}],
      "retryPolicy": {
        "maxAttempts": 3,
        "initialBackoff": "0.02s",
        "maxBackoff": "0.2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]
      }
    }]
  })json");
  args.SetMaxReceiveMessageSize(16 << 20);
  // Reconnect quickly after a prefill server comes back.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  auto channel = grpc::CreateCustomChannel(target_, grpc::InsecureChannelCredentials(), args);
  stub_ = v1::PrefillService::NewStub(channel);
}

absl::StatusOr<RemotePrefillResult> PrefillClient::Prefill(
    const std::vector<int32_t>& tokens, v1::KvDtype dtype,
    std::chrono::system_clock::time_point deadline, kv::SequenceKv* dest,
    const std::atomic<bool>* cancelled) {
  grpc::ClientContext ctx;
  ctx.set_deadline(deadline);
  v1::PrefillRequest req;
  req.mutable_token_ids()->Add(tokens.begin(), tokens.end());
  req.set_kv_dtype(dtype);
  req.set_model_fingerprint(fingerprint_);
  auto reader = stub_->Prefill(&ctx, req);

  kv::KvExpectation expect;
  expect.model_fingerprint = fingerprint_;
  expect.shape = shape_;
  expect.max_tokens = static_cast<int32_t>(tokens.size());
  kv::KvStreamDecoder decoder(expect);
  RemotePrefillResult result;
  absl::Status bad;
  bool have_result = false;
  v1::PrefillResponse msg;
  std::chrono::steady_clock::time_point t_first{}, t_last{};
  while (reader->Read(&msg)) {
    if (cancelled != nullptr && cancelled->load()) {
      ctx.TryCancel();
      bad = absl::CancelledError("generation cancelled during prefill");
      break;
    }
    const auto now = std::chrono::steady_clock::now();
    if (t_first == std::chrono::steady_clock::time_point{}) t_first = now;
    t_last = now;
    absl::Status st;
    switch (msg.payload_case()) {
      case v1::PrefillResponse::kHeader:
        if (msg.header().n_tokens() != tokens.size()) {
          st = absl::DataLossError(absl::StrCat("prefill returned K/V for ",
                                                msg.header().n_tokens(), " tokens, asked for ",
                                                tokens.size()));
        } else if (auto [want, got] = std::mismatch(tokens.begin(), tokens.end(),
                                                     msg.header().token_ids().begin(),
                                                     msg.header().token_ids().end());
                   want != tokens.end() || got != msg.header().token_ids().end()) {
          const auto at = want - tokens.begin();
          st = absl::DataLossError(absl::StrCat(
              "prefill returned K/V of other tokens than asked for: token ", at, " is ",
              got != msg.header().token_ids().end() ? absl::StrCat(*got) : std::string("missing"),
              ", asked for ", want != tokens.end() ? absl::StrCat(*want) : std::string("none")));
        } else {
          st = decoder.OnHeader(msg.header(), dest);
        }
        break;
      case v1::PrefillResponse::kChunk:
        st = decoder.OnChunk(msg.chunk());
        break;
      case v1::PrefillResponse::kResult:
        st = decoder.Finish();
        result.logits.assign(msg.result().logits().begin(), msg.result().logits().end());
        have_result = true;
        break;
      default:
        st = absl::DataLossError("prefill sent an empty message");
    }
    if (!st.ok()) {
      ctx.TryCancel();
      bad = st;
      break;
    }
  }
  const grpc::Status gs = reader->Finish();
  if (!bad.ok()) return bad;
  if (!gs.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(gs.error_code()),
                        absl::StrCat("prefill: ", gs.error_message()));
  }
  if (!have_result) return absl::DataLossError("prefill stream ended without a result");
  result.kv_bytes = decoder.bytes_received();
  result.transfer_s = std::chrono::duration<double>(t_last - t_first).count();
  return result;
}

}  // namespace duet::decode
