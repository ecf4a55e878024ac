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
#include "random_model.h"  // tools/duet: the benchmarks' random-weight checkpoints

namespace fs = std::filesystem;
using duet::kernels::KvDtype;
using duet::kernels::Precision;
using duet::kv::BlockPool;
using duet::kv::SequenceKv;
using duet::model::BatchItem;
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

// Logits of the last position after one forward over all of `tokens` in a fresh cache.
std::vector<float> Recomputed(Model& m, BlockPool& pool, const std::vector<int32_t>& tokens) {
  SequenceKv kv(&pool);
  REQUIRE(kv.Reserve(static_cast<int32_t>(tokens.size())).ok());
  std::vector<float> logits;
  BatchItem item{tokens, &kv, false};
  REQUIRE(m.Forward({&item, 1}, &logits).ok());
  return logits;
}

double MaxDiff(const std::vector<float>& a, const float* b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, double{std::fabs(a[i] - b[i])});
  return d;
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

double MaxAbs(const std::vector<float>& a) {
  double d = 0;
  for (float x : a) d = std::max(d, double{std::fabs(x)});
  return d;
}

}  // namespace

TEST_CASE("at serving head sizes, prefill-then-decode equals recomputation (f32, 1e-4)",
          "[model][kv]") {
  for (const auto& c : Cases()) {
    for (const auto cache : {KvDtype::kF32, KvDtype::kF16, KvDtype::kI8}) {
      SECTION(c.name + ", " + duet::model::KvCacheDtypeName(cache) + " cache") {
        auto m = Write(c, cache, "prefill-then-decode");
        auto pool = BlockPool::Create(m->kv_shape(16), 64);
        REQUIRE(pool.ok());
        // 7 prompt tokens, then one token per step across two block edges (16, 32).
        const auto t = Tokens(40, 1);
        SequenceKv kv(pool->get());
        REQUIRE(kv.Reserve(40).ok());
        std::vector<float> logits;
        std::vector<int32_t> prompt(t.begin(), t.begin() + 7);
        BatchItem prefill{prompt, &kv, false};
        REQUIRE(m->Forward({&prefill, 1}, &logits).ok());
        for (size_t i = 7; i <= t.size(); ++i) {
          const auto full = Recomputed(*m, **pool, {t.begin(), t.begin() + i});
          INFO("step with " << i << " tokens");
          REQUIRE(MaxDiff(full, logits.data()) <= Tolerance(cache));
          REQUIRE(MaxAbs(full) > 1e-2);  // logits that carry the weights, not zeros
          if (i == t.size()) break;
          BatchItem step{std::span<const int32_t>(&t[i], 1), &kv, false};
          REQUIRE(m->Forward({&step, 1}, &logits).ok());
        }
        // One long context, whose decode step is split across threads and merged.
        const auto u = Tokens(301, 2);
        SequenceKv long_kv(pool->get());
        REQUIRE(long_kv.Reserve(301).ok());
        std::vector<int32_t> long_prompt(u.begin(), u.end() - 1);
        BatchItem long_prefill{long_prompt, &long_kv, false};
        REQUIRE(m->Forward({&long_prefill, 1}, &logits).ok());
        BatchItem last{std::span<const int32_t>(&u.back(), 1), &long_kv, false};
        REQUIRE(m->Forward({&last, 1}, &logits).ok());
        REQUIRE(MaxDiff(Recomputed(*m, **pool, u), logits.data()) <= Tolerance(cache));
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
        const int32_t V = m->config().n_vocab;
        const std::vector<size_t> lengths = {3, 17, 16, 33, 1};
        std::vector<SequenceKv> batched, single;
        std::vector<float> logits;
        for (size_t s = 0; s < lengths.size(); ++s) {
          const auto prompt = Tokens(lengths[s], 10 + static_cast<uint32_t>(s));
          for (auto* group : {&batched, &single}) {
            group->emplace_back(pool->get());
            REQUIRE(group->back().Reserve(static_cast<int32_t>(lengths[s] + 3)).ok());
            BatchItem item{prompt, &group->back(), false};
            REQUIRE(m->Forward({&item, 1}, &logits).ok());
          }
        }
        for (int step = 0; step < 3; ++step) {
          std::vector<int32_t> next(lengths.size());
          for (size_t s = 0; s < lengths.size(); ++s)
            next[s] = static_cast<int32_t>((s * 29 + step * 7 + 3) % 96);
          std::vector<BatchItem> items;
          for (size_t s = 0; s < lengths.size(); ++s)
            items.push_back({std::span<const int32_t>(&next[s], 1), &batched[s], false});
          std::vector<float> batch_logits;
          REQUIRE(m->Forward(items, &batch_logits).ok());
          REQUIRE(batch_logits.size() == lengths.size() * V);
          for (size_t s = 0; s < lengths.size(); ++s) {
            BatchItem one{std::span<const int32_t>(&next[s], 1), &single[s], false};
            REQUIRE(m->Forward({&one, 1}, &logits).ok());
            INFO("sequence " << s << " step " << step);
            REQUIRE(MaxDiff(logits, batch_logits.data() + s * V) <= Tolerance(cache));
          }
        }
      }
    }
  }
}
