#include "duet/model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "duet/kernels/attention.h"
#include "duet/kernels/ops.h"
#include "duet/kernels/profile.h"
#include "duet/model/fingerprint.h"
#include "duet/model/safetensors.h"
#include "duet/tensor/dtype.h"

namespace duet::model {
namespace fs = std::filesystem;
using kernels::Linear;
using kernels::WeightLayout;

struct Model::Weights {
  struct Layer {
    std::vector<float> norm1_w, norm1_b, norm2_w, norm2_b;
    std::unique_ptr<Linear> qkv, o, up, down;  // up: GPT-2 c_fc, Llama gate|up fused
  };
  std::vector<Layer> layers;
  // Token embeddings [n_vocab, n_embd]: f32 in f32 mode, else bf16.
  std::vector<float> embed_f32;
  std::vector<uint16_t> embed_bf16;
  std::vector<float> pos_embed;  // GPT-2 learned positions [n_ctx, n_embd]
  std::vector<float> final_norm_w, final_norm_b;
  std::unique_ptr<Linear> lm_head;
  std::vector<float> inv_freq;  // RoPE, head_dim/2
};

// Per-forward buffers, grown as needed and reused.
struct Model::Scratch {
  std::vector<float> x, h, qkv, attn, tmp, ff, act, last;
  std::vector<int32_t> positions;
  std::vector<kernels::AttentionSeq> seqs;
};

Model::Model() = default;
Model::~Model() = default;

namespace {

absl::StatusOr<std::string> ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(p.string(), ": missing or unreadable"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string ShapeStr(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

// Takes tensors by name from the checkpoint, checking shapes, and remembers which were used so
// that leftovers can be reported.
class TensorTaker {
 public:
  explicit TensorTaker(const WeightFiles& files) : files_(files) {}

  absl::StatusOr<std::vector<float>> Take(const std::string& name,
                                          const std::vector<int64_t>& shape) {
    const TensorRef* t = files_.Find(name);
    if (t == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("missing tensor \"", name, "\""));
    if (t->shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", name, "\" has shape ", ShapeStr(t->shape), ", expected ", ShapeStr(shape)));
    }
    used_.insert(name);
    std::vector<float> out(static_cast<size_t>(t->numel()));
    ConvertToF32(t->dtype, t->data, out.data(), out.size());
    return out;
  }

  bool Has(const std::string& name) const { return files_.Find(name) != nullptr; }

  // Every tensor not taken and not a known buffer is an error.
  absl::Status CheckAllUsed() const {
    for (const auto& [name, ref] : files_.tensors()) {
      if (used_.count(name)) continue;
      // Non-parameter buffers some checkpoints carry.
      if (absl::EndsWith(name, ".attn.bias") || absl::EndsWith(name, ".attn.masked_bias") ||
          absl::EndsWith(name, "rotary_emb.inv_freq")) {
        continue;
      }
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected tensor \"", name, "\" ", ShapeStr(ref.shape)));
    }
    return absl::OkStatus();
  }

 private:
  const WeightFiles& files_;
  std::set<std::string> used_;
};

std::vector<float> Concat(std::initializer_list<const std::vector<float>*> parts) {
  std::vector<float> out;
  for (const auto* p : parts) out.insert(out.end(), p->begin(), p->end());
  return out;
}

std::vector<float> RopeInvFreq(const ModelConfig& c) {
  const int half = c.head_dim / 2;
  std::vector<float> out(half);
  const auto& rs = c.rope_scaling;
  for (int i = 0; i < half; ++i) {
    double inv = std::pow(c.rope_theta, -2.0 * i / c.head_dim);
    if (rs.type == RopeScaling::Type::kLinear) {
      inv /= rs.factor;
    } else if (rs.type == RopeScaling::Type::kLlama3) {
      const double orig = static_cast<double>(rs.original_max_position_embeddings);
      const double low_wavelen = orig / rs.low_freq_factor;
      const double high_wavelen = orig / rs.high_freq_factor;
      const double wavelen = 2.0 * M_PI / inv;
      if (wavelen < high_wavelen) {
        // high frequency: unchanged
      } else if (wavelen > low_wavelen) {
        inv /= rs.factor;
      } else {
        const double smooth =
            (orig / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
        inv = (1.0 - smooth) * inv / rs.factor + smooth * inv;
      }
    }
    out[i] = static_cast<float>(inv);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const fs::path& dir,
                                                   const ModelOptions& options) {
  auto model = std::unique_ptr<Model>(new Model());
  model->options_ = options;
  if (auto s = model->Init(dir); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(dir.string(), ": ", s.message()));
  }
  return model;
}

#define DUET_TAKE(var, name, ...)                  \
  auto var##_or = taker.Take(name, {__VA_ARGS__}); \
  if (!var##_or.ok()) return var##_or.status();    \
  std::vector<float> var = std::move(*var##_or)

absl::Status Model::Init(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return absl::NotFoundError("model directory not found");
  auto config_text = ReadFile(dir / "config.json");
  if (!config_text.ok()) return config_text.status();
  auto config = ParseConfig(*config_text);
  if (!config.ok()) return config.status();
  config_ = *config;
  const ModelConfig& c = config_;
  auto files_or = WeightFiles::Open(dir);
  if (!files_or.ok()) return files_or.status();
  const WeightFiles& files = **files_or;

  // Fingerprint: the config, then every tensor in name order.
  Hasher hasher;
  hasher.Update(*config_text);
  for (const auto& [name, t] : files.tensors()) {
    hasher.Update(name);
    hasher.Update(DTypeName(t.dtype));
    hasher.Update(t.shape.data(), t.shape.size() * sizeof(int64_t));
    hasher.Update(t.data, t.bytes);
  }
  fingerprint_ = hasher.HexDigest();

  const auto prec = options_.precision;
  auto w = std::make_unique<Weights>();
  TensorTaker taker(files);
  const int64_t E = c.n_embd, F = c.n_ff, V = c.n_vocab, D = c.head_dim;
  const int64_t QD = int64_t{c.n_heads} * D, KD = int64_t{c.n_kv_heads} * D;
  std::vector<float> embed;

  if (c.arch == Arch::kGpt2) {
    // Real GPT-2 checkpoints name tensors with or without the "transformer." prefix.
    const std::string p = taker.Has("transformer.wte.weight") ? "transformer." : "";
    DUET_TAKE(wte, p + "wte.weight", V, E);
    DUET_TAKE(wpe, p + "wpe.weight", c.n_ctx, E);
    embed = std::move(wte);
    w->pos_embed = std::move(wpe);
    for (int l = 0; l < c.n_layers; ++l) {
      const std::string b = absl::StrCat(p, "h.", l, ".");
      Weights::Layer L;
      DUET_TAKE(ln1w, b + "ln_1.weight", E);
      DUET_TAKE(ln1b, b + "ln_1.bias", E);
      DUET_TAKE(ln2w, b + "ln_2.weight", E);
      DUET_TAKE(ln2b, b + "ln_2.bias", E);
      DUET_TAKE(attn_w, b + "attn.c_attn.weight", E, 3 * E);
      DUET_TAKE(attn_b, b + "attn.c_attn.bias", 3 * E);
      DUET_TAKE(proj_w, b + "attn.c_proj.weight", E, E);
      DUET_TAKE(proj_b, b + "attn.c_proj.bias", E);
      DUET_TAKE(fc_w, b + "mlp.c_fc.weight", E, F);
      DUET_TAKE(fc_b, b + "mlp.c_fc.bias", F);
      DUET_TAKE(mp_w, b + "mlp.c_proj.weight", F, E);
      DUET_TAKE(mp_b, b + "mlp.c_proj.bias", E);
      L.norm1_w = std::move(ln1w);
      L.norm1_b = std::move(ln1b);
      L.norm2_w = std::move(ln2w);
      L.norm2_b = std::move(ln2b);
      auto qkv = Linear::Create(E, 3 * E, attn_w.data(), WeightLayout::kKN, attn_b.data(), prec);
      auto o = Linear::Create(E, E, proj_w.data(), WeightLayout::kKN, proj_b.data(), prec);
      auto up = Linear::Create(E, F, fc_w.data(), WeightLayout::kKN, fc_b.data(), prec);
      auto down = Linear::Create(F, E, mp_w.data(), WeightLayout::kKN, mp_b.data(), prec);
      for (auto* s : {&qkv, &o, &up, &down})
        if (!s->ok()) return s->status();
      L.qkv = std::move(*qkv);
      L.o = std::move(*o);
      L.up = std::move(*up);
      L.down = std::move(*down);
      w->layers.push_back(std::move(L));
    }
    DUET_TAKE(lnfw, p + "ln_f.weight", E);
    DUET_TAKE(lnfb, p + "ln_f.bias", E);
    w->final_norm_w = std::move(lnfw);
    w->final_norm_b = std::move(lnfb);
    auto head = Linear::Create(E, V, embed.data(), WeightLayout::kNK, nullptr, prec);
    if (!head.ok()) return head.status();
    w->lm_head = std::move(*head);
    // A checkpoint may carry an explicit (tied) lm_head copy.
    if (taker.Has("lm_head.weight")) {
      auto ignored = taker.Take("lm_head.weight", {V, E});
      if (!ignored.ok()) return ignored.status();
    }
  } else {
    DUET_TAKE(emb, "model.embed_tokens.weight", V, E);
    embed = std::move(emb);
    for (int l = 0; l < c.n_layers; ++l) {
      const std::string b = absl::StrCat("model.layers.", l, ".");
      Weights::Layer L;
      DUET_TAKE(n1, b + "input_layernorm.weight", E);
      DUET_TAKE(n2, b + "post_attention_layernorm.weight", E);
      DUET_TAKE(q, b + "self_attn.q_proj.weight", QD, E);
      DUET_TAKE(k, b + "self_attn.k_proj.weight", KD, E);
      DUET_TAKE(v, b + "self_attn.v_proj.weight", KD, E);
      DUET_TAKE(o, b + "self_attn.o_proj.weight", E, QD);
      DUET_TAKE(g, b + "mlp.gate_proj.weight", F, E);
      DUET_TAKE(u, b + "mlp.up_proj.weight", F, E);
      DUET_TAKE(d, b + "mlp.down_proj.weight", E, F);
      std::vector<float> qkv_bias;
      if (c.qkv_bias) {
        DUET_TAKE(qb, b + "self_attn.q_proj.bias", QD);
        DUET_TAKE(kb, b + "self_attn.k_proj.bias", KD);
        DUET_TAKE(vb, b + "self_attn.v_proj.bias", KD);
        qkv_bias = Concat({&qb, &kb, &vb});
      }
      L.norm1_w = std::move(n1);
      L.norm2_w = std::move(n2);
      const auto qkv_w = Concat({&q, &k, &v});  // [(H+2Hkv)·D, E]
      const auto gate_up = Concat({&g, &u});    // [2F, E]
      auto qkv = Linear::Create(E, QD + 2 * KD, qkv_w.data(), WeightLayout::kNK,
                                qkv_bias.empty() ? nullptr : qkv_bias.data(), prec);
      auto op = Linear::Create(QD, E, o.data(), WeightLayout::kNK, nullptr, prec);
      auto up = Linear::Create(E, 2 * F, gate_up.data(), WeightLayout::kNK, nullptr, prec);
      auto down = Linear::Create(F, E, d.data(), WeightLayout::kNK, nullptr, prec);
      for (auto* s : {&qkv, &op, &up, &down})
        if (!s->ok()) return s->status();
      L.qkv = std::move(*qkv);
      L.o = std::move(*op);
      L.up = std::move(*up);
      L.down = std::move(*down);
      w->layers.push_back(std::move(L));
    }
    DUET_TAKE(fn, "model.norm.weight", E);
    w->final_norm_w = std::move(fn);
    if (c.tie_embeddings) {
      auto head = Linear::Create(E, V, embed.data(), WeightLayout::kNK, nullptr, prec);
      if (!head.ok()) return head.status();
      w->lm_head = std::move(*head);
      if (taker.Has("lm_head.weight")) {  // some tied checkpoints store a copy
        auto ignored = taker.Take("lm_head.weight", {V, E});
        if (!ignored.ok()) return ignored.status();
      }
    } else {
      DUET_TAKE(lm, "lm_head.weight", V, E);
      auto head = Linear::Create(E, V, lm.data(), WeightLayout::kNK, nullptr, prec);
      if (!head.ok()) return head.status();
      w->lm_head = std::move(*head);
    }
    w->inv_freq = RopeInvFreq(c);
  }
  if (auto s = taker.CheckAllUsed(); !s.ok()) return s;

  if (prec == kernels::Precision::kF32) {
    w->embed_f32 = std::move(embed);
  } else {
    w->embed_bf16.resize(embed.size());
    ConvertF32ToBf16(embed.data(), w->embed_bf16.data(), embed.size());
  }
  w_ = std::move(w);
  scratch_ = std::make_unique<Scratch>();
  return absl::OkStatus();
}
#undef DUET_TAKE

absl::StatusOr<kernels::KvDtype> ParseKvCacheDtype(std::string_view name) {
  if (name == "f32") return kernels::KvDtype::kF32;
  if (name == "f16") return kernels::KvDtype::kF16;
  if (name == "int8") return kernels::KvDtype::kI8;
  return absl::InvalidArgumentError(
      absl::StrCat("K/V cache dtype must be f32, f16 or int8, got \"", std::string(name), "\""));
}

const char* KvCacheDtypeName(kernels::KvDtype dtype) {
  switch (dtype) {
    case kernels::KvDtype::kF32:
      return "f32";
    case kernels::KvDtype::kF16:
      return "f16";
    case kernels::KvDtype::kI8:
      return "int8";
  }
  return "?";
}

kv::KvShape Model::kv_shape(int32_t block_size) const {
  kv::KvShape s;
  s.n_layers = config_.n_layers;
  s.n_kv_heads = config_.n_kv_heads;
  s.head_dim = config_.head_dim;
  s.block_size = block_size;
  s.dtype = options_.kv_cache_dtype;
  return s;
}

size_t Model::weight_bytes() const {
  size_t n = w_->lm_head->weight_bytes();
  for (const auto& L : w_->layers)
    n +=
        L.qkv->weight_bytes() + L.o->weight_bytes() + L.up->weight_bytes() + L.down->weight_bytes();
  return n;
}

absl::Status Model::Forward(std::span<const BatchItem> items, std::vector<float>* logits,
                            const ForwardHooks* hooks) {
  const ModelConfig& c = config_;
  Scratch& s = *scratch_;
  const int64_t E = c.n_embd, D = c.head_dim, QKV = c.qkv_dim();
  const int64_t QD = int64_t{c.n_heads} * D, KD = int64_t{c.n_kv_heads} * D;

  // Validate everything before touching any cache.
  int64_t M = 0, n_out = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const BatchItem& it = items[i];
    if (it.kv == nullptr || it.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("batch item ", i, " has no tokens"));
    }
    if (it.kv->pool() != items[0].kv->pool()) {
      return absl::InvalidArgumentError(absl::StrCat("batch item ", i, " uses another K/V pool"));
    }
    for (size_t j = 0; j < i; ++j) {
      if (items[j].kv == it.kv) {
        return absl::InvalidArgumentError(
            absl::StrCat("batch items ", j, " and ", i, " share one sequence"));
      }
    }
    for (int32_t t : it.tokens) {
      if (t < 0 || t >= c.n_vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", t, " out of range [0, ", c.n_vocab, ")"));
      }
    }
    const int64_t end = int64_t{it.kv->n_tokens()} + static_cast<int64_t>(it.tokens.size());
    if (end > c.n_ctx) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence of ", end, " tokens exceeds the context of ", c.n_ctx));
    }
    if (end > it.kv->capacity()) {
      return absl::InvalidArgumentError(
          absl::StrCat("K/V capacity ", it.kv->capacity(), " < ", end, " tokens"));
    }
    M += static_cast<int64_t>(it.tokens.size());
    n_out += it.all_logits ? static_cast<int64_t>(it.tokens.size()) : 1;
  }
  if (M == 0) return absl::InvalidArgumentError("empty batch");

  s.x.resize(M * E);
  s.h.resize(M * E);
  s.qkv.resize(M * QKV);
  s.attn.resize(M * QD);
  s.tmp.resize(M * E);
  const int64_t ff_width = c.arch == Arch::kGpt2 ? c.n_ff : 2 * int64_t{c.n_ff};
  s.ff.resize(M * ff_width);
  s.act.resize(M * c.n_ff);
  s.positions.resize(M);
  s.seqs.resize(items.size());

  // Embeddings and positions.
  {
    kernels::ScopedOp prof(kernels::Op::kEmbed);
    int64_t row = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      const BatchItem& it = items[i];
      const int32_t n_past = it.kv->n_tokens();
      s.seqs[i] = {it.kv->blocks().data(), n_past, static_cast<int32_t>(it.tokens.size()), row};
      for (size_t j = 0; j < it.tokens.size(); ++j, ++row) {
        s.positions[row] = n_past + static_cast<int32_t>(j);
        float* xr = s.x.data() + row * E;
        const int64_t tok = it.tokens[j];
        if (!w_->embed_f32.empty()) {
          std::memcpy(xr, w_->embed_f32.data() + tok * E, E * sizeof(float));
        } else {
          const uint16_t* er = w_->embed_bf16.data() + tok * E;
          for (int64_t e = 0; e < E; ++e) xr[e] = Bf16ToF32(er[e]);
        }
        if (c.arch == Arch::kGpt2) {
          const float* pr = w_->pos_embed.data() + int64_t{s.positions[row]} * E;
          for (int64_t e = 0; e < E; ++e) xr[e] += pr[e];
        }
      }
    }
  }

  const bool gpt2 = c.arch == Arch::kGpt2;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const bool decode_only = std::all_of(s.seqs.begin(), s.seqs.end(),
                                       [](const kernels::AttentionSeq& q) { return q.n_new == 1; });
  for (int32_t l = 0; l < c.n_layers; ++l) {
    auto& L = w_->layers[l];
    using kernels::Op;
    using kernels::ScopedOp;
    // Attention block.
    {
      ScopedOp prof(Op::kNorm);
      if (gpt2) {
        kernels::LayerNorm(s.x.data(), L.norm1_w.data(), L.norm1_b.data(), M, E, c.norm_eps,
                           s.h.data());
      } else {
        kernels::RmsNorm(s.x.data(), L.norm1_w.data(), M, E, c.norm_eps, s.h.data());
      }
    }
    if (decode_only) {
      // The lines this step's K/V rows will be written into are cold (K is stored transposed:
      // a new row touches every K line of its block); ask for them now, so they arrive while
      // the QKV projection streams its weights, not while the K/V write waits on them.
      const kernels::PagedKvLayout ahead = items[0].kv->pool()->Layout(l);
      for (const auto& seq : s.seqs)
        ahead.PrefetchSlot(seq.block_table[seq.n_past / ahead.block_size],
                           seq.n_past % ahead.block_size);
    }
    {
      ScopedOp prof(Op::kQkv);
      if (auto st = L.qkv->Forward(s.h.data(), M, s.qkv.data()); !st.ok()) return st;
    }
    if (!gpt2) {
      ScopedOp prof(Op::kRope);
      kernels::Rope(s.qkv.data(), M, QKV, c.n_heads, D, s.positions.data(), w_->inv_freq.data());
      kernels::Rope(s.qkv.data() + QD, M, QKV, c.n_kv_heads, D, s.positions.data(),
                    w_->inv_freq.data());
    }
    // Write the new rows' K and V into their sequences' blocks. Each (sequence, kv head) pair
    // writes disjoint memory, so the pairs are spread over the threads: a prompt's by head, a
    // decode batch's by sequence and head (a new K row is a strided write into cold lines).
    const kernels::PagedKvLayout layout = items[0].kv->pool()->Layout(l);
    {
      ScopedOp prof(Op::kKvWrite);
      const int64_t n_pairs = static_cast<int64_t>(items.size()) * c.n_kv_heads;
#pragma omp parallel for schedule(static) if (M * c.n_kv_heads >= 64)
      for (int64_t pair = 0; pair < n_pairs; ++pair) {
        const auto& seq = s.seqs[pair / c.n_kv_heads];
        const int32_t h = static_cast<int32_t>(pair % c.n_kv_heads);
        // Block by block: a run of rows goes into K together (K is transposed in the block).
        for (int32_t j = 0; j < seq.n_new;) {
          const int32_t pos = seq.n_past + j;
          const int32_t block = seq.block_table[pos / layout.block_size];
          const int32_t slot = pos % layout.block_size;
          const int32_t m = std::min(layout.block_size - slot, seq.n_new - j);
          const float* k = s.qkv.data() + (seq.row_begin + j) * QKV + QD + h * D;
          layout.StoreKRows(block, h, slot, m, k, QKV);
          for (int32_t i = 0; i < m; ++i) layout.StoreV(block, h, slot + i, k + i * QKV + KD);
          j += m;
        }
      }
    }
    if (hooks != nullptr && hooks->on_layer_kv && !hooks->on_layer_kv(l)) {
      return absl::CancelledError(absl::StrCat("forward pass aborted after layer ", l));
    }
    {
      ScopedOp prof(Op::kAttention);
      kernels::PagedAttention(s.qkv.data(), QKV, layout, s.seqs.data(),
                              static_cast<int32_t>(s.seqs.size()), c.n_heads, scale, s.attn.data(),
                              QD);
    }
    {
      ScopedOp prof(Op::kOut);
      if (auto st = L.o->Forward(s.attn.data(), M, s.tmp.data()); !st.ok()) return st;
    }
    {
      ScopedOp prof(Op::kResidual);
      kernels::AddInPlace(s.x.data(), s.tmp.data(), M * E);
    }

    // MLP block.
    {
      ScopedOp prof(Op::kNorm);
      if (gpt2) {
        kernels::LayerNorm(s.x.data(), L.norm2_w.data(), L.norm2_b.data(), M, E, c.norm_eps,
                           s.h.data());
      } else {
        kernels::RmsNorm(s.x.data(), L.norm2_w.data(), M, E, c.norm_eps, s.h.data());
      }
    }
    {
      ScopedOp prof(Op::kMlpUp);
      if (auto st = L.up->Forward(s.h.data(), M, s.ff.data()); !st.ok()) return st;
    }
    {
      ScopedOp prof(Op::kAct);
      if (gpt2) {
        kernels::GeluTanh(s.ff.data(), M * c.n_ff);
      } else {
        kernels::SiluMul(s.ff.data(), M, c.n_ff, s.act.data());
      }
    }
    {
      ScopedOp prof(Op::kMlpDown);
      if (auto st = L.down->Forward(gpt2 ? s.ff.data() : s.act.data(), M, s.tmp.data()); !st.ok())
        return st;
    }
    {
      ScopedOp prof(Op::kResidual);
      kernels::AddInPlace(s.x.data(), s.tmp.data(), M * E);
    }
  }

  // Final norm and LM head, only on the rows whose logits are wanted.
  s.last.resize(n_out * E);
  {
    int64_t out = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      const auto& seq = s.seqs[i];
      const int32_t first = items[i].all_logits ? 0 : seq.n_new - 1;
      for (int32_t j = first; j < seq.n_new; ++j, ++out) {
        std::memcpy(s.last.data() + out * E, s.x.data() + (seq.row_begin + j) * E,
                    E * sizeof(float));
      }
    }
  }
  s.h.resize(std::max<int64_t>(M, n_out) * E);
  if (gpt2) {
    kernels::LayerNorm(s.last.data(), w_->final_norm_w.data(), w_->final_norm_b.data(), n_out, E,
                       c.norm_eps, s.h.data());
  } else {
    kernels::RmsNorm(s.last.data(), w_->final_norm_w.data(), n_out, E, c.norm_eps, s.h.data());
  }
  logits->resize(static_cast<size_t>(n_out) * c.n_vocab);
  {
    kernels::ScopedOp prof(kernels::Op::kLmHead);
    if (auto st = w_->lm_head->Forward(s.h.data(), n_out, logits->data()); !st.ok()) return st;
  }

  for (const BatchItem& it : items) {
    it.kv->set_n_tokens(it.kv->n_tokens() + static_cast<int32_t>(it.tokens.size()));
  }
  return absl::OkStatus();
}

}  // namespace duet::model
