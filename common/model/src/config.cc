#include "duet/model/config.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"

namespace duet::model {
namespace {

using nlohmann::json;

absl::StatusOr<int64_t> GetInt(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: missing or non-integer field \"", key, "\""));
  }
  return it->get<int64_t>();
}

int64_t GetIntOr(const json& j, const char* key, int64_t fallback) {
  auto it = j.find(key);
  return (it != j.end() && it->is_number_integer()) ? it->get<int64_t>() : fallback;
}

double GetNumOr(const json& j, const char* key, double fallback) {
  auto it = j.find(key);
  return (it != j.end() && it->is_number()) ? it->get<double>() : fallback;
}

absl::Status Positive(const char* name, int64_t v) {
  if (v <= 0 || v > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: ", name, " = ", v,
                                                   " must be positive"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string_view ArchName(Arch arch) {
  switch (arch) {
    case Arch::kGpt2:
      return "gpt2";
    case Arch::kLlama:
      return "llama";
    case Arch::kQwen2:
      return "qwen2";
  }
  return "?";
}

absl::StatusOr<ModelConfig> ParseConfig(std::string_view json_text) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("config.json: not a JSON object");
  }
  ModelConfig c;
  auto archs = j.find("architectures");
  if (archs != j.end() && archs->is_array() && !archs->empty() && (*archs)[0].is_string()) {
    c.architecture = (*archs)[0].get<std::string>();
  } else if (j.contains("model_type") && j["model_type"].is_string()) {
    c.architecture = j["model_type"].get<std::string>();
  } else {
    return absl::InvalidArgumentError("config.json: no \"architectures\" or \"model_type\"");
  }
  const std::string& a = c.architecture;
  if (a == "GPT2LMHeadModel" || a == "gpt2") {
    c.arch = Arch::kGpt2;
  } else if (a == "LlamaForCausalLM" || a == "llama") {
    c.arch = Arch::kLlama;
  } else if (a == "Qwen2ForCausalLM" || a == "qwen2") {
    c.arch = Arch::kQwen2;
  } else {
    return absl::UnimplementedError(absl::StrCat(
        "config.json: unsupported architecture \"", a,
        "\" (supported: GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM)"));
  }

  if (c.arch == Arch::kGpt2) {
    auto n_layer = GetInt(j, "n_layer");
    auto n_embd = GetInt(j, "n_embd");
    auto n_head = GetInt(j, "n_head");
    auto vocab = GetInt(j, "vocab_size");
    auto n_pos = GetInt(j, "n_positions");
    for (const auto* s : {&n_layer, &n_embd, &n_head, &vocab, &n_pos})
      if (!s->ok()) return s->status();
    c.n_layers = *n_layer;
    c.n_embd = *n_embd;
    c.n_heads = *n_head;
    c.n_kv_heads = *n_head;
    c.n_vocab = *vocab;
    c.n_ctx = *n_pos;
    c.n_ff = GetIntOr(j, "n_inner", 4 * c.n_embd);
    if (j.contains("n_inner") && j["n_inner"].is_null()) c.n_ff = 4 * c.n_embd;
    c.norm_eps = static_cast<float>(GetNumOr(j, "layer_norm_epsilon", 1e-5));
    c.tie_embeddings = true;
    c.qkv_bias = true;
    auto act = j.find("activation_function");
    if (act != j.end() && act->is_string()) {
      const auto s = act->get<std::string>();
      if (s != "gelu_new" && s != "gelu_pytorch_tanh") {
        return absl::UnimplementedError(
            absl::StrCat("config.json: activation_function \"", s, "\" not supported (gelu_new)"));
      }
    }
  } else {
    auto layers = GetInt(j, "num_hidden_layers");
    auto hidden = GetInt(j, "hidden_size");
    auto heads = GetInt(j, "num_attention_heads");
    auto inter = GetInt(j, "intermediate_size");
    auto vocab = GetInt(j, "vocab_size");
    for (const auto* s : {&layers, &hidden, &heads, &inter, &vocab})
      if (!s->ok()) return s->status();
    c.n_layers = *layers;
    c.n_embd = *hidden;
    c.n_heads = *heads;
    c.n_ff = *inter;
    c.n_vocab = *vocab;
    c.n_kv_heads = GetIntOr(j, "num_key_value_heads", c.n_heads);
    if (j.contains("num_key_value_heads") && j["num_key_value_heads"].is_null())
      c.n_kv_heads = c.n_heads;
    c.n_ctx = GetIntOr(j, "max_position_embeddings", 2048);
    c.norm_eps = static_cast<float>(GetNumOr(j, "rms_norm_eps", 1e-6));
    c.rope_theta = GetNumOr(j, "rope_theta", 10000.0);
    c.tie_embeddings = j.contains("tie_word_embeddings") && j["tie_word_embeddings"].is_boolean()
                           ? j["tie_word_embeddings"].get<bool>()
                           : false;
    c.qkv_bias = c.arch == Arch::kQwen2 ||
                 (j.contains("attention_bias") && j["attention_bias"].is_boolean() &&
                  j["attention_bias"].get<bool>());
    auto act = j.find("hidden_act");
    if (act != j.end() && act->is_string() && act->get<std::string>() != "silu") {
      return absl::UnimplementedError(absl::StrCat(
          "config.json: hidden_act \"", act->get<std::string>(), "\" not supported (silu)"));
    }
    auto rs = j.find("rope_scaling");
    if (rs != j.end() && rs->is_object()) {
      std::string type;
      if (rs->contains("rope_type") && (*rs)["rope_type"].is_string())
        type = (*rs)["rope_type"].get<std::string>();
      else if (rs->contains("type") && (*rs)["type"].is_string())
        type = (*rs)["type"].get<std::string>();
      if (type == "llama3") {
        c.rope_scaling.type = RopeScaling::Type::kLlama3;
      } else if (type == "linear") {
        c.rope_scaling.type = RopeScaling::Type::kLinear;
      } else if (type != "default") {
        return absl::UnimplementedError(
            absl::StrCat("config.json: rope_scaling type \"", type, "\" not supported"));
      }
      c.rope_scaling.factor = GetNumOr(*rs, "factor", 1.0);
      c.rope_scaling.low_freq_factor = GetNumOr(*rs, "low_freq_factor", 1.0);
      c.rope_scaling.high_freq_factor = GetNumOr(*rs, "high_freq_factor", 4.0);
      c.rope_scaling.original_max_position_embeddings =
          GetIntOr(*rs, "original_max_position_embeddings", 8192);
      if (c.rope_scaling.factor <= 0 ||
          c.rope_scaling.high_freq_factor <= c.rope_scaling.low_freq_factor) {
        return absl::InvalidArgumentError("config.json: bad rope_scaling factors");
      }
    }
  }
  if (auto s = Positive("n_layers", c.n_layers); !s.ok()) return s;
  if (auto s = Positive("hidden_size", c.n_embd); !s.ok()) return s;
  if (auto s = Positive("num_attention_heads", c.n_heads); !s.ok()) return s;
  if (auto s = Positive("num_key_value_heads", c.n_kv_heads); !s.ok()) return s;
  if (auto s = Positive("intermediate_size", c.n_ff); !s.ok()) return s;
  if (auto s = Positive("vocab_size", c.n_vocab); !s.ok()) return s;
  if (auto s = Positive("max_position_embeddings", c.n_ctx); !s.ok()) return s;
  if (c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: num_attention_heads ", c.n_heads,
                                                   " is not a multiple of num_key_value_heads ",
                                                   c.n_kv_heads));
  }
  c.head_dim = static_cast<int32_t>(GetIntOr(j, "head_dim", 0));
  if (c.head_dim <= 0) {
    if (c.n_embd % c.n_heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat("config.json: hidden_size ", c.n_embd,
                                                     " not divisible by heads ", c.n_heads));
    }
    c.head_dim = c.n_embd / c.n_heads;
  }
  if (c.head_dim % 2 != 0 || c.head_dim > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: head_dim ", c.head_dim, " must be even and <= 1024"));
  }
  c.bos_token_id = static_cast<int32_t>(GetIntOr(j, "bos_token_id", -1));
  auto eos = j.find("eos_token_id");
  if (eos != j.end()) {
    if (eos->is_number_integer()) {
      c.eos_token_ids.push_back(eos->get<int32_t>());
    } else if (eos->is_array()) {
      for (const auto& e : *eos)
        if (e.is_number_integer()) c.eos_token_ids.push_back(e.get<int32_t>());
    }
  }
  return c;
}

}  // namespace duet::model
