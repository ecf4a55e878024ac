#include "random_model.h"

#include <cstdint>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "duet/tensor/dtype.h"

namespace duet::cli {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Tensor names and shapes of a shape's checkpoint.
std::vector<std::pair<std::string, std::vector<int64_t>>> TensorList(const json& c) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> t;
  if (c["model_type"] == "gpt2") {
    const int64_t E = c["n_embd"], V = c["vocab_size"], P = c["n_positions"];
    t.push_back({"wte.weight", {V, E}});
    t.push_back({"wpe.weight", {P, E}});
    for (int l = 0; l < c["n_layer"].get<int>(); ++l) {
      const std::string b = absl::StrCat("h.", l, ".");
      t.push_back({b + "ln_1.weight", {E}});
      t.push_back({b + "ln_1.bias", {E}});
      t.push_back({b + "attn.c_attn.weight", {E, 3 * E}});
      t.push_back({b + "attn.c_attn.bias", {3 * E}});
      t.push_back({b + "attn.c_proj.weight", {E, E}});
      t.push_back({b + "attn.c_proj.bias", {E}});
      t.push_back({b + "ln_2.weight", {E}});
      t.push_back({b + "ln_2.bias", {E}});
      t.push_back({b + "mlp.c_fc.weight", {E, 4 * E}});
      t.push_back({b + "mlp.c_fc.bias", {4 * E}});
      t.push_back({b + "mlp.c_proj.weight", {4 * E, E}});
      t.push_back({b + "mlp.c_proj.bias", {E}});
    }
    t.push_back({"ln_f.weight", {E}});
    t.push_back({"ln_f.bias", {E}});
  } else {
    const int64_t E = c["hidden_size"], V = c["vocab_size"], F = c["intermediate_size"];
    const int64_t H = c["num_attention_heads"], KV = c["num_key_value_heads"], D = E / H;
    t.push_back({"model.embed_tokens.weight", {V, E}});
    for (int l = 0; l < c["num_hidden_layers"].get<int>(); ++l) {
      const std::string b = absl::StrCat("model.layers.", l, ".");
      t.push_back({b + "input_layernorm.weight", {E}});
      t.push_back({b + "self_attn.q_proj.weight", {H * D, E}});
      t.push_back({b + "self_attn.k_proj.weight", {KV * D, E}});
      t.push_back({b + "self_attn.v_proj.weight", {KV * D, E}});
      t.push_back({b + "self_attn.o_proj.weight", {E, H * D}});
      t.push_back({b + "post_attention_layernorm.weight", {E}});
      t.push_back({b + "mlp.gate_proj.weight", {F, E}});
      t.push_back({b + "mlp.up_proj.weight", {F, E}});
      t.push_back({b + "mlp.down_proj.weight", {E, F}});
    }
    t.push_back({"model.norm.weight", {E}});
    t.push_back({"lm_head.weight", {V, E}});
  }
  return t;
}

}  // namespace

ModelShape ShapeByName(const std::string& name) {
  if (name == "gpt2-124m") {
    return {name, json{{"architectures", {"GPT2LMHeadModel"}}, {"model_type", "gpt2"},
                       {"n_layer", 12}, {"n_embd", 768}, {"n_head", 12}, {"n_positions", 1024},
                       {"vocab_size", 50257}, {"layer_norm_epsilon", 1e-5},
                       {"activation_function", "gelu_new"}, {"eos_token_id", 50256}}};
  }
  return {"tinyllama-1.1b",
          json{{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"},
               {"num_hidden_layers", 22}, {"hidden_size", 2048}, {"num_attention_heads", 32},
               {"num_key_value_heads", 4}, {"intermediate_size", 5632}, {"vocab_size", 32000},
               {"max_position_embeddings", 2048}, {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0},
               {"tie_word_embeddings", false}, {"hidden_act", "silu"}, {"eos_token_id", 2},
               {"bos_token_id", 1}}};
}

// Writes a random-weight bf16 checkpoint (normal-ish, std 0.02; norm weights 1) unless the
// directory already holds one of the same config.
absl::Status WriteRandomModel(const ModelShape& shape, const fs::path& dir) {
  const std::string cfg = shape.config.dump(2);
  {
    std::ifstream in(dir / "config.json");
    std::stringstream ss;
    ss << in.rdbuf();
    if (ss.str() == cfg && fs::exists(dir / "model.safetensors")) return absl::OkStatus();
  }
  fs::create_directories(dir);
  const auto tensors = TensorList(shape.config);
  json header;
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t off = 0;
  for (const auto& [name, dims] : tensors) {
    uint64_t n = 1;
    for (auto d : dims) n *= d;
    header[name] = {{"dtype", "BF16"}, {"shape", dims}, {"data_offsets", {off, off + 2 * n}}};
    off += 2 * n;
  }
  std::string h = header.dump();
  while (h.size() % 8) h += ' ';
  const fs::path tmp = dir / "model.safetensors.tmp";
  std::ofstream out(tmp, std::ios::binary);
  const uint64_t hl = h.size();
  out.write(reinterpret_cast<const char*>(&hl), 8);
  out << h;
  uint64_t state = 0x9e3779b97f4a7c15ull;
  std::vector<uint16_t> buf;
  for (const auto& [name, dims] : tensors) {
    uint64_t n = 1;
    for (auto d : dims) n *= d;
    buf.resize(n);
    const bool is_norm = dims.size() == 1 && name.find("bias") == std::string::npos;
    for (uint64_t i = 0; i < n; ++i) {
      if (is_norm) {
        buf[i] = F32ToBf16(1.0f);
        continue;
      }
      state ^= state << 13;
      state ^= state >> 7;
      state ^= state << 17;
      // Sum of two uniforms: a triangular distribution with std 0.02.
      const float u1 = static_cast<float>(state & 0xffffff) / 16777216.f;
      const float u2 = static_cast<float>((state >> 24) & 0xffffff) / 16777216.f;
      buf[i] = F32ToBf16((u1 + u2 - 1.f) * 0.049f);
    }
    out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(2 * n));
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp.string()));
  fs::rename(tmp, dir / "model.safetensors");
  std::ofstream(dir / "config.json") << cfg;
  return absl::OkStatus();
}

}  // namespace duet::cli
