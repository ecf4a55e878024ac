// What operators and Prometheus see of a server: grpc.health.v1 Check over a generic stub (no
// health proto needed), and GET /metrics over plain HTTP/1.0 with one value read from the text.
#pragma once

#include <arpa/inet.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <future>
#include <optional>
#include <sstream>
#include <string>

namespace duet::testing {

// grpc.health.v1.HealthCheckResponse.ServingStatus, or -1 with the call's error code in *code.
inline int HealthStatus(const std::string& address, grpc::StatusCode* code = nullptr) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Slice empty("");  // HealthCheckRequest{service: ""} serializes to no bytes
  grpc::ByteBuffer request(&empty, 1), response;
  std::promise<grpc::Status> done;
  generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request,
                    &response, [&done](grpc::Status s) { done.set_value(std::move(s)); });
  const grpc::Status st = done.get_future().get();
  if (code != nullptr) *code = st.error_code();
  if (!st.ok()) return -1;
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return -1;
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // Field 1 (varint): "\x08" then the status; an empty message means UNKNOWN (0).
  if (bytes.size() == 2 && bytes[0] == '\x08') return bytes[1];
  return bytes.empty() ? 0 : -1;
}
inline constexpr int kServing = 1;
inline constexpr int kNotServing = 2;

// The body of GET http://host:port/path ("" if the connection fails).
inline std::string HttpGet(const std::string& host_port, const std::string& path) {
  const std::string host = host_port.substr(0, host_port.rfind(':'));
  const int port = std::atoi(host_port.substr(host_port.rfind(':') + 1).c_str());
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, host.c_str(), &a.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return "";
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: " + host + "\r\n\r\n";
  if (write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return "";
  }
  std::string out;
  char buf[8192];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  const auto body = out.find("\r\n\r\n");
  return body == std::string::npos ? out : out.substr(body + 4);
}

// The value of the sample whose name-and-labels part is exactly `series` (as the exposition
// writes it, e.g. `duet_generation_tokens_total{model_name="m",role="decode"}`).
inline std::optional<double> MetricValue(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(series + " ", 0) == 0) return std::strtod(line.c_str() + series.size() + 1, nullptr);
  }
  return std::nullopt;
}

}  // namespace duet::testing
