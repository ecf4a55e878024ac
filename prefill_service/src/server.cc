#include "duet/prefill/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "duet/model/model.h"
#include "duet/prefill/service.h"

namespace duet::prefill {

absl::StatusOr<std::unique_ptr<PrefillServer>> PrefillServer::Start(const ServerOptions& options) {
  std::unique_ptr<PrefillServer> s(new PrefillServer());
  s->model_name_ = options.model_name;
  if (s->model_name_.empty()) {
    // A trailing slash leaves an empty filename; use the directory's own name then.
    const std::filesystem::path dir = options.model_dir.lexically_normal();
    s->model_name_ =
        dir.has_filename() ? dir.filename().string() : dir.parent_path().filename().string();
  }
  s->registry_ = std::make_unique<metrics::Registry>(s->model_name_, "prefill");
  s->metrics_ = std::make_unique<metrics::PrefillMetrics>(*s->registry_);

  auto model = model::Model::Load(options.model_dir, options.model);
  if (!model.ok()) return model.status();
  EngineOptions engine_options = options.engine;
  engine_options.metrics = s->metrics_.get();
  auto engine = PrefillEngine::Create(std::move(*model), engine_options);
  if (!engine.ok()) return engine.status();
  s->engine_ = std::move(*engine);
  s->service_ =
      std::make_unique<PrefillServiceImpl>(s->engine_.get(), s->model_name_, s->metrics_.get());
  s->registry_->SetRefresh([m = s->metrics_.get(), e = s->engine_.get()] {
    const EngineStats st = e->stats();
    m->running.Set(st.running_jobs);
    m->waiting.Set(st.queued);
  });

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &s->port_);
  // Clients re-resolve names (dns:/// of a headless Service) when a connection ends: closing
  // connections after a few minutes lets decode pick up prefill pods added by a scale-up. Calls in
  // flight get a minute to finish first.
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, 5 * 60 * 1000);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, 60 * 1000);
  builder.RegisterService(s->service_.get());
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    s->server_.reset();
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  if (!options.metrics_listen.empty()) {
    auto e = metrics::HttpExposer::Start(options.metrics_listen, *s->registry_);
    if (!e.ok()) return e.status();
    s->exposer_ = std::move(*e);
  }
  s->server_->GetHealthCheckService()->SetServingStatus(true);
  const size_t colon = options.listen.rfind(':');
  s->address_ = absl::StrCat(options.listen.substr(0, colon), ":", s->port_);
  return s;
}

std::string PrefillServer::metrics_address() const {
  return exposer_ ? exposer_->address() : std::string();
}

std::string PrefillServer::metrics_text() const { return registry_->Text(); }

PrefillServer::~PrefillServer() { Shutdown(std::chrono::milliseconds(0)); }

void PrefillServer::Shutdown(std::chrono::milliseconds grace) {
  if (shut_down_) return;
  shut_down_ = true;
  if (server_ != nullptr) {
    // Drain: NOT_SERVING and new calls refused with UNAVAILABLE while the server still answers
    // (so health checks and load balancers see it), calls in flight get `grace` to finish.
    server_->GetHealthCheckService()->SetServingStatus(false);
    service_->StartDraining();
    const auto until = std::chrono::steady_clock::now() + grace;
    while (service_->in_flight() > 0 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    // Whatever is still running is cancelled (its job stops at the next layer).
    server_->Shutdown(std::chrono::system_clock::now());
  }
  if (engine_ != nullptr) engine_->Stop();
  if (server_ != nullptr) server_->Wait();
}

}  // namespace duet::prefill
