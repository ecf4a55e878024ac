// The `duet` command line, run as a process.
#include <sys/wait.h>

#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Result {
  int code;
  std::string out;  // stdout
  std::string err;  // stderr
};

Result RunCli(const std::string& args) {
  const std::string err_file = std::string("/tmp/duet_cli_err_") + std::to_string(::getpid());
  const std::string cmd = std::string(DUET_CLI) + " " + args + " 2>" + err_file;
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  Result r;
  std::array<char, 4096> buf;
  for (size_t n; (n = fread(buf.data(), 1, buf.size(), p)) > 0;) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  r.err.assign(std::istreambuf_iterator<char>(in), {});
  std::remove(err_file.c_str());
  return r;
}

const std::string kRoot = DUET_SOURCE_DIR;

std::string Join(const std::vector<int>& ids) {
  std::ostringstream out;
  for (size_t i = 0; i < ids.size(); ++i) out << (i ? "," : "") << ids[i];
  return out.str();
}

}  // namespace

TEST_CASE("duet logits prints every position's logits, matching the torch reference",
          "[cli]") {
  std::ifstream g(kRoot + "/tests/data/models/qwen2-tiny/golden.json");
  const auto golden = nlohmann::json::parse(g);
  std::vector<int> id_list;
  for (int i = 0; i < 6; ++i) id_list.push_back(golden["token_ids"][i].get<int>());
  const std::string ids = Join(id_list);
  auto r = RunCli("logits --model " + kRoot + "/tests/data/models/qwen2-tiny --token-ids " + ids);
  INFO(r.err);
  REQUIRE(r.code == 0);
  const auto j = nlohmann::json::parse(r.out);
  REQUIRE(j["logits"].size() == 6);
  for (int p = 0; p < 6; ++p)
    for (size_t v = 0; v < j["logits"][p].size(); ++v)
      REQUIRE(std::fabs(j["logits"][p][v].get<double>() - golden["logits"][p][v].get<double>()) <
              1e-3);
}

TEST_CASE("duet tokenize and detokenize round-trip through JSON", "[cli]") {
  auto t = RunCli("tokenize --model " + kRoot + "/models/duet-tiny --text 'a small grey bird'");
  INFO(t.err);
  REQUIRE(t.code == 0);
  const auto ids = nlohmann::json::parse(t.out)["ids"];
  REQUIRE(ids.size() >= 2);
  const std::string list = Join(ids.get<std::vector<int>>());
  auto d = RunCli("detokenize --model " + kRoot + "/models/duet-tiny --ids " + list);
  REQUIRE(d.code == 0);
  REQUIRE(nlohmann::json::parse(d.out)["text"] == "a small grey bird");
}

TEST_CASE("duet run streams text and prints its timings", "[cli]") {
  auto r = RunCli("run --model " + kRoot +
                  "/models/duet-tiny --prompt 'the color of' --max-tokens 20 --seed 3");
  INFO(r.err);
  REQUIRE(r.code == 0);
  REQUIRE(r.out.size() > 5);
  REQUIRE(r.err.find("prompt tokens:") != std::string::npos);
  REQUIRE(r.err.find("TTFT:") != std::string::npos);
  REQUIRE(r.err.find("tokens/s") != std::string::npos);
}

TEST_CASE("duet errors exit non-zero with one line naming the problem", "[cli]") {
  const std::string m = " --model " + kRoot + "/tests/data/models/llama-tiny-gqa";
  struct Case {
    std::string args, needle;
  };
  const Case cases[] = {
      {"logits --model /no/such/dir --token-ids 1", "/no/such/dir"},
      {"logits" + m + " --token-ids 1,x", "\"x\""},
      {"logits" + m + " --token-ids 1,999", "999"},
      {"logits" + m, "--token-ids"},
      {"run" + m + " --prompt hi --temperature -2", "-2"},
      {"run --model " + kRoot + "/models/duet-tiny --prompt hi --top-p 1.5", "1.5"},
      {"run --model " + kRoot + "/models/duet-tiny --prompt hi --max-tokens 0", "0"},
      {"run --model " + kRoot + "/models/duet-tiny --prompt hi --bogus 1", "--bogus"},
      {"frobnicate", "frobnicate"},
  };
  for (const auto& c : cases) {
    auto r = RunCli(c.args);
    INFO(c.args << " -> " << r.err);
    CHECK(r.code != 0);
    CHECK(r.err.find(c.needle) != std::string::npos);
    CHECK(r.err.rfind("duet", 0) == 0);
  }
}
