// The K/V-cache invariants at the block size and head sizes that serving uses. The torch fixtures
// (model_test.cc) have head_dim 8 and the tests there use 4-slot blocks, so they run attention's
// portable loops; here random-weight models with head_dim 16 to 64 and 16-slot blocks run the
// AVX-512 paths the servers run: the chunked passes for prefill, and for decode steps the
// single-pass path at 1, 2, 4 and 8 query heads per kv head (3 falls back to the chunked
// passes), a long context split across threads, in every cache type.
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "duet/model/model.h"
#include "invariants.h"
#include "random_model.h"  // tools/duet: the benchmarks' random-weight checkpoints

namespace fs = std::filesystem;
using duet::kernels::KvDtype;
using duet::kernels::Precision;
using duet::kv::BlockPool;
using duet::model::Model;
using nlohmann::json;

namespace {

json Llama(int hidden, int heads, int kv_heads) {
  return json{{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"},
              {"num_hidden_layers", 2}, {"hidden_size", hidden},
              {"num_attention_heads", heads}, {"num_key_value_heads", kv_heads},
              {"intermediate_size", 128}, {"vocab_size", 96},
              {"max_position_embeddings", 512}, {"rms_norm_eps", 1e-5},
              {"rope_theta", 10000.0}, {"tie_word_embeddings", false},
              {"hidden_act", "silu"}, {"eos_token_id", 2}, {"bos_token_id", 1}};
}

json Gpt2(int embd, int heads) {
  return json{{"architectures", {"GPT2LMHeadModel"}}, {"model_type", "gpt2"},
              {"n_layer", 2}, {"n_embd", embd}, {"n_head", heads}, {"n_positions", 512},
              {"vocab_size", 96}, {"layer_norm_epsilon", 1e-5},
              {"activation_function", "gelu_new"}, {"eos_token_id", 95}};
}

struct Case {
  std::string name;  // heads per kv head and head_dim
  json config;
};

std::vector<Case> Cases() {
  return {{"gpt2 group 1 head_dim 64", Gpt2(128, 2)},
          {"llama group 1 head_dim 64", Llama(256, 4, 4)},
          {"llama group 2 head_dim 32", Llama(128, 4, 2)},
          {"llama group 4 head_dim 32", Llama(256, 8, 2)},
          {"llama group 8 head_dim 64", Llama(512, 8, 1)},
          {"llama group 8 head_dim 16", Llama(256, 16, 2)},
          {"llama group 3 head_dim 32", Llama(192, 6, 2)}};
}

// Writes (once) and loads a case's checkpoint. ctest runs the test cases as processes side by
// side, so each test case (`owner`) writes its own copy.
std::unique_ptr<Model> Write(const Case& c, KvDtype cache, const std::string& owner) {
  std::string dir_name = c.name;
  for (auto& ch : dir_name) ch = ch == ' ' ? '-' : ch;
  const fs::path dir = fs::path(DUET_BINARY_DIR) / "test-models" / owner / dir_name;
  REQUIRE(duet::cli::WriteRandomModel({dir_name, c.config}, dir).ok());
  auto m = Model::Load(dir, {Precision::kF32, cache});
  INFO(m.status().ToString());
  REQUIRE(m.ok());
  return std::move(*m);
}

std::vector<int32_t> Tokens(size_t n, uint32_t seed) {
  std::vector<int32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = static_cast<int32_t>((i * 37 + seed * 11 + i * i) % 96);
  return t;
}

// Prefill and a decode step compute a position's K and V in a different order (the chunked
// passes against the decode path, matmuls of different M), so in f32 they agree to ~1e-6. A
// cache that rounds turns that into a difference only where a value sits within an ulp of a
// rounding boundary and lands on the other side: with f16 that stays below 1.1e-5 here; with
// int8 it is one quantization step (max|row| / 127) of one element, measured at 1.5e-4 on
// these logits of magnitude 0.5-1.5 (group 8, head_dim 16: recomputation and the chunked
// passes for the decode step agree exactly; the decode path against the double-precision
// reference is within 2e-5 in the kernel tests). Bugs in attention move these logits by 1e-2
// and more.
double Tolerance(KvDtype cache) { return cache == KvDtype::kI8 ? 1e-3 : 1e-4; }

}  // namespace

TEST_CASE("at serving head sizes, prefill-then-decode equals recomputation (f32, 1e-4)",
          "[model][kv]") {
  for (const auto& c : Cases()) {
    for (const auto cache : {KvDtype::kF32, KvDtype::kF16, KvDtype::kI8}) {
      SECTION(c.name + ", " + duet::model::KvCacheDtypeName(cache) + " cache") {
        auto m = Write(c, cache, "prefill-then-decode");
        auto pool = BlockPool::Create(m->kv_shape(16), 64);
        REQUIRE(pool.ok());
        // 7 prompt tokens, then one token per step across two block edges (16, 32); the logits
        // carry the weights (not all near zero).
        REQUIRE(duet::testing::CheckDecodeEqualsRecompute(*m, **pool, Tokens(40, 1), 7,
                                                          Tolerance(cache)) > 1e-2);
        // One long context, whose decode step is split across threads and merged.
        duet::testing::CheckDecodeEqualsRecompute(*m, **pool, Tokens(301, 2), 300,
                                                  Tolerance(cache));
      }
    }
  }
}

TEST_CASE("at serving head sizes, a batched decode step equals one by one (f32, 1e-4)",
          "[model][kv]") {
  for (const auto& c : Cases()) {
    for (const auto cache : {KvDtype::kF32, KvDtype::kF16, KvDtype::kI8}) {
      SECTION(c.name + ", " + duet::model::KvCacheDtypeName(cache) + " cache") {
        auto m = Write(c, cache, "batched-decode");
        auto pool = BlockPool::Create(m->kv_shape(16), 64);
        REQUIRE(pool.ok());
        std::vector<std::vector<int32_t>> prompts;
        uint32_t seed = 10;
        for (size_t len : {3, 17, 16, 33, 1}) prompts.push_back(Tokens(len, seed++));
        duet::testing::CheckBatchedEqualsOneByOne(
            *m, **pool, prompts,
            [](size_t s, int step) { return static_cast<int32_t>((s * 29 + step * 7 + 3) % 96); },
            Tolerance(cache));
      }
    }
  }
}
