// duet's Prometheus metrics: every metric name, unit, label and bucket layout in one place, the
// per-server registry (const labels model_name and role), and the HTTP exposer that serves it on
// its own port at /metrics (text format 0.0.4).
//
// Metric objects are created once at start; recording is lock-free (prometheus-cpp atomics), so the
// hot paths (engine thread, gRPC callbacks) only do an Observe/Increment. Gauges that describe state
// (sessions by state, K/V usage, queue depths) are refreshed from a callback at scrape time, so they
// are exact when read and cost nothing between scrapes.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace prometheus {
class Registry;
class Counter;
class Gauge;
class Histogram;
class Exposer;
template <typename T>
class Family;
}  // namespace prometheus

namespace duet::metrics {

// Names (Prometheus conventions: base units, _total for counters, _seconds/_bytes suffixes).
inline constexpr char kTimeToFirstToken[] = "duet_time_to_first_token_seconds";
inline constexpr char kInterTokenLatency[] = "duet_inter_token_latency_seconds";
inline constexpr char kE2eRequestLatency[] = "duet_e2e_request_latency_seconds";
inline constexpr char kRequestQueueTime[] = "duet_request_queue_time_seconds";
inline constexpr char kKvTransferTime[] = "duet_kv_transfer_seconds";
inline constexpr char kKvTransferBytes[] = "duet_kv_transfer_bytes_total";  // counter
inline constexpr char kPromptTokens[] = "duet_prompt_tokens_total";          // counter
inline constexpr char kGenerationTokens[] = "duet_generation_tokens_total";  // counter
inline constexpr char kRequestsFinished[] = "duet_requests_finished_total";  // counter{finished_reason}
inline constexpr char kRequestErrors[] = "duet_request_errors_total";        // counter{code}
inline constexpr char kSessionEvictions[] = "duet_session_evictions_total";  // counter
inline constexpr char kSessions[] = "duet_sessions";                   // gauge{state}
inline constexpr char kRequestsRunning[] = "duet_requests_running";
inline constexpr char kRequestsWaiting[] = "duet_requests_waiting";
inline constexpr char kKvCacheUsage[] = "duet_kv_cache_usage_ratio";
inline constexpr char kBatchSize[] = "duet_batch_size";  // histogram
inline constexpr char kPrefillTime[] = "duet_prefill_time_seconds";
inline constexpr char kPrefillQueueTime[] = "duet_prefill_queue_time_seconds";
inline constexpr char kPrefillTokens[] = "duet_prefill_tokens_total";  // counter
inline constexpr char kPrefillRequestsRunning[] = "duet_prefill_requests_running";
inline constexpr char kPrefillRequestsWaiting[] = "duet_prefill_requests_waiting";

// Bucket layouts, chosen for CPU serving.
// TTFT: a few ms (a short prompt on a tiny model) to a minute (a long prompt on a 1B model).
std::vector<double> TtftBuckets();
// Inter-token latency: 0.5 ms (tiny models) to 5 s.
std::vector<double> InterTokenBuckets();
// End-to-end request latency: 10 ms to 5 min.
std::vector<double> E2eBuckets();
// Queue and transfer times: 100 µs to a minute.
std::vector<double> WaitBuckets();
// Prefill compute time: 1 ms to a minute.
std::vector<double> PrefillBuckets();
// Sequences per decode step: powers of two to 128.
std::vector<double> BatchBuckets();

// Finished-request reasons (the finished_reason label).
inline constexpr char kReasonStop[] = "stop";        // eos or a stop string
inline constexpr char kReasonLength[] = "length";    // max_tokens
inline constexpr char kReasonCancelled[] = "cancelled";  // client cancel or deadline
inline constexpr char kReasonError[] = "error";      // any other non-OK end

// The registry of one server: every series carries model_name and role.
class Registry {
 public:
  Registry(std::string model_name, std::string role);
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  prometheus::Histogram& Histogram(const std::string& name, const std::string& help,
                                   std::vector<double> buckets);
  prometheus::Counter& Counter(const std::string& name, const std::string& help);
  prometheus::Gauge& Gauge(const std::string& name, const std::string& help);
  // A family with one extra label; call Child to get (or create) one series of it.
  prometheus::Family<prometheus::Counter>& CounterFamily(const std::string& name,
                                                         const std::string& help);
  prometheus::Family<prometheus::Gauge>& GaugeFamily(const std::string& name,
                                                     const std::string& help);
  static prometheus::Counter& Child(prometheus::Family<prometheus::Counter>& f,
                                    const std::string& label, const std::string& value);
  static prometheus::Gauge& Child(prometheus::Family<prometheus::Gauge>& f,
                                  const std::string& label, const std::string& value);

  // Called before every scrape (from the exposer's thread): refresh state gauges here.
  void SetRefresh(std::function<void()> refresh);

  // The exposition text (what /metrics serves); for tests and tools.
  std::string Text() const;

  const std::string& model_name() const { return model_name_; }
  const std::string& role() const { return role_; }

 private:
  friend class HttpExposer;
  class Collectable;
  std::string model_name_;
  std::string role_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<Collectable> collectable_;
};

// The status-code name used in the code label: "INVALID_ARGUMENT", "UNAVAILABLE", ...
std::string CodeName(int grpc_or_absl_code);
// The codes a duet server can end a call with: their error series exist (at 0) from the start,
// so rate() and alerts see the first error of each code.
const std::vector<int>& ServedErrorCodes();

// Serves a registry at http://ADDRESS/metrics on its own threads.
class HttpExposer {
 public:
  // address: "host:port"; port 0 picks a free one. UNAVAILABLE (naming the address) when it
  // cannot be bound. The registry must outlive the exposer.
  static absl::StatusOr<std::unique_ptr<HttpExposer>> Start(const std::string& address,
                                                            Registry& registry);
  ~HttpExposer();
  int port() const { return port_; }
  // host:port with the bound port.
  const std::string& address() const { return address_; }

 private:
  HttpExposer() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
  std::string address_;
};

// Parses and checks a --metrics-listen value: "HOST:PORT" or "off". Empty address means off.
absl::StatusOr<std::string> ParseListen(std::string_view value, std::string_view what);

}  // namespace duet::metrics
