#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <string>

#include "duet/metrics/metrics.h"
#include "duet/metrics/server_metrics.h"

namespace duet::metrics {
namespace {

// A plain HTTP/1.0 GET on 127.0.0.1:port; returns the whole response (headers and body).
std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  REQUIRE(write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size()));
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

bool Has(const std::string& text, const std::string& needle) {
  return text.find(needle) != std::string::npos;
}

TEST_CASE("decode metrics carry model_name and role and the DESIGN names", "[metrics]") {
  Registry r("tiny", "decode");
  DecodeMetrics m(r);
  m.ttft.Observe(0.012);
  m.generation_tokens.Increment(5);
  m.sessions_idle.Set(3);
  m.Finished(0, kReasonLength);
  m.Finished(3, kReasonStop);  // INVALID_ARGUMENT: an error, not a stop
  m.Finished(1, kReasonStop);  // CANCELLED
  const std::string t = r.Text();
  INFO(t);
  CHECK(Has(t, "# TYPE duet_time_to_first_token_seconds histogram"));
  CHECK(Has(t, "duet_time_to_first_token_seconds_count{model_name=\"tiny\",role=\"decode\"} 1"));
  // 0.012 s falls in the (0.01, 0.02] bucket: cumulative counts 0 at le=0.01, 1 at le=0.02.
  CHECK(Has(t, "duet_time_to_first_token_seconds_bucket{model_name=\"tiny\",role=\"decode\",le=\"0.01\"} 0"));
  CHECK(Has(t, "duet_time_to_first_token_seconds_bucket{model_name=\"tiny\",role=\"decode\",le=\"0.02\"} 1"));
  CHECK(Has(t, "duet_generation_tokens_total{model_name=\"tiny\",role=\"decode\"} 5"));
  CHECK(Has(t, "duet_sessions{model_name=\"tiny\",role=\"decode\",state=\"idle\"} 3"));
  CHECK(Has(t, "duet_sessions{model_name=\"tiny\",role=\"decode\",state=\"prefilling\"} 0"));
  CHECK(Has(t, "duet_requests_finished_total{model_name=\"tiny\",role=\"decode\",finished_reason=\"length\"} 1"));
  CHECK(Has(t, "duet_requests_finished_total{model_name=\"tiny\",role=\"decode\",finished_reason=\"error\"} 1"));
  CHECK(Has(t, "duet_requests_finished_total{model_name=\"tiny\",role=\"decode\",finished_reason=\"cancelled\"} 1"));
  CHECK(Has(t, "duet_requests_finished_total{model_name=\"tiny\",role=\"decode\",finished_reason=\"stop\"} 0"));
  CHECK(Has(t, "duet_request_errors_total{model_name=\"tiny\",role=\"decode\",code=\"INVALID_ARGUMENT\"} 1"));
  CHECK(Has(t, "duet_request_errors_total{model_name=\"tiny\",role=\"decode\",code=\"CANCELLED\"} 1"));
  // One family per name, even though the sessions gauges were made one by one.
  size_t n = 0;
  for (size_t p = 0; (p = t.find("# TYPE duet_sessions gauge", p)) != std::string::npos; ++p) ++n;
  CHECK(n == 1);
}

TEST_CASE("prefill metrics", "[metrics]") {
  Registry r("tiny", "prefill");
  PrefillMetrics m(r);
  m.compute.Observe(0.2);
  m.tokens.Increment(128);
  m.Error(8);
  const std::string t = r.Text();
  INFO(t);
  CHECK(Has(t, "duet_prefill_time_seconds_sum{model_name=\"tiny\",role=\"prefill\"} 0.2"));
  CHECK(Has(t, "duet_prefill_tokens_total{model_name=\"tiny\",role=\"prefill\"} 128"));
  CHECK(Has(t, "duet_request_errors_total{model_name=\"tiny\",role=\"prefill\",code=\"RESOURCE_EXHAUSTED\"} 1"));
  CHECK(Has(t, "# TYPE duet_prefill_queue_time_seconds histogram"));
}

TEST_CASE("the exposer serves /metrics over HTTP and refreshes gauges at scrape time", "[metrics]") {
  Registry r("tiny", "decode");
  DecodeMetrics m(r);
  int scrapes = 0;
  r.SetRefresh([&] { m.kv_cache_usage.Set(0.25 * ++scrapes); });
  auto e = HttpExposer::Start("127.0.0.1:0", r);
  REQUIRE(e.ok());
  REQUIRE((*e)->port() > 0);
  CHECK((*e)->address() == "127.0.0.1:" + std::to_string((*e)->port()));
  const std::string first = HttpGet((*e)->port(), "/metrics");
  CHECK(Has(first, "200 OK"));
  CHECK(Has(first, "duet_kv_cache_usage_ratio{model_name=\"tiny\",role=\"decode\"} 0.25"));
  const std::string second = HttpGet((*e)->port(), "/metrics");
  CHECK(Has(second, "duet_kv_cache_usage_ratio{model_name=\"tiny\",role=\"decode\"} 0.5"));
  CHECK(Has(HttpGet((*e)->port(), "/nothing"), "404"));

  // The same port again cannot be bound: a clear UNAVAILABLE naming the address.
  const std::string taken = "127.0.0.1:" + std::to_string((*e)->port());
  auto again = HttpExposer::Start(taken, r);
  REQUIRE_FALSE(again.ok());
  CHECK(again.status().code() == absl::StatusCode::kUnavailable);
  CHECK(Has(std::string(again.status().message()), taken));
}

TEST_CASE("metrics-listen address values", "[metrics]") {
  CHECK(*ParseListen("off", "--metrics-listen") == "");
  CHECK(*ParseListen("", "--metrics-listen") == "");
  CHECK(*ParseListen("0.0.0.0:9401", "--metrics-listen") == "0.0.0.0:9401");
  for (const char* bad : {"9401", "host:", "host:x", "host:70000", ":9401"}) {
    auto s = ParseListen(bad, "DUET_METRICS_LISTEN");
    REQUIRE_FALSE(s.ok());
    CHECK(Has(std::string(s.status().message()), std::string("\"") + bad + "\""));
    CHECK(Has(std::string(s.status().message()), "DUET_METRICS_LISTEN"));
  }
  CHECK(CodeName(14) == "UNAVAILABLE");
  CHECK(CodeName(15) == "DATA_LOSS");
  CHECK(CodeName(99) == "UNKNOWN");
}

}  // namespace
}  // namespace duet::metrics
