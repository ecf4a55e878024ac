#include "duet/kv/codec.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <system_error>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "kv_pack.h"

namespace duet::kv {
namespace {

static_assert(std::endian::native == std::endian::little, "the K/V wire format is little-endian");

using internal::KvPart;
using internal::WireType;

constexpr char kFileMagic[] = "DUETKV1\n";  // 8 bytes, no terminator on disk
constexpr size_t kFileMagicSize = sizeof(kFileMagic) - 1;
// No message of ours comes near this; a longer length prefix is corruption.
constexpr uint64_t kMaxFileMessageBytes = uint64_t{1} << 30;

// The sender's reading of a dtype: unspecified means bf16 (the proto's default).
v1::KvDtype SendDtype(v1::KvDtype dtype) {
  return dtype == v1::KV_DTYPE_UNSPECIFIED ? v1::KV_DTYPE_BF16 : dtype;
}

std::optional<WireType> WireTypeOf(v1::KvDtype dtype) {
  switch (dtype) {
    case v1::KV_DTYPE_F32:
      return WireType::kF32;
    case v1::KV_DTYPE_BF16:
      return WireType::kBF16;
    case v1::KV_DTYPE_INT8:
      return WireType::kInt8;
    default:
      return std::nullopt;
  }
}

std::string DtypeName(v1::KvDtype dtype) {
  const std::string& name = v1::KvDtype_Name(dtype);
  return name.empty() ? absl::StrCat(static_cast<int>(dtype)) : name;
}

// A peer-supplied string, quoted, escaped and cut to a readable length for error messages.
std::string Quote(const std::string& s) {
  constexpr size_t kMax = 64;
  if (s.size() <= kMax) return absl::StrCat("\"", absl::CHexEscape(s), "\"");
  return absl::StrCat("\"", absl::CHexEscape(s.substr(0, kMax)), "...\"");
}

std::string Range(uint32_t begin, uint32_t end) { return absl::StrCat("[", begin, ",", end, ")"); }

// Everything about a header that needs no destination.
absl::Status CheckHeader(const KvExpectation& expect, const v1::KvHeader& h) {
  if (h.format_version() != kKvFormatVersion) {
    return absl::DataLossError(absl::StrCat("K/V format version ", h.format_version(),
                                            " is unknown (this build reads ", kKvFormatVersion,
                                            ")"));
  }
  if (h.model_fingerprint() != expect.model_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat("model fingerprint ",
                                                      Quote(h.model_fingerprint()), " != expected ",
                                                      Quote(expect.model_fingerprint)));
  }
  const KvShape& s = expect.shape;
  if (h.n_layers() != static_cast<uint32_t>(s.n_layers) ||
      h.n_kv_heads() != static_cast<uint32_t>(s.n_kv_heads) ||
      h.head_dim() != static_cast<uint32_t>(s.head_dim)) {
    return absl::FailedPreconditionError(
        absl::StrCat("K/V shape n_layers=", h.n_layers(), " n_kv_heads=", h.n_kv_heads(),
                     " head_dim=", h.head_dim(), " != expected n_layers=", s.n_layers,
                     " n_kv_heads=", s.n_kv_heads, " head_dim=", s.head_dim));
  }
  if (!WireTypeOf(h.dtype())) {
    return absl::DataLossError(absl::StrCat("unknown K/V dtype ", DtypeName(h.dtype())));
  }
  if (h.layout() != v1::KV_LAYOUT_HEAD_TOKEN_DIM) {
    const std::string& name = v1::KvLayout_Name(h.layout());
    return absl::DataLossError(absl::StrCat(
        "unknown K/V layout ", name.empty() ? absl::StrCat(static_cast<int>(h.layout())) : name));
  }
  const uint32_t max_tokens = static_cast<uint32_t>(std::max(expect.max_tokens, 0));
  if (h.n_tokens() == 0 || h.n_tokens() > max_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("K/V n_tokens ", h.n_tokens(), " outside (0, ", max_tokens, "]"));
  }
  if (static_cast<uint32_t>(h.token_ids_size()) != h.n_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("K/V header has ", h.token_ids_size(),
                                                   " token ids for n_tokens ", h.n_tokens()));
  }
  return absl::OkStatus();
}

uint32_t ChunkCrc(const v1::KvChunk& c) {
  uint32_t crc = Crc32c(c.k().data(), c.k().size());
  crc = Crc32c(c.v().data(), c.v().size(), crc);
  crc = Crc32c(c.k_scales().data(), c.k_scales().size(), crc);
  return Crc32c(c.v_scales().data(), c.v_scales().size(), crc);
}

uint8_t* Bytes(std::string* s) { return reinterpret_cast<uint8_t*>(s->data()); }
const uint8_t* Bytes(const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); }
float* Floats(std::string* s) { return reinterpret_cast<float*>(s->data()); }
const float* Floats(const std::string& s) { return reinterpret_cast<const float*>(s.data()); }

absl::Status FileError(const std::string& what, const std::filesystem::path& path, int err) {
  return absl::Status(absl::ErrnoToStatusCode(err),
                      absl::StrCat("cannot ", what, " ", path.string(), ": ", std::strerror(err)));
}

// Appends a varint length and the message to `out`; `buf` is scratch.
void WriteMessage(std::ofstream& out, const google::protobuf::MessageLite& m, std::string* buf) {
  buf->clear();
  m.SerializeToString(buf);
  uint8_t len[10];
  size_t n = 0;
  for (uint64_t v = buf->size();; v >>= 7) {
    len[n++] = static_cast<uint8_t>(v < 0x80 ? v : (v & 0x7f) | 0x80);
    if (v < 0x80) break;
  }
  out.write(reinterpret_cast<const char*>(len), static_cast<std::streamsize>(n));
  out.write(buf->data(), static_cast<std::streamsize>(buf->size()));
}

// Reads length-delimited messages from a K/V file of known size.
class FileReader {
 public:
  FileReader(const std::filesystem::path& path, std::ifstream* in, uint64_t size)
      : path_(path.string()), in_(in), size_(size) {}

  bool AtEnd() const { return pos_ == size_; }
  uint64_t last_start() const { return last_start_; }  // offset of the last message's prefix

  absl::Status ReadMagic() {
    char magic[kFileMagicSize];
    if (size_ < kFileMagicSize || !in_->read(magic, kFileMagicSize) ||
        std::memcmp(magic, kFileMagic, kFileMagicSize) != 0) {
      return absl::DataLossError(absl::StrCat(path_, ": not a duet K/V file (no DUETKV1 magic)"));
    }
    pos_ = kFileMagicSize;
    return absl::OkStatus();
  }

  // The next message's bytes into *buf.
  absl::Status Next(std::string* buf) {
    const uint64_t start = last_start_ = pos_;
    uint64_t len = 0;
    for (int shift = 0;; shift += 7) {
      char c;
      if (pos_ == size_ || !in_->get(c)) return Truncated(start, "in a length prefix");
      ++pos_;
      len |= static_cast<uint64_t>(static_cast<uint8_t>(c) & 0x7f) << shift;
      if ((static_cast<uint8_t>(c) & 0x80) == 0) break;
      if (shift >= 35) return Corrupt(start, "an overlong length prefix");
    }
    if (len > kMaxFileMessageBytes) {
      return Corrupt(start, absl::StrCat("a message length of ", len, " bytes"));
    }
    if (len > size_ - pos_) {
      return Truncated(start, absl::StrCat("in a message of ", len, " bytes"));
    }
    buf->resize(len);
    if (!in_->read(buf->data(), static_cast<std::streamsize>(len))) {
      return Truncated(start, "while reading");
    }
    pos_ += len;
    return absl::OkStatus();
  }

  absl::Status Corrupt(uint64_t at, const std::string& what) const {
    return absl::DataLossError(absl::StrCat(path_, ": ", what, " at offset ", at));
  }
  absl::Status Truncated(uint64_t at, const std::string& what) const {
    return absl::DataLossError(absl::StrCat(path_, ": truncated ", what, " at offset ", at,
                                            " (file has ", size_, " bytes)"));
  }
  // A decoder error, with the file named.
  absl::Status InFile(const absl::Status& s) const {
    return absl::Status(s.code(), absl::StrCat(path_, ": ", s.message()));
  }

 private:
  std::string path_;
  std::ifstream* in_;
  uint64_t size_;
  uint64_t pos_ = 0;
  uint64_t last_start_ = 0;
};

}  // namespace

int64_t WireBytesPerToken(const KvShape& shape, v1::KvDtype dtype) {
  const std::optional<WireType> type = WireTypeOf(SendDtype(dtype));
  if (!type) return 0;
  const int64_t per_layer_half = static_cast<int64_t>(shape.n_kv_heads) * shape.head_dim;
  int64_t bytes = 2 * per_layer_half * static_cast<int64_t>(internal::WireElemSize(*type));
  if (*type == WireType::kInt8) bytes += 2 * int64_t{shape.n_kv_heads} * sizeof(float);
  return bytes * shape.n_layers;
}

v1::KvHeader MakeKvHeader(const std::string& model_fingerprint, const KvShape& shape,
                          v1::KvDtype dtype, std::span<const int32_t> token_ids) {
  v1::KvHeader h;
  h.set_format_version(kKvFormatVersion);
  h.set_model_fingerprint(model_fingerprint);
  h.set_n_layers(static_cast<uint32_t>(shape.n_layers));
  h.set_n_kv_heads(static_cast<uint32_t>(shape.n_kv_heads));
  h.set_head_dim(static_cast<uint32_t>(shape.head_dim));
  h.set_dtype(SendDtype(dtype));
  h.set_layout(v1::KV_LAYOUT_HEAD_TOKEN_DIM);
  h.set_n_tokens(static_cast<uint32_t>(token_ids.size()));
  h.mutable_token_ids()->Add(token_ids.begin(), token_ids.end());
  return h;
}

absl::Status EncodeLayer(const SequenceKv& seq, int32_t layer, int32_t token_begin,
                         int32_t token_end, v1::KvDtype dtype, uint32_t max_chunk_bytes,
                         std::vector<v1::KvChunk>* out) {
  const KvShape& shape = seq.pool()->shape();
  if (layer < 0 || layer >= shape.n_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("K/V encode: layer ", layer, " outside [0,", shape.n_layers, ")"));
  }
  if (token_begin < 0 || token_end <= token_begin || token_end > seq.capacity()) {
    return absl::InvalidArgumentError(
        absl::StrCat("K/V encode: token range [", token_begin, ",", token_end,
                     ") is empty or outside the sequence's capacity ", seq.capacity()));
  }
  const std::optional<WireType> type = WireTypeOf(SendDtype(dtype));
  if (!type) {
    return absl::InvalidArgumentError(absl::StrCat("K/V encode: unknown dtype ", DtypeName(dtype)));
  }

  // Tokens per chunk: as many as fit in max_chunk_bytes of k + v, whole blocks when possible.
  const int64_t token_bytes = 2 * static_cast<int64_t>(shape.n_kv_heads) * shape.head_dim *
                              static_cast<int64_t>(internal::WireElemSize(*type));
  int64_t step = std::max<int64_t>(1, max_chunk_bytes / token_bytes);
  if (step >= shape.block_size) step -= step % shape.block_size;

  const kernels::PagedKvLayout layout = seq.pool()->Layout(layer);
  const int32_t* blocks = seq.blocks().data();
  for (int32_t t0 = token_begin; t0 < token_end;) {
    const int32_t t1 = static_cast<int32_t>(std::min<int64_t>(token_end, t0 + step));
    const size_t n = static_cast<size_t>(t1 - t0);
    const size_t payload = n * static_cast<size_t>(token_bytes) / 2;  // k (or v) bytes
    v1::KvChunk& c = out->emplace_back();
    c.set_layer(static_cast<uint32_t>(layer));
    c.set_token_begin(static_cast<uint32_t>(t0));
    c.set_token_end(static_cast<uint32_t>(t1));
    std::string* k = c.mutable_k();
    std::string* v = c.mutable_v();
    k->resize(payload);
    v->resize(payload);
    float* k_scales = nullptr;
    float* v_scales = nullptr;
    if (*type == WireType::kInt8) {
      const size_t scale_bytes = n * static_cast<size_t>(shape.n_kv_heads) * sizeof(float);
      c.mutable_k_scales()->resize(scale_bytes);
      c.mutable_v_scales()->resize(scale_bytes);
      k_scales = Floats(c.mutable_k_scales());
      v_scales = Floats(c.mutable_v_scales());
    }
    internal::Pack(layout, blocks, t0, t1, KvPart::kK, *type, Bytes(k), k_scales);
    internal::Pack(layout, blocks, t0, t1, KvPart::kV, *type, Bytes(v), v_scales);
    c.set_crc32c(ChunkCrc(c));
    t0 = t1;
  }
  return absl::OkStatus();
}

KvStreamDecoder::KvStreamDecoder(KvExpectation expect) : expect_(std::move(expect)) {}

absl::Status KvStreamDecoder::Fail(absl::Status error) {
  failed_ = true;
  error_ = std::move(error);
  return error_;
}

absl::Status KvStreamDecoder::OnHeader(const v1::KvHeader& header, SequenceKv* dest) {
  if (failed_) return error_;
  if (have_header_) return Fail(absl::DataLossError("K/V stream has a second header"));
  if (absl::Status s = CheckHeader(expect_, header); !s.ok()) return Fail(std::move(s));
  if (dest == nullptr) return Fail(absl::InvalidArgumentError("K/V decode: no destination"));
  const KvShape& ds = dest->pool()->shape();
  if (ds.n_layers != expect_.shape.n_layers || ds.n_kv_heads != expect_.shape.n_kv_heads ||
      ds.head_dim != expect_.shape.head_dim) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        "K/V decode: destination pool n_layers=", ds.n_layers, " n_kv_heads=", ds.n_kv_heads,
        " head_dim=", ds.head_dim, " differs from the expected n_layers=", expect_.shape.n_layers,
        " n_kv_heads=", expect_.shape.n_kv_heads, " head_dim=", expect_.shape.head_dim)));
  }
  if (static_cast<uint32_t>(dest->capacity()) < header.n_tokens()) {
    return Fail(
        absl::InvalidArgumentError(absl::StrCat("K/V decode: destination holds ", dest->capacity(),
                                                " positions, stream has ", header.n_tokens())));
  }
  header_ = header;
  dest_ = dest;
  have_header_ = true;
  layer_ = 0;
  next_token_ = 0;
  return absl::OkStatus();
}

absl::Status KvStreamDecoder::OnChunk(const v1::KvChunk& chunk) {
  if (failed_) return error_;
  if (!have_header_) {
    return Fail(absl::DataLossError(
        absl::StrCat("K/V chunk for layer ", chunk.layer(), " arrived before the header")));
  }
  const uint32_t n_layers = header_.n_layers(), n_tokens = header_.n_tokens();
  const uint32_t layer = chunk.layer(), begin = chunk.token_begin(), end = chunk.token_end();
  const uint32_t expected_layer = static_cast<uint32_t>(layer_);
  const uint32_t expected_token = static_cast<uint32_t>(next_token_);
  if (expected_layer >= n_layers) {
    return Fail(absl::DataLossError(absl::StrCat("K/V chunk for layer ", layer, " tokens ",
                                                 Range(begin, end), " after the last layer (",
                                                 n_layers - 1, ")")));
  }
  if (layer != expected_layer) {
    return Fail(absl::DataLossError(
        absl::StrCat("K/V chunk for layer ", layer, ", expected layer ", expected_layer)));
  }
  if (begin != expected_token) {
    return Fail(absl::DataLossError(absl::StrCat(
        begin > expected_token ? "gap" : "overlap", " in K/V layer ", layer, ": chunk tokens ",
        Range(begin, end), ", expected one starting at token ", expected_token)));
  }
  if (end <= begin || end > n_tokens) {
    return Fail(
        absl::DataLossError(absl::StrCat("K/V chunk for layer ", layer, " has tokens ",
                                         Range(begin, end), ", outside [0,", n_tokens, ")")));
  }
  const WireType type = *WireTypeOf(header_.dtype());
  const uint64_t n = end - begin;
  const uint64_t payload =
      n * header_.n_kv_heads() * header_.head_dim() * internal::WireElemSize(type);
  const uint64_t scale_bytes =
      type == WireType::kInt8 ? n * header_.n_kv_heads() * sizeof(float) : 0;
  const std::pair<const char*, uint64_t> sizes[] = {{"k", chunk.k().size()},
                                                    {"v", chunk.v().size()},
                                                    {"k_scales", chunk.k_scales().size()},
                                                    {"v_scales", chunk.v_scales().size()}};
  for (int i = 0; i < 4; ++i) {
    const uint64_t want = i < 2 ? payload : scale_bytes;
    if (sizes[i].second != want) {
      return Fail(absl::DataLossError(absl::StrCat("K/V chunk for layer ", layer, " tokens ",
                                                   Range(begin, end), ": ", sizes[i].first, " has ",
                                                   sizes[i].second, " bytes, expected ", want, " (",
                                                   DtypeName(header_.dtype()), ")")));
    }
  }
  const uint32_t crc = ChunkCrc(chunk);
  if (crc != chunk.crc32c()) {
    return Fail(absl::DataLossError(absl::StrCat(
        "crc32c 0x", absl::Hex(chunk.crc32c(), absl::kZeroPad8), " != computed 0x",
        absl::Hex(crc, absl::kZeroPad8), " for layer ", layer, " tokens ", Range(begin, end))));
  }

  // Valid: write it. The range lies within n_tokens <= dest capacity (checked in OnHeader).
  const kernels::PagedKvLayout layout = dest_->pool()->Layout(static_cast<int32_t>(layer));
  const int32_t* blocks = dest_->blocks().data();
  const int32_t t0 = static_cast<int32_t>(begin), t1 = static_cast<int32_t>(end);
  const bool int8 = type == WireType::kInt8;
  internal::Unpack(layout, blocks, t0, t1, KvPart::kK, type, Bytes(chunk.k()),
                   int8 ? Floats(chunk.k_scales()) : nullptr);
  internal::Unpack(layout, blocks, t0, t1, KvPart::kV, type, Bytes(chunk.v()),
                   int8 ? Floats(chunk.v_scales()) : nullptr);
  bytes_ += static_cast<int64_t>(2 * payload + 2 * scale_bytes);
  next_token_ = t1;
  if (end == n_tokens) {
    ++layer_;
    next_token_ = 0;
  }
  return absl::OkStatus();
}

absl::Status KvStreamDecoder::Finish() {
  if (failed_) return error_;
  if (!have_header_) return Fail(absl::DataLossError("K/V stream ended before its header"));
  if (static_cast<uint32_t>(layer_) < header_.n_layers()) {
    return Fail(absl::DataLossError(absl::StrCat("K/V stream ended at layer ", layer_, " token ",
                                                 next_token_, " of ", header_.n_layers(),
                                                 " layers x ", header_.n_tokens(), " tokens")));
  }
  dest_->set_n_tokens(static_cast<int32_t>(header_.n_tokens()));
  return absl::OkStatus();
}

absl::Status WriteKvFile(const std::filesystem::path& path, const std::string& model_fingerprint,
                         const SequenceKv& seq, std::span<const int32_t> token_ids,
                         v1::KvDtype dtype) {
  const int32_t n_tokens = seq.n_tokens();
  if (n_tokens <= 0 || token_ids.size() != static_cast<size_t>(n_tokens)) {
    return absl::InvalidArgumentError(absl::StrCat("K/V file ", path.string(), ": sequence has ",
                                                   n_tokens, " positions and ", token_ids.size(),
                                                   " token ids"));
  }
  if (!WireTypeOf(SendDtype(dtype))) {
    return absl::InvalidArgumentError(
        absl::StrCat("K/V file ", path.string(), ": unknown dtype ", DtypeName(dtype)));
  }
  const KvShape& shape = seq.pool()->shape();
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  if (!out) return FileError("create", tmp, errno);

  std::string buf;
  out.write(kFileMagic, kFileMagicSize);
  WriteMessage(out, MakeKvHeader(model_fingerprint, shape, dtype, token_ids), &buf);
  std::vector<v1::KvChunk> chunks;
  for (int32_t layer = 0; layer < shape.n_layers && out; ++layer) {
    chunks.clear();
    if (absl::Status s =
            EncodeLayer(seq, layer, 0, n_tokens, dtype, kDefaultMaxChunkBytes, &chunks);
        !s.ok()) {
      out.close();
      std::filesystem::remove(tmp);
      return s;
    }
    for (const v1::KvChunk& c : chunks) WriteMessage(out, c, &buf);
  }
  out.close();
  if (!out) {
    const int err = errno;
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    return FileError("write", tmp, err);
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    return FileError("rename to", path, ec.value());
  }
  return absl::OkStatus();
}

absl::Status ReadKvFile(const std::filesystem::path& path, const KvExpectation& expect,
                        SequenceKv* dest, std::vector<int32_t>* token_ids) {
  if (dest == nullptr || !dest->blocks().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("K/V file ", path.string(), ": the destination must be an empty lease"));
  }
  std::error_code ec;
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) return FileError("read", path, ec.value());
  std::ifstream in(path, std::ios::binary);
  if (!in) return FileError("open", path, errno);
  FileReader reader(path, &in, size);
  if (absl::Status s = reader.ReadMagic(); !s.ok()) return s;

  std::string buf;
  if (absl::Status s = reader.Next(&buf); !s.ok()) return s;
  v1::KvHeader header;
  if (!header.ParseFromString(buf))
    return reader.Corrupt(reader.last_start(), "an unparsable header");
  // Validate before taking blocks, so a bad file reserves nothing.
  if (absl::Status s = CheckHeader(expect, header); !s.ok()) return reader.InFile(s);
  SequenceKv kv(dest->pool());
  if (absl::Status s = kv.Reserve(static_cast<int32_t>(header.n_tokens())); !s.ok()) {
    return reader.InFile(s);
  }
  KvStreamDecoder decoder(expect);
  if (absl::Status s = decoder.OnHeader(header, &kv); !s.ok()) return reader.InFile(s);
  v1::KvChunk chunk;
  while (!reader.AtEnd()) {
    if (absl::Status s = reader.Next(&buf); !s.ok()) return s;
    if (!chunk.ParseFromString(buf))
      return reader.Corrupt(reader.last_start(), "an unparsable chunk");
    if (absl::Status s = decoder.OnChunk(chunk); !s.ok()) return reader.InFile(s);
  }
  if (absl::Status s = decoder.Finish(); !s.ok()) return reader.InFile(s);
  if (token_ids != nullptr) token_ids->assign(header.token_ids().begin(), header.token_ids().end());
  *dest = std::move(kv);
  return absl::OkStatus();
}

}  // namespace duet::kv
