#include "duet/prefill/flags.h"

#include "duet/metrics/metrics.h"

#include <charconv>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string_view>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "duet/model/model.h"

namespace duet::prefill {
namespace {

struct FlagSpec {
  const char* flag;  // without the leading "--"
  const char* env;
};

constexpr FlagSpec kFlags[] = {
    {"model", "DUET_MODEL"},
    {"listen", "DUET_LISTEN"},
    {"threads", "DUET_THREADS"},
    {"max-queue", "DUET_MAX_QUEUE"},
    {"max-batch", "DUET_MAX_BATCH"},
    {"precision", "DUET_PRECISION"},
    {"kv-cache-dtype", "DUET_KV_CACHE_DTYPE"},
    {"model-name", "DUET_MODEL_NAME"},
    {"block-size", "DUET_BLOCK_SIZE"},
    {"max-chunk-bytes", "DUET_MAX_CHUNK_BYTES"},
    {"max-context", "DUET_MAX_CONTEXT"},
    {"metrics-listen", "DUET_METRICS_LISTEN"},
    {"drain-s", "DUET_DRAIN_S"},
};

// One setting's value and where it came from ("--flag" or "ENV"), for error messages.
struct Value {
  std::string text;
  std::string source;
};

absl::StatusOr<int64_t> ParseInt(const Value& v, int64_t lo, int64_t hi) {
  int64_t x = 0;
  const char* end = v.text.data() + v.text.size();
  auto [p, ec] = std::from_chars(v.text.data(), end, x);
  if (v.text.empty() || ec != std::errc() || p != end || x < lo || x > hi) {
    return absl::InvalidArgumentError(absl::StrCat(v.source, ": expected an integer in [", lo, ", ",
                                                   hi, "], got \"", v.text, "\""));
  }
  return x;
}

}  // namespace

std::string Usage() {
  return "usage: duet-prefill --model DIR [--listen HOST:PORT] [--threads N] [--max-queue N]\n"
         "                    [--precision bf16|f32] [--kv-cache-dtype f32|f16|int8]\n"
         "                    [--model-name NAME] [--block-size N]\n"
         "                    [--max-chunk-bytes N] [--max-context N]\n"
         "                    [--metrics-listen HOST:PORT|off] [--drain-s N] [--max-batch N]\n"
         "  --max-batch       prompts waiting together go into one forward pass, up to N of\n"
         "                    them and --max-context tokens in all (default 16)\n"
         "  --metrics-listen  Prometheus /metrics over HTTP (default 127.0.0.1:9402; port 0 picks\n"
         "                    a free port; off: none)\n"
         "  --drain-s         on SIGTERM, seconds running streams get to finish (default 20)\n"
         "  --kv-cache-dtype  element type of the engine's K/V cache: f32 (default), f16 (half\n"
         "                    the memory; about 2^-12 relative error per element) or int8 (a\n"
         "                    quarter; one scale per position and head, error <= max/254)\n"
         "Every flag has an environment twin: DUET_MODEL, DUET_LISTEN, DUET_THREADS,\n"
         "DUET_MAX_QUEUE, DUET_PRECISION, DUET_MODEL_NAME, DUET_BLOCK_SIZE,\n"
         "DUET_MAX_CHUNK_BYTES, DUET_MAX_CONTEXT, DUET_METRICS_LISTEN, DUET_DRAIN_S,\n"
         "DUET_MAX_BATCH, DUET_KV_CACHE_DTYPE\n"
         "(a flag wins over its variable).\n";
}

absl::StatusOr<PrefillFlags> ParseFlags(int argc, const char* const* argv, const GetEnv& getenv) {
  PrefillFlags out;
  std::map<std::string, Value> given;  // by flag name
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      out.help = true;
      return out;
    }
    if (!arg.starts_with("--")) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument \"", std::string(arg), "\""));
    }
    std::string name(arg.substr(2));
    std::optional<std::string> text;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      text = name.substr(eq + 1);
      name.resize(eq);
    }
    bool known = false;
    for (const FlagSpec& f : kFlags) known = known || name == f.flag;
    if (!known) return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    if (!text.has_value()) {
      if (i + 1 >= argc)
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      text = argv[++i];
    }
    given[name] = {*text, absl::StrCat("--", name)};
  }
  // Environment twins fill what the command line left out.
  for (const FlagSpec& f : kFlags) {
    if (given.count(f.flag) != 0) continue;
    if (const char* v = getenv(f.env); v != nullptr && *v != '\0') given[f.flag] = {v, f.env};
  }
  auto get = [&given](const char* flag) -> const Value* {
    auto it = given.find(flag);
    return it == given.end() ? nullptr : &it->second;
  };

  ServerOptions& s = out.server;
  const Value* model = get("model");
  if (model == nullptr)
    return absl::InvalidArgumentError("--model DIR (or DUET_MODEL) is required");
  std::error_code ec;
  if (!std::filesystem::is_directory(model->text, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat(model->source, ": \"", model->text, "\" is not a directory"));
  }
  s.model_dir = model->text;

  if (const Value* v = get("listen")) {
    const size_t colon = v->text.rfind(':');
    if (colon == std::string::npos || colon == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(v->source, ": expected HOST:PORT, got \"", v->text, "\""));
    }
    auto port = ParseInt({v->text.substr(colon + 1), v->source + " port"}, 0, 65535);
    if (!port.ok()) return port.status();
    s.listen = v->text;
  }
  if (const Value* v = get("threads")) {
    auto n = ParseInt(*v, 0, 4096);
    if (!n.ok()) return n.status();
    s.engine.n_threads = static_cast<int32_t>(*n);
  }
  if (const Value* v = get("max-batch")) {
    auto n = ParseInt(*v, 1, 1024);
    if (!n.ok()) return n.status();
    s.engine.max_batch = static_cast<int32_t>(*n);
  }
  if (const Value* v = get("max-queue")) {
    auto n = ParseInt(*v, 1, 1 << 20);
    if (!n.ok()) return n.status();
    s.engine.max_queue = static_cast<int32_t>(*n);
  }
  if (const Value* v = get("precision")) {
    if (v->text == "bf16") {
      s.model.precision = kernels::Precision::kBF16;
    } else if (v->text == "f32") {
      s.model.precision = kernels::Precision::kF32;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(v->source, ": expected bf16 or f32, got \"", v->text, "\""));
    }
  }
  if (const Value* v = get("kv-cache-dtype")) {
    auto d = model::ParseKvCacheDtype(v->text);
    if (!d.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(v->source, ": expected f32, f16 or int8, got \"", v->text, "\""));
    }
    s.model.kv_cache_dtype = *d;
  }
  if (const Value* v = get("model-name")) s.model_name = v->text;
  if (const Value* v = get("block-size")) {
    auto n = ParseInt(*v, 1, 4096);
    if (!n.ok()) return n.status();
    s.engine.block_size = static_cast<int32_t>(*n);
  }
  if (const Value* v = get("max-chunk-bytes")) {
    // Chunks plus framing must stay well under gRPC's 4 MiB message limit.
    auto n = ParseInt(*v, 1, int64_t{3} << 20);
    if (!n.ok()) return n.status();
    s.engine.max_chunk_bytes = static_cast<uint32_t>(*n);
  }
  if (const Value* v = get("max-context")) {
    // Checked against the model's context when the model is loaded.
    auto n = ParseInt(*v, 1, int64_t{1} << 30);
    if (!n.ok()) return n.status();
    s.engine.max_context = static_cast<int32_t>(*n);
  }
  s.metrics_listen = "127.0.0.1:9402";
  if (const Value* v = get("metrics-listen")) {
    auto m = metrics::ParseListen(v->text, v->source);
    if (!m.ok()) return m.status();
    s.metrics_listen = *m;
  }
  if (const Value* v = get("drain-s")) {
    auto n = ParseInt(*v, 0, 3600);
    if (!n.ok()) return n.status();
    out.drain = std::chrono::seconds(*n);
  }
  return out;
}

}  // namespace duet::prefill
