// duet-decode: the client-facing server. Flags have environment twins (DUET_*); bad
// configuration fails at start with one line and exit code 2.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <thread>

#include "duet/decode/service.h"
#include "duet/metrics/metrics.h"
#include "duet/metrics/server_metrics.h"
#include "duet/kernels/threads.h"
#include "duet/tensor/malloc_tuning.h"

namespace {

struct Flag {
  std::string env;
  std::string value;
  std::string help;
};

std::map<std::string, Flag> DefaultFlags() {
  return {
      {"model", {"DUET_MODEL", "", "model directory (HF layout)"}},
      {"listen", {"DUET_LISTEN", "127.0.0.1:50051", "gRPC address to listen on"}},
      {"prefill", {"DUET_PREFILL", "127.0.0.1:50052", "prefill target: host:port, a,b list, dns:///name"}},
      {"threads", {"DUET_THREADS", "0", "engine threads (0 = all cores)"}},
      {"precision", {"DUET_PRECISION", "bf16", "bf16 or f32"}},
      {"kv-cache-dtype", {"DUET_KV_CACHE_DTYPE", "f32", "K/V cache element type: f32, f16 (half the memory) or int8 (a quarter)"}},
      {"max-batch", {"DUET_MAX_BATCH", "32", "sequences per decode step"}},
      {"kv-blocks", {"DUET_KV_BLOCKS", "0", "K/V pool blocks (0: from --kv-cache-mb)"}},
      {"kv-cache-mb", {"DUET_KV_CACHE_MB", "1024", "K/V pool size in MiB"}},
      {"block-size", {"DUET_BLOCK_SIZE", "16", "tokens per K/V block"}},
      {"local-prefill-max-tokens", {"DUET_LOCAL_PREFILL_MAX_TOKENS", "32", "continuation deltas up to this many tokens are prefilled on decode"}},
      {"session-ttl-s", {"DUET_SESSION_TTL_S", "600", "idle session lifetime"}},
      {"prefill-timeout-ms", {"DUET_PREFILL_TIMEOUT_MS", "30000", "deadline of a prefill call"}},
      {"kv-dtype", {"DUET_KV_DTYPE", "bf16", "K/V wire dtype: f32, bf16, int8"}},
      {"max-pending", {"DUET_MAX_PENDING", "256", "requests admitted or running before RESOURCE_EXHAUSTED"}},
      {"drain-s", {"DUET_DRAIN_S", "20", "seconds running streams get to finish on SIGTERM"}},
      {"metrics-listen", {"DUET_METRICS_LISTEN", "127.0.0.1:9401", "Prometheus /metrics HTTP address (HOST:PORT, port 0 = free port; off = none)"}},
      {"model-name", {"DUET_MODEL_NAME", "", "model_name label of the metrics (default: the model directory's name)"}},
  };
}

[[noreturn]] void Die(const std::string& msg) {
  std::fprintf(stderr, "duet-decode: %s\n", msg.c_str());
  std::exit(2);
}

long ToInt(const std::map<std::string, Flag>& f, const std::string& name, long lo, long hi) {
  const std::string& v = f.at(name).value;
  char* end = nullptr;
  const long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || n < lo || n > hi) {
    Die("--" + name + " must be an integer in [" + std::to_string(lo) + ", " +
        std::to_string(hi) + "], got \"" + v + "\"");
  }
  return n;
}

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop.store(true); }

}  // namespace

int main(int argc, char** argv) {
  duet::KeepFreedMemory();
  auto flags = DefaultFlags();
  for (auto& [name, f] : flags)
    if (const char* e = std::getenv(f.env.c_str())) f.value = e;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("usage: duet-decode [flags]\n");
      for (const auto& [name, f] : flags)
        std::printf("  --%-26s %s (env %s, default \"%s\")\n", name.c_str(), f.help.c_str(),
                    f.env.c_str(), f.value.c_str());
      return 0;
    }
    if (a.rfind("--", 0) != 0) Die("unexpected argument \"" + a + "\"");
    std::string name = a.substr(2), value;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      Die("--" + name + " needs a value");
    }
    auto it = flags.find(name);
    if (it == flags.end()) Die("unknown flag --" + name);
    it->second.value = value;
  }
  if (flags["model"].value.empty()) Die("--model (or DUET_MODEL) is required");
  duet::kernels::SetNumThreads(static_cast<int>(ToInt(flags, "threads", 0, 1024)));
  const std::string prec = flags["precision"].value;
  if (prec != "bf16" && prec != "f32") Die("--precision must be bf16 or f32, got \"" + prec + "\"");
  duet::decode::DecodeOptions opts;
  opts.prefill_target = flags["prefill"].value;
  if (opts.prefill_target.empty()) Die("--prefill must name at least one prefill server");
  opts.max_batch = static_cast<int32_t>(ToInt(flags, "max-batch", 1, 4096));
  opts.n_threads = static_cast<int32_t>(ToInt(flags, "threads", 0, 1024));
  opts.block_size = static_cast<int32_t>(ToInt(flags, "block-size", 1, 1024));
  opts.local_prefill_max_tokens =
      static_cast<int32_t>(ToInt(flags, "local-prefill-max-tokens", 0, 1 << 20));
  opts.session_ttl = std::chrono::seconds(ToInt(flags, "session-ttl-s", 1, 1L << 30));
  opts.prefill_timeout = std::chrono::milliseconds(ToInt(flags, "prefill-timeout-ms", 1, 1L << 30));
  opts.max_pending = static_cast<int32_t>(ToInt(flags, "max-pending", 1, 1 << 20));
  const std::string kvd = flags["kv-dtype"].value;
  if (kvd == "f32") {
    opts.kv_dtype = duet::v1::KV_DTYPE_F32;
  } else if (kvd == "bf16") {
    opts.kv_dtype = duet::v1::KV_DTYPE_BF16;
  } else if (kvd == "int8") {
    opts.kv_dtype = duet::v1::KV_DTYPE_INT8;
  } else {
    Die("--kv-dtype must be f32, bf16 or int8, got \"" + kvd + "\"");
  }
  const long drain_s = ToInt(flags, "drain-s", 0, 3600);
  auto metrics_listen = duet::metrics::ParseListen(flags["metrics-listen"].value, "--metrics-listen");
  if (!metrics_listen.ok()) Die(std::string(metrics_listen.status().message()));
  std::string model_name = flags["model-name"].value;
  if (model_name.empty()) {
    model_name = std::filesystem::path(flags["model"].value).lexically_normal().filename().string();
    if (model_name.empty())
      model_name = std::filesystem::path(flags["model"].value).lexically_normal().parent_path().filename().string();
  }

  const auto kv_cache_dtype = duet::model::ParseKvCacheDtype(flags["kv-cache-dtype"].value);
  if (!kv_cache_dtype.ok()) Die(std::string(kv_cache_dtype.status().message()));
  auto model = duet::model::Model::Load(
      flags["model"].value,
      {prec == "f32" ? duet::kernels::Precision::kF32 : duet::kernels::Precision::kBF16,
       *kv_cache_dtype});
  if (!model.ok()) Die(std::string(model.status().message()));
  auto tok = duet::tokenizer::Tokenizer::Load(flags["model"].value);
  if (!tok.ok()) Die(std::string(tok.status().message()));
  const auto shape = (*model)->kv_shape(opts.block_size);
  const long blocks_flag = ToInt(flags, "kv-blocks", 0, 1L << 30);
  const long mb = ToInt(flags, "kv-cache-mb", 1, 1L << 22);
  opts.kv_blocks = static_cast<int32_t>(
      blocks_flag > 0 ? blocks_flag
                      : std::max<long>(1, (mb << 20) / shape.bytes_per_block()));

  duet::metrics::Registry registry(model_name, "decode");
  duet::metrics::DecodeMetrics metrics(registry);
  opts.metrics = &metrics;
  duet::decode::DecodeServiceImpl service(model->get(), tok->get(), opts);
  registry.SetRefresh([&service] { service.RefreshMetrics(); });
  std::unique_ptr<duet::metrics::HttpExposer> exposer;
  if (!metrics_listen->empty()) {
    auto e = duet::metrics::HttpExposer::Start(*metrics_listen, registry);
    if (!e.ok()) Die(std::string(e.status().message()));
    exposer = std::move(*e);
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(flags["listen"].value, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  auto server = builder.BuildAndStart();
  if (!server || port == 0) Die("cannot listen on " + flags["listen"].value);
  server->GetHealthCheckService()->SetServingStatus(true);
  const std::string listen = flags["listen"].value;
  std::printf("duet-decode listening on %s:%d\n", listen.substr(0, listen.rfind(':')).c_str(), port);
  if (exposer) std::printf("duet-decode metrics on http://%s/metrics\n", exposer->address().c_str());
  std::fflush(stdout);
  std::fprintf(stderr,
               "duet-decode: model %s (fingerprint %s), %d K/V blocks of %d tokens, prefill %s\n",
               flags["model"].value.c_str(), (*model)->fingerprint().c_str(), opts.kv_blocks,
               opts.block_size, opts.prefill_target.c_str());

  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(50));

  // Drain: NOT_SERVING, refuse new requests, let running streams finish within the grace period.
  server->GetHealthCheckService()->SetServingStatus(false);
  service.StartDraining();
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(drain_s);
  while ((service.in_flight() > 0 || service.open_streams() > 0) &&
         std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  exposer.reset();  // its scrape callback reads the service
  service.Shutdown();
  std::fprintf(stderr, "duet-decode: stopped\n");
  return 0;
}
