#include "duet/metrics/metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <charconv>
#include <exception>
#include <mutex>

#include "absl/strings/str_cat.h"

namespace duet::metrics {

std::vector<double> TtftBuckets() {
  return {0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
          1,     1.5,  2,    3,    5,    7.5,   10,  15,   20,  30,  45,  60};
}
std::vector<double> InterTokenBuckets() {
  return {0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
          0.075, 0.1,   0.15,  0.2,   0.3,    0.5,  0.75,  1,    2,    5};
}
std::vector<double> E2eBuckets() {
  return {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300};
}
std::vector<double> WaitBuckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
          0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30,    60};
}
std::vector<double> PrefillBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60};
}
std::vector<double> BatchBuckets() { return {1, 2, 4, 8, 16, 32, 64, 128}; }

// Runs the refresh callback, then collects the registry: state gauges are exact at scrape time.
class Registry::Collectable : public prometheus::Collectable {
 public:
  explicit Collectable(std::shared_ptr<prometheus::Registry> r) : registry_(std::move(r)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::lock_guard<std::mutex> lock(mu_);
    if (refresh_) refresh_();
    return registry_->Collect();
  }
  void Set(std::function<void()> f) {
    std::lock_guard<std::mutex> lock(mu_);
    refresh_ = std::move(f);
  }

 private:
  mutable std::mutex mu_;
  std::function<void()> refresh_;
  std::shared_ptr<prometheus::Registry> registry_;
};

Registry::Registry(std::string model_name, std::string role)
    : model_name_(std::move(model_name)),
      role_(std::move(role)),
      registry_(std::make_shared<prometheus::Registry>()),
      collectable_(std::make_shared<Collectable>(registry_)) {}

Registry::~Registry() = default;

prometheus::Histogram& Registry::Histogram(const std::string& name, const std::string& help,
                                           std::vector<double> buckets) {
  auto& f = prometheus::BuildHistogram()
                .Name(name)
                .Help(help)
                .Labels({{"model_name", model_name_}, {"role", role_}})
                .Register(*registry_);
  return f.Add({}, prometheus::Histogram::BucketBoundaries(std::move(buckets)));
}

prometheus::Counter& Registry::Counter(const std::string& name, const std::string& help) {
  return CounterFamily(name, help).Add({});
}

prometheus::Gauge& Registry::Gauge(const std::string& name, const std::string& help) {
  return GaugeFamily(name, help).Add({});
}

prometheus::Family<prometheus::Counter>& Registry::CounterFamily(const std::string& name,
                                                                 const std::string& help) {
  return prometheus::BuildCounter()
      .Name(name)
      .Help(help)
      .Labels({{"model_name", model_name_}, {"role", role_}})
      .Register(*registry_);
}

prometheus::Family<prometheus::Gauge>& Registry::GaugeFamily(const std::string& name,
                                                             const std::string& help) {
  return prometheus::BuildGauge()
      .Name(name)
      .Help(help)
      .Labels({{"model_name", model_name_}, {"role", role_}})
      .Register(*registry_);
}

prometheus::Counter& Registry::Child(prometheus::Family<prometheus::Counter>& f,
                                     const std::string& label, const std::string& value) {
  return f.Add({{label, value}});
}

prometheus::Gauge& Registry::Child(prometheus::Family<prometheus::Gauge>& f,
                                   const std::string& label, const std::string& value) {
  return f.Add({{label, value}});
}

void Registry::SetRefresh(std::function<void()> refresh) { collectable_->Set(std::move(refresh)); }

std::string Registry::Text() const {
  return prometheus::TextSerializer().Serialize(collectable_->Collect());
}

std::string CodeName(int code) {
  static constexpr const char* kNames[] = {
      "OK",           "CANCELLED",        "UNKNOWN",           "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND",   "ALREADY_EXISTS",    "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",  "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",        "UNAVAILABLE",       "DATA_LOSS",
      "UNAUTHENTICATED"};
  if (code < 0 || code >= static_cast<int>(std::size(kNames))) return "UNKNOWN";
  return kNames[code];
}

const std::vector<int>& ServedErrorCodes() {
  // CANCELLED, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, RESOURCE_EXHAUSTED,
  // FAILED_PRECONDITION, INTERNAL, UNAVAILABLE, DATA_LOSS.
  static const std::vector<int> kCodes = {1, 3, 4, 5, 8, 9, 13, 14, 15};
  return kCodes;
}

absl::StatusOr<std::unique_ptr<HttpExposer>> HttpExposer::Start(const std::string& address,
                                                                 Registry& registry) {
  std::unique_ptr<HttpExposer> e(new HttpExposer());
  try {
    // One worker thread is plenty for a scrape every few seconds.
    e->exposer_ = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/1);
  } catch (const std::exception& ex) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, ": ", ex.what()));
  }
  e->exposer_->RegisterCollectable(registry.collectable_, "/metrics");
  const std::vector<int> ports = e->exposer_->GetListeningPorts();
  if (ports.empty()) return absl::UnavailableError(absl::StrCat("metrics: no port for ", address));
  e->port_ = ports.front();
  e->address_ = absl::StrCat(address.substr(0, address.rfind(':')), ":", e->port_);
  return e;
}

HttpExposer::~HttpExposer() = default;

absl::StatusOr<std::string> ParseListen(std::string_view value, std::string_view what) {
  if (value.empty() || value == "off") return std::string();
  const size_t colon = value.rfind(':');
  int port = -1;
  if (colon != std::string_view::npos && colon > 0) {
    const char* b = value.data() + colon + 1;
    const char* e = value.data() + value.size();
    auto [p, ec] = std::from_chars(b, e, port);
    if (ec != std::errc() || p != e || b == e) port = -1;
  }
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(what),
                                                   ": expected HOST:PORT or off, got \"",
                                                   std::string(value), "\""));
  }
  return std::string(value);
}

}  // namespace duet::metrics
