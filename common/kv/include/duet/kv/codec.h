// The K/V wire format codec (proto/duet/v1/kv.proto): turns a sequence's cached K/V into
// KvHeader + KvChunk messages and back, validating everything it reads. This is the engine's
// proto<->domain edge for K/V; it uses the generated protobuf types but no gRPC.
//
// Threading: the free functions are thread-safe for distinct outputs; a KvStreamDecoder is used
// by one thread at a time. Reading K/V from a pool while another thread writes the same blocks
// is the caller's race to avoid.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "duet/kv/block_pool.h"
#include "duet/v1/kv.pb.h"

namespace duet::kv {

inline constexpr uint32_t kKvFormatVersion = 1;
inline constexpr uint32_t kDefaultMaxChunkBytes = 1u << 20;  // k + v payload per chunk

// CRC-32C (Castagnoli), as used in KvChunk.crc32c. `crc` chains calls (start with 0).
uint32_t Crc32c(const void* data, size_t n, uint32_t crc = 0);

// Bytes per token of K+V for all layers on the wire (scales included for int8). 0 for an unknown
// dtype. On the sending side KV_DTYPE_UNSPECIFIED means bf16 (the proto's default), here and below.
int64_t WireBytesPerToken(const KvShape& shape, v1::KvDtype dtype);

// The header of a stream carrying K/V of `token_ids` (all of them) from a pool of `shape`.
// dtype KV_DTYPE_UNSPECIFIED is written as KV_DTYPE_BF16.
v1::KvHeader MakeKvHeader(const std::string& model_fingerprint, const KvShape& shape,
                          v1::KvDtype dtype, std::span<const int32_t> token_ids);

// Encodes layer `layer`, positions [token_begin, token_end) of `seq`, as chunks whose k+v
// payload stays under max_chunk_bytes (split by token range; at least one token per chunk).
// Appends to *out. INVALID_ARGUMENT for a bad layer, range or dtype. The range must lie within
// seq.capacity() but need not be counted in seq.n_tokens() yet, so prefill can send layer l while
// layer l+1 computes. Chunks hold whole blocks when max_chunk_bytes allows (faster gathers).
absl::Status EncodeLayer(const SequenceKv& seq, int32_t layer, int32_t token_begin,
                         int32_t token_end, v1::KvDtype dtype, uint32_t max_chunk_bytes,
                         std::vector<v1::KvChunk>* out);

// What the receiver expects of a stream.
struct KvExpectation {
  std::string model_fingerprint;
  KvShape shape;  // n_layers, n_kv_heads, head_dim must match the header (block_size is ours)
  int32_t max_tokens = 0;  // header.n_tokens must be in (0, max_tokens]
};

// Validates a stream message by message and writes K/V into a sequence's blocks.
// Errors (nothing is ever written past the destination's capacity):
//   FAILED_PRECONDITION  fingerprint or shape differs from the expectation
//   DATA_LOSS            unknown version/dtype/layout, chunk out of order or missing, a gap or
//                        overlap in token ranges, payload size that disagrees with the header,
//                        bad checksum, a chunk before the header, Finish before the last layer
//   INVALID_ARGUMENT     header n_tokens outside (0, max_tokens] or token_ids size != n_tokens
// After an error the decoder stays failed; the caller frees the destination's blocks.
class KvStreamDecoder {
 public:
  explicit KvStreamDecoder(KvExpectation expect);

  // `dest` must have capacity for header.n_tokens positions; decoded positions are written at
  // the same positions in dest. dest's n_tokens is set by Finish(). INVALID_ARGUMENT (the
  // caller's error) when dest is null, its pool's shape differs from the expectation or its
  // capacity is short. When OnHeader fails nothing is written to dest.
  absl::Status OnHeader(const v1::KvHeader& header, SequenceKv* dest);
  absl::Status OnChunk(const v1::KvChunk& chunk);
  // Checks that every layer arrived whole; then sets dest->n_tokens to header.n_tokens.
  absl::Status Finish();

  const v1::KvHeader& header() const { return header_; }
  // Payload bytes (k, v and scales) of the chunks accepted so far.
  int64_t bytes_received() const { return bytes_; }

 private:
  // Records the first error; every later call returns it.
  absl::Status Fail(absl::Status error);

  KvExpectation expect_;
  v1::KvHeader header_;
  SequenceKv* dest_ = nullptr;
  bool have_header_ = false;
  bool failed_ = false;
  int32_t layer_ = 0;       // layer expected next
  int32_t next_token_ = 0;  // token expected next within layer_
  int64_t bytes_ = 0;
  absl::Status error_;
};

// Writes a sequence's K/V (positions [0, seq.n_tokens())) to a file in the same format: the
// magic "DUETKV1\n", then the header and the chunks (layer by layer, at most
// kDefaultMaxChunkBytes each), each as a varint byte length followed by the serialized message.
// The file is written to `path`.tmp and renamed, so `path` is never left half-written.
// INVALID_ARGUMENT when token_ids.size() != seq.n_tokens() or the sequence is empty.
//
// ReadKvFile reads one back with the decoder's validation (a truncated file or trailing bytes:
// DATA_LOSS; a missing file: NOT_FOUND). `dest` must hold no blocks: it is given exactly the
// blocks the file needs (RESOURCE_EXHAUSTED when the pool lacks them) and stays empty on any
// failure. On success dest->n_tokens() and *token_ids are the file's.
absl::Status WriteKvFile(const std::filesystem::path& path, const std::string& model_fingerprint,
                         const SequenceKv& seq, std::span<const int32_t> token_ids,
                         v1::KvDtype dtype);
absl::Status ReadKvFile(const std::filesystem::path& path, const KvExpectation& expect,
                        SequenceKv* dest, std::vector<int32_t>* token_ids);

}  // namespace duet::kv
