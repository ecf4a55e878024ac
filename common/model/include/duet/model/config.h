// Model hyper-parameters, read from a Hugging Face config.json.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace duet::model {

enum class Arch : uint8_t { kGpt2, kLlama, kQwen2 };

struct RopeScaling {
  enum class Type : uint8_t { kNone, kLlama3, kLinear } type = Type::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  Arch arch = Arch::kLlama;
  std::string architecture;  // as written in config.json, e.g. "LlamaForCausalLM"
  int32_t n_layers = 0;
  int32_t n_embd = 0;      // hidden size
  int32_t n_heads = 0;     // query heads
  int32_t n_kv_heads = 0;  // key/value heads (== n_heads without GQA)
  int32_t head_dim = 0;
  int32_t n_ff = 0;        // MLP inner size
  int32_t n_vocab = 0;
  int32_t n_ctx = 0;       // maximum positions
  float norm_eps = 1e-5f;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_embeddings = false;
  bool qkv_bias = false;
  int32_t bos_token_id = -1;              // -1: none
  std::vector<int32_t> eos_token_ids;     // may be empty

  int32_t qkv_dim() const { return (n_heads + 2 * n_kv_heads) * head_dim; }
};

// Parses config.json text. INVALID_ARGUMENT naming the field for a missing or bad value;
// UNIMPLEMENTED naming the architecture for an unknown one.
absl::StatusOr<ModelConfig> ParseConfig(std::string_view json_text);

std::string_view ArchName(Arch arch);

}  // namespace duet::model
