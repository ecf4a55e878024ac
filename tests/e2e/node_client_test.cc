// DecodeService from another language with nothing but the proto: tests/node/generate.js (Node.js,
// @grpc/grpc-js + @grpc/proto-loader reading proto/duet/v1/decode.proto) against the real pair,
// compared with the same greedy request made from C++ through the same server.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "duet/v1/decode.grpc.pb.h"
#include "process.h"

extern char** environ;

using duet::testing::ServerProcess;
namespace v1 = duet::v1;

namespace {

const std::string kSource = DUET_SOURCE_DIR;
const std::string kModel = kSource + "/models/duet-tiny";

struct Output {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Runs argv[0] (looked up on PATH) with stdout and stderr captured; fails the test if it can't.
Output Run(const std::vector<std::string>& args) {
  int out[2], err[2];
  REQUIRE(pipe(out) == 0);
  REQUIRE(pipe(err) == 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  for (int fd : {out[0], out[1], err[0], err[1]}) posix_spawn_file_actions_addclose(&fa, fd);
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(out[1]);
  close(err[1]);
  if (rc != 0) {
    close(out[0]);
    close(err[0]);
    FAIL("cannot run " << args[0] << ": " << std::strerror(rc) << " (is Node.js on PATH?)");
  }
  Output r;
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  std::string* bufs[2] = {&r.out, &r.err};
  int open_fds = 2;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (open_fds > 0 && std::chrono::steady_clock::now() < until) {
    if (poll(fds, 2, 100) <= 0) continue;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || (fds[i].revents & (POLLIN | POLLHUP)) == 0) continue;
      char c[4096];
      const ssize_t n = read(fds[i].fd, c, sizeof c);
      if (n > 0) {
        bufs[i]->append(c, static_cast<size_t>(n));
      } else {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (auto& p : fds)
    if (p.fd >= 0) close(p.fd);
  if (open_fds > 0) kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace

TEST_CASE("Generate from Node.js with only the proto equals Generate from C++", "[pair][node]") {
  const std::filesystem::path node_dir = kSource + "/tests/node";
  if (!std::filesystem::exists(node_dir / "node_modules" / "@grpc" / "grpc-js") ||
      !std::filesystem::exists(node_dir / "node_modules" / "@grpc" / "proto-loader")) {
    FAIL("tests/node/node_modules is missing: run scripts/fetch_node_deps");
  }
  ServerProcess prefill(DUET_PREFILL_BIN, {"--model", kModel, "--listen", "127.0.0.1:0",
                                           "--precision", "f32", "--threads", "1"});
  ServerProcess decode(DUET_DECODE_BIN,
                       {"--model", kModel, "--listen", "127.0.0.1:0", "--prefill",
                        prefill.address(), "--precision", "f32", "--threads", "1"});
  const std::string prompt = "the meaning of a word";

  // From C++: what generate.js asks for.
  auto stub = v1::DecodeService::NewStub(
      grpc::CreateChannel(decode.address(), grpc::InsecureChannelCredentials()));
  v1::GenerateRequest req;
  req.set_prompt(prompt);
  req.mutable_sampling()->set_temperature(0.f);
  req.mutable_stopping()->set_max_tokens(16);
  req.mutable_stopping()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub->Generate(&ctx, req);
  std::string cpp_text;
  v1::GenerateResponse m;
  while (reader->Read(&m)) cpp_text += m.text();
  const grpc::Status st = reader->Finish();
  INFO(st.error_message());
  REQUIRE(st.ok());
  REQUIRE_FALSE(cpp_text.empty());

  // From Node.js.
  const Output node = Run({"node", (node_dir / "generate.js").string(), decode.address(), prompt});
  INFO("node stdout: " << node.out);
  INFO("node stderr: " << node.err);
  REQUIRE(node.exit_code == 0);
  CHECK(node.out == cpp_text);

  // The summary, as JSON on stderr (proto field names), read back with protobuf's JSON parser.
  std::string json = node.err;
  while (!json.empty() && (json.back() == '\n' || json.back() == '\r')) json.pop_back();
  json = json.substr(json.rfind('\n') == std::string::npos ? 0 : json.rfind('\n') + 1);
  v1::GenerateSummary summary;
  const auto parsed = google::protobuf::util::JsonStringToMessage(json, &summary);
  INFO("summary JSON: " << json << " (" << parsed.ToString() << ")");
  REQUIRE(parsed.ok());
  CHECK(summary.generated_tokens() == 16);
  CHECK(summary.finish_reason() == v1::FINISH_REASON_LENGTH);
  CHECK(summary.kv_transfer_bytes() > 0);

  // A gRPC error makes it exit non-zero and say so.
  const Output bad = Run({"node", (node_dir / "generate.js").string(), decode.address(), ""});
  INFO("node (empty prompt) stderr: " << bad.err);
  CHECK(bad.exit_code != 0);
  CHECK(bad.err.find("INVALID_ARGUMENT") != std::string::npos);
}
