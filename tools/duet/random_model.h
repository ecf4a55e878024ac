// Random-weight checkpoints of real model shapes (GPT-2-124M, TinyLlama-1.1B) for the
// benchmarks: the speed of a forward pass does not depend on the weights' values.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/status/status.h"

namespace duet::cli {

struct ModelShape {
  std::string name;       // "gpt2-124m" or "tinyllama-1.1b"
  nlohmann::json config;  // its config.json
};

// "gpt2-124m"; any other name gives "tinyllama-1.1b".
ModelShape ShapeByName(const std::string& name);

// Writes a random-weight bf16 checkpoint (config.json + model.safetensors; normal-ish weights
// with std 0.02, norm weights 1) into `dir` unless it already holds one of the same config.
// No tokenizer is written.
absl::Status WriteRandomModel(const ModelShape& shape, const std::filesystem::path& dir);

}  // namespace duet::cli
