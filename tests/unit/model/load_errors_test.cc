// A bad model directory gets one clear error naming the problem, and no crash.
#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "duet/model/model.h"
#include "duet/model/safetensors.h"
#include "golden.h"

namespace fs = std::filesystem;
using duet::model::Model;
using duet::model::WeightFiles;

namespace {

struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// Reads a fixture's tensors so a test can write a modified checkpoint.
std::map<std::string, RawTensor> ReadTensors(const std::string& model) {
  auto files = WeightFiles::Open(duet::testing::ModelDir(model));
  REQUIRE(files.ok());
  std::map<std::string, RawTensor> out;
  for (const auto& [name, t] : (*files)->tensors()) {
    RawTensor r;
    r.dtype = t.dtype == duet::DType::kF32 ? "F32" : t.dtype == duet::DType::kF16 ? "F16" : "BF16";
    r.shape = t.shape;
    r.bytes.assign(static_cast<const char*>(t.data), t.bytes);
    out[name] = r;
  }
  return out;
}

void WriteSafetensors(const fs::path& file, const std::map<std::string, RawTensor>& tensors) {
  nlohmann::json header;
  std::string data;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", t.dtype},
                    {"shape", t.shape},
                    {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  std::string h = header.dump();
  while (h.size() % 8) h += ' ';
  std::ofstream out(file, std::ios::binary);
  const uint64_t n = h.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << h << data;
}

// A scratch copy of a fixture model, removed at the end of the test.
struct TempModel {
  fs::path dir;
  explicit TempModel(const std::string& model) {
    dir = fs::temp_directory_path() / ("duet_model_" + std::to_string(::getpid()) + "_" +
                                       std::to_string(counter++));
    fs::remove_all(dir);
    fs::create_directories(dir);
    fs::copy(duet::testing::ModelDir(model), dir, fs::copy_options::recursive);
  }
  ~TempModel() { fs::remove_all(dir); }
  static inline int counter = 0;
};

absl::Status LoadStatus(const fs::path& dir) { return Model::Load(dir).status(); }

}  // namespace

TEST_CASE("model load errors name the problem", "[model][errors]") {
  const std::string base = "llama-tiny-gqa";

  SECTION("missing directory") {
    auto st = LoadStatus("/nonexistent/duet-model");
    REQUIRE(st.code() == absl::StatusCode::kNotFound);
  }
  SECTION("missing config.json") {
    TempModel t(base);
    fs::remove(t.dir / "config.json");
    auto st = LoadStatus(t.dir);
    REQUIRE(st.code() == absl::StatusCode::kNotFound);
    REQUIRE(st.message().find("config.json") != std::string::npos);
  }
  SECTION("missing weights") {
    TempModel t(base);
    fs::remove(t.dir / "model.safetensors");
    auto st = LoadStatus(t.dir);
    REQUIRE(st.code() == absl::StatusCode::kNotFound);
    REQUIRE(st.message().find("model.safetensors") != std::string::npos);
  }
  SECTION("unknown architecture") {
    TempModel t(base);
    std::ifstream in(t.dir / "config.json");
    auto j = nlohmann::json::parse(in);
    j["architectures"] = {"MambaForCausalLM"};
    std::ofstream(t.dir / "config.json") << j.dump();
    auto st = LoadStatus(t.dir);
    REQUIRE(st.code() == absl::StatusCode::kUnimplemented);
    REQUIRE(st.message().find("MambaForCausalLM") != std::string::npos);
  }
  SECTION("missing tensor") {
    TempModel t(base);
    auto tensors = ReadTensors(base);
    tensors.erase("model.layers.1.mlp.up_proj.weight");
    WriteSafetensors(t.dir / "model.safetensors", tensors);
    auto st = LoadStatus(t.dir);
    REQUIRE(st.code() == absl::StatusCode::kInvalidArgument);
    REQUIRE(st.message().find("missing tensor \"model.layers.1.mlp.up_proj.weight\"") !=
            std::string::npos);
  }
  SECTION("extra tensor") {
    TempModel t(base);
    auto tensors = ReadTensors(base);
    tensors["model.layers.7.surprise.weight"] = {"F32", {2}, std::string(8, '\0')};
    WriteSafetensors(t.dir / "model.safetensors", tensors);
    auto st = LoadStatus(t.dir);
    REQUIRE(st.code() == absl::StatusCode::kInvalidArgument);
    REQUIRE(st.message().find("unexpected tensor \"model.layers.7.surprise.weight\"") !=
            std::string::npos);
  }
  SECTION("wrong shape") {
    TempModel t(base);
    auto tensors = ReadTensors(base);
    auto& n = tensors["model.norm.weight"];
    n.shape = {16};
    n.bytes.resize(16 * 4);
    WriteSafetensors(t.dir / "model.safetensors", tensors);
    auto st = LoadStatus(t.dir);
    REQUIRE(st.code() == absl::StatusCode::kInvalidArgument);
    REQUIRE(st.message().find("\"model.norm.weight\" has shape [16], expected [32]") !=
            std::string::npos);
  }
  SECTION("truncated file") {
    TempModel t(base);
    const auto file = t.dir / "model.safetensors";
    fs::resize_file(file, fs::file_size(file) - 100);
    auto st = LoadStatus(t.dir);
    REQUIRE(st.code() == absl::StatusCode::kInvalidArgument);
    REQUIRE(st.message().find("truncated") != std::string::npos);
  }
  SECTION("truncated header") {
    TempModel t(base);
    fs::resize_file(t.dir / "model.safetensors", 20);
    auto st = LoadStatus(t.dir);
    REQUIRE(st.code() == absl::StatusCode::kInvalidArgument);
    REQUIRE(st.message().find("truncated") != std::string::npos);
  }
  SECTION("unsupported dtype") {
    TempModel t(base);
    auto tensors = ReadTensors(base);
    auto& n = tensors["model.norm.weight"];
    n.dtype = "I64";
    n.shape = {32};
    n.bytes.resize(32 * 8);
    WriteSafetensors(t.dir / "model.safetensors", tensors);
    auto st = LoadStatus(t.dir);
    REQUIRE(st.code() == absl::StatusCode::kInvalidArgument);
    REQUIRE(st.message().find("unsupported dtype I64") != std::string::npos);
  }
  SECTION("shard listed in the index but missing") {
    TempModel t("llama-tiny-sharded");
    fs::remove(t.dir / "model-00002-of-00002.safetensors");
    auto st = LoadStatus(t.dir);
    REQUIRE(st.code() == absl::StatusCode::kNotFound);
    REQUIRE(st.message().find("model-00002-of-00002.safetensors") != std::string::npos);
  }
}
