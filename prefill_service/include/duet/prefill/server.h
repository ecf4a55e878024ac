// A running prefill server: the model, the engine, the gRPC service with health checking and
// reflection, bound to one address. Used by main.cc and by the in-process service tests.
#pragma once

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "duet/kernels/linear.h"
#include "duet/metrics/metrics.h"
#include "duet/metrics/server_metrics.h"
#include "duet/model/model.h"
#include "duet/prefill/engine.h"

namespace grpc {
class Server;
}  // namespace grpc

namespace duet::prefill {

class PrefillServiceImpl;

struct ServerOptions {
  std::filesystem::path model_dir;
  std::string model_name;                  // empty: model_dir's last component
  std::string listen = "127.0.0.1:50052";  // host:port; port 0 picks a free one
  // Prometheus /metrics over HTTP: host:port (port 0 picks a free one); empty: no exposer (the
  // metrics are still kept, see metrics_text()).
  std::string metrics_listen;
  model::ModelOptions model;  // precision and the engine's K/V cache element type
  EngineOptions engine;
};

class PrefillServer {
 public:
  // Loads the model, starts the engine and serves `listen` (health status SERVING). Errors: the
  // model's load error, INVALID_ARGUMENT for a bad engine option, UNAVAILABLE when the address
  // cannot be bound.
  static absl::StatusOr<std::unique_ptr<PrefillServer>> Start(const ServerOptions& options);
  // Shutdown(0).
  ~PrefillServer();

  // The bound port, and host:port with it (the host as given in `listen`).
  int port() const { return port_; }
  const std::string& address() const { return address_; }
  const std::string& model_name() const { return model_name_; }
  PrefillEngine& engine() { return *engine_; }
  // host:port of the metrics exposer with its bound port; empty when there is none.
  std::string metrics_address() const;
  // The exposition text /metrics serves.
  std::string metrics_text() const;

  // Health NOT_SERVING, no new calls; calls in flight may finish for `grace`, then are cancelled;
  // then the engine stops. Idempotent; any thread but a gRPC callback.
  void Shutdown(std::chrono::milliseconds grace);

 private:
  PrefillServer() = default;

  std::unique_ptr<metrics::Registry> registry_;
  std::unique_ptr<metrics::PrefillMetrics> metrics_;
  std::string model_name_;
  std::string address_;
  int port_ = 0;
  bool shut_down_ = false;
  std::unique_ptr<PrefillEngine> engine_;
  std::unique_ptr<PrefillServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<metrics::HttpExposer> exposer_;  // first to go: its callback reads the engine
};

}  // namespace duet::prefill
