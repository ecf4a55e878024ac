#include "bench_codec.h"

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "args.h"
#include "duet/kv/codec.h"
#include "duet/model/model.h"
#include "duet/tensor/dtype.h"
#include "duet/tensor/malloc_tuning.h"

namespace duet::cli {
namespace {

using nlohmann::json;

constexpr const char* kFingerprint = "00000000000000000000000000000000";

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Result {
  std::string cache;  // element type of the paged cache: "f32" or "f16"
  std::string dtype;
  double encode_gb_s = 0;
  double decode_gb_s = 0;
  int64_t wire_bytes_per_token = 0;
  int64_t cache_bytes_per_token = 0;  // what GB/s counts
  size_t chunks = 0;
  size_t max_chunk_bytes = 0;  // serialized KvChunk
  double max_abs_error = 0;
};

// Largest |a - b| over every element of positions [0, n_tokens) of both sequences.
double MaxAbsError(const kv::SequenceKv& a, const kv::SequenceKv& b, int32_t n_tokens) {
  const kv::KvShape& s = a.pool()->shape();
  double worst = 0;
  std::vector<float> ka(s.head_dim), kb(s.head_dim), va(s.head_dim), vb(s.head_dim);
  for (int32_t layer = 0; layer < s.n_layers; ++layer) {
    const auto la = a.pool()->Layout(layer), lb = b.pool()->Layout(layer);
    for (int32_t t = 0; t < n_tokens; ++t) {
      const int32_t ba = a.blocks()[t / s.block_size], bb = b.blocks()[t / s.block_size];
      const int32_t slot = t % s.block_size;
      for (int32_t h = 0; h < s.n_kv_heads; ++h) {
        la.LoadK(ba, h, slot, ka.data());
        lb.LoadK(bb, h, slot, kb.data());
        la.LoadV(ba, h, slot, va.data());
        lb.LoadV(bb, h, slot, vb.data());
        for (int32_t d = 0; d < s.head_dim; ++d) {
          worst =
              std::max({worst, std::fabs(double{ka[d]} - kb[d]), std::fabs(double{va[d]} - vb[d])});
        }
      }
    }
  }
  return worst;
}

absl::StatusOr<Result> BenchDtype(const kv::SequenceKv& src, kv::SequenceKv* dest,
                                  v1::KvDtype dtype, int runs) {
  const kv::KvShape& shape = src.pool()->shape();
  const int32_t n_tokens = src.n_tokens();
  const double cache_bytes = static_cast<double>(shape.bytes_per_token()) * n_tokens;
  Result r;
  r.cache = model::KvCacheDtypeName(shape.dtype);
  r.dtype = dtype == v1::KV_DTYPE_F32 ? "f32" : dtype == v1::KV_DTYPE_BF16 ? "bf16" : "int8";
  r.wire_bytes_per_token = kv::WireBytesPerToken(shape, dtype);
  r.cache_bytes_per_token = shape.bytes_per_token();

  std::vector<int32_t> token_ids(n_tokens, 0);
  const v1::KvHeader header = kv::MakeKvHeader(kFingerprint, shape, dtype, token_ids);
  // Encode as a sender does: layer by layer, each layer's chunks sent (here: dropped) before
  // the next layer is encoded, so the allocator reuses the memory of the previous messages.
  std::vector<v1::KvChunk> chunks;
  double best = std::numeric_limits<double>::infinity();
  for (int run = 0; run < runs; ++run) {
    const double t0 = Now();
    for (int32_t layer = 0; layer < shape.n_layers; ++layer) {
      chunks.clear();
      absl::Status s =
          kv::EncodeLayer(src, layer, 0, n_tokens, dtype, kv::kDefaultMaxChunkBytes, &chunks);
      if (!s.ok()) return s;
    }
    best = std::min(best, Now() - t0);
  }
  r.encode_gb_s = cache_bytes / best / 1e9;

  // The whole stream, kept for the decode runs.
  chunks.clear();
  for (int32_t layer = 0; layer < shape.n_layers; ++layer) {
    absl::Status s =
        kv::EncodeLayer(src, layer, 0, n_tokens, dtype, kv::kDefaultMaxChunkBytes, &chunks);
    if (!s.ok()) return s;
  }
  int64_t payload = 0;
  for (const v1::KvChunk& c : chunks) {
    payload += static_cast<int64_t>(c.k().size() + c.v().size() + c.k_scales().size() +
                                    c.v_scales().size());
    r.max_chunk_bytes = std::max(r.max_chunk_bytes, c.ByteSizeLong());
  }
  r.chunks = chunks.size();
  if (payload != r.wire_bytes_per_token * n_tokens) {
    return absl::InternalError(absl::StrCat("wire payload ", payload,
                                            " bytes != ", r.wire_bytes_per_token, " x ", n_tokens));
  }

  best = std::numeric_limits<double>::infinity();
  for (int run = 0; run < runs; ++run) {
    kv::KvStreamDecoder decoder(kv::KvExpectation{kFingerprint, shape, n_tokens});
    const double t0 = Now();
    absl::Status s = decoder.OnHeader(header, dest);
    for (size_t i = 0; s.ok() && i < chunks.size(); ++i) s = decoder.OnChunk(chunks[i]);
    if (s.ok()) s = decoder.Finish();
    best = std::min(best, Now() - t0);
    if (!s.ok()) return s;
  }
  r.decode_gb_s = cache_bytes / best / 1e9;
  r.max_abs_error = MaxAbsError(src, *dest, n_tokens);
  return r;
}

}  // namespace

int BenchCodecMain(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, {"json", "tokens", "runs"}, {"cold-malloc"});
  if (!args.ok()) {
    std::fprintf(stderr, "duet bench-codec: %s\n", std::string(args.status().message()).c_str());
    return 2;
  }
  const auto tokens = args->GetInt("tokens", 512);
  const auto runs = args->GetInt("runs", 10);
  if (!tokens.ok() || *tokens <= 0 || *tokens > (1 << 20) || !runs.ok() || *runs <= 0) {
    std::fprintf(stderr, "duet bench-codec: --tokens and --runs must be positive integers\n");
    return 2;
  }
  const int32_t n_tokens = static_cast<int32_t>(*tokens);
  // The servers keep freed memory (duet::KeepFreedMemory: no fresh pages, hence no page faults,
  // per message); --cold-malloc measures with glibc's defaults.
  const bool cold_malloc = args->Has("cold-malloc");
  if (!cold_malloc) KeepFreedMemory();

  // GPT-2-124M: 12 layers, 12 heads of 64 (no grouped-query attention). Both cache element
  // types: f16 (what the servers keep in bf16 precision) and f32.
  std::printf(
      "duet bench-codec: GPT-2-124M K/V (12 layers, 12 kv heads, head_dim 64), %d tokens, "
      "block size 16; 1 thread; GB/s = bytes of the cache's K/V / s, best of %d runs; encode "
      "drops each layer's chunks before the next layer, as a sender does; malloc %s\n\n",
      n_tokens, static_cast<int>(*runs),
      cold_malloc ? "glibc defaults (--cold-malloc)"
                  : "keeps freed memory (mmap/trim 256/512 MiB)");
  std::printf("%-6s %-6s %12s %12s %14s %7s %16s %12s\n", "cache", "wire", "encode GB/s",
              "decode GB/s", "wire B/token", "chunks", "max chunk bytes", "max |error|");
  std::vector<Result> results;
  kv::KvShape shape{12, 12, 64, 16};
  for (kernels::KvDtype cache :
       {kernels::KvDtype::kF16, kernels::KvDtype::kF32, kernels::KvDtype::kI8}) {
    shape.dtype = cache;
    const int32_t n_blocks = (n_tokens + shape.block_size - 1) / shape.block_size;
    auto src_pool = kv::BlockPool::Create(shape, n_blocks);
    auto dest_pool = kv::BlockPool::Create(shape, n_blocks);
    if (!src_pool.ok() || !dest_pool.ok()) {
      std::fprintf(stderr, "duet bench-codec: %s\n", src_pool.status().ToString().c_str());
      return 1;
    }
    kv::SequenceKv src(src_pool->get()), dest(dest_pool->get());
    if (!src.Reserve(n_tokens).ok() || !dest.Reserve(n_tokens).ok()) return 1;
    {
      // K/V-like values: normal, unit scale. Every element of the pool, slots past n_tokens too.
      std::mt19937 rng(42);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      const auto l = (*src_pool)->Layout(0);
      const int64_t n = shape.elements_per_block() * n_blocks;  // the whole pool, every layer
      if (cache == kernels::KvDtype::kF32) {
        for (int64_t i = 0; i < n; ++i) static_cast<float*>(l.base)[i] = normal(rng);
      } else if (cache == kernels::KvDtype::kF16) {
        for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(l.base)[i] = F32ToF16Sat(normal(rng));
      } else {  // int8: through the layout, which quantizes each row with its own scale
        std::vector<float> row(shape.head_dim);
        for (int32_t layer = 0; layer < shape.n_layers; ++layer) {
          const auto ll = (*src_pool)->Layout(layer);
          for (int32_t b = 0; b < n_blocks; ++b)
            for (int32_t h = 0; h < shape.n_kv_heads; ++h)
              for (int32_t slot = 0; slot < shape.block_size; ++slot) {
                for (auto& x : row) x = normal(rng);
                ll.StoreK(b, h, slot, row.data());
                for (auto& x : row) x = normal(rng);
                ll.StoreV(b, h, slot, row.data());
              }
        }
      }
    }
    src.set_n_tokens(n_tokens);
    for (v1::KvDtype dtype : {v1::KV_DTYPE_F32, v1::KV_DTYPE_BF16, v1::KV_DTYPE_INT8}) {
      auto r = BenchDtype(src, &dest, dtype, static_cast<int>(*runs));
      if (!r.ok()) {
        std::fprintf(stderr, "duet bench-codec: %s\n", r.status().ToString().c_str());
        return 1;
      }
      std::printf("%-6s %-6s %12.2f %12.2f %14lld %7zu %16zu %12.3g\n", r->cache.c_str(),
                  r->dtype.c_str(), r->encode_gb_s, r->decode_gb_s,
                  static_cast<long long>(r->wire_bytes_per_token), r->chunks, r->max_chunk_bytes,
                  r->max_abs_error);
      results.push_back(*r);
    }
  }

  if (auto path = args->Get("json")) {
    json out = {{"model_shape", "gpt2-124m"},
                {"n_layers", shape.n_layers},
                {"n_kv_heads", shape.n_kv_heads},
                {"head_dim", shape.head_dim},
                {"block_size", shape.block_size},
                {"n_tokens", n_tokens},
                {"runs", *runs},
                {"threads", 1},
                {"cold_malloc", cold_malloc},
                {"results", json::array()}};
    for (const Result& r : results) {
      out["results"].push_back({{"cache", r.cache},
                                {"dtype", r.dtype},
                                {"encode_gb_s", r.encode_gb_s},
                                {"decode_gb_s", r.decode_gb_s},
                                {"wire_bytes_per_token", r.wire_bytes_per_token},
                                {"cache_bytes_per_token", r.cache_bytes_per_token},
                                {"chunks", r.chunks},
                                {"max_chunk_bytes", r.max_chunk_bytes},
                                {"max_abs_error", r.max_abs_error}});
    }
    std::ofstream f(*path);
    f << out.dump(2) << "\n";
    if (!f) {
      std::fprintf(stderr, "duet bench-codec: cannot write %s\n", path->c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace duet::cli
