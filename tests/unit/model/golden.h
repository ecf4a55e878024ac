// Loads the golden logits that tools/make_fixtures.py (an independent torch implementation)
// wrote next to each test model.
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace duet::testing {

struct Golden {
  std::vector<int32_t> token_ids;
  std::vector<int32_t> greedy;
  std::vector<std::vector<float>> logits;  // [position][vocab]
};

inline std::string ModelDir(const std::string& name) {
  return std::string(DUET_SOURCE_DIR) + "/tests/data/models/" + name;
}

inline Golden LoadGolden(const std::string& name) {
  std::ifstream in(ModelDir(name) + "/golden.json");
  auto j = nlohmann::json::parse(in);
  Golden g;
  g.token_ids = j["token_ids"].get<std::vector<int32_t>>();
  g.greedy = j["greedy"].get<std::vector<int32_t>>();
  g.logits = j["logits"].get<std::vector<std::vector<float>>>();
  return g;
}

inline const std::vector<std::string>& FixtureModels() {
  static const std::vector<std::string> names = {
      "gpt2-tiny",      "gpt2-tiny-f16",   "llama-tiny-gqa",     "llama-tiny-tied-llama3rope",
      "qwen2-tiny",     "llama-tiny-bf16", "llama-tiny-sharded"};
  return names;
}

}  // namespace duet::testing
