#include "duet/model/config.h"

#include <catch2/catch.hpp>

using duet::model::Arch;
using duet::model::ParseConfig;
using duet::model::RopeScaling;

TEST_CASE("Llama 3 config with GQA, tied embeddings and llama3 rope scaling", "[config]") {
  auto c = ParseConfig(R"({"architectures":["LlamaForCausalLM"],"hidden_size":2048,
    "intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,
    "num_key_value_heads":8,"max_position_embeddings":131072,"rms_norm_eps":1e-5,
    "rope_theta":500000.0,"rope_scaling":{"factor":32.0,"high_freq_factor":4.0,
    "low_freq_factor":1.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},
    "tie_word_embeddings":true,"vocab_size":128256,"bos_token_id":128000,
    "eos_token_id":[128001,128008,128009]})");
  REQUIRE(c.ok());
  REQUIRE(c->arch == Arch::kLlama);
  REQUIRE(c->head_dim == 64);
  REQUIRE(c->n_kv_heads == 8);
  REQUIRE(c->tie_embeddings);
  REQUIRE(c->rope_scaling.type == RopeScaling::Type::kLlama3);
  REQUIRE(c->rope_scaling.factor == 32.0);
  REQUIRE(c->eos_token_ids == std::vector<int32_t>{128001, 128008, 128009});
}

TEST_CASE("GPT-2 config", "[config]") {
  auto c = ParseConfig(R"({"architectures":["GPT2LMHeadModel"],"n_embd":768,"n_layer":12,
    "n_head":12,"n_positions":1024,"vocab_size":50257,"n_inner":null,
    "activation_function":"gelu_new","eos_token_id":50256,"bos_token_id":50256})");
  REQUIRE(c.ok());
  REQUIRE(c->arch == Arch::kGpt2);
  REQUIRE(c->n_ff == 3072);
  REQUIRE(c->head_dim == 64);
  REQUIRE(c->n_ctx == 1024);
}

TEST_CASE("config errors name the field", "[config]") {
  auto bad = ParseConfig("not json");
  REQUIRE(bad.status().code() == absl::StatusCode::kInvalidArgument);
  auto missing = ParseConfig(R"({"architectures":["LlamaForCausalLM"],"hidden_size":64})");
  REQUIRE(missing.status().code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(missing.status().message().find("num_hidden_layers") != std::string::npos);
  auto gqa = ParseConfig(R"({"architectures":["LlamaForCausalLM"],"hidden_size":64,
    "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
    "num_key_value_heads":3,"vocab_size":10})");
  REQUIRE(gqa.status().code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(gqa.status().message().find("num_key_value_heads 3") != std::string::npos);
  auto arch = ParseConfig(R"({"architectures":["BertModel"]})");
  REQUIRE(arch.status().code() == absl::StatusCode::kUnimplemented);
  REQUIRE(arch.status().message().find("BertModel") != std::string::npos);
}
