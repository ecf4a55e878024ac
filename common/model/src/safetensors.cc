#include "duet/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace duet::model {
namespace fs = std::filesystem;
using nlohmann::json;

int64_t TensorRef::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

WeightFiles::~WeightFiles() {
  for (const auto& m : mappings_) munmap(m.addr, m.size);
}

const TensorRef* WeightFiles::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::Status WeightFiles::AddFile(const fs::path& file) {
  const std::string fname = file.string();
  int fd = ::open(fname.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(fname, ": cannot open: ", strerror(errno)));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::NotFoundError(absl::StrCat(fname, ": cannot stat"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(fname, ": truncated safetensors file (", size, " bytes)"));
  }
  void* addr = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (addr == MAP_FAILED) return absl::InternalError(absl::StrCat(fname, ": mmap failed"));
  mappings_.push_back({addr, size});
  const auto* bytes = static_cast<const uint8_t*>(addr);

  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes, 8);  // little-endian on every platform duet runs on
  if (header_len > size - 8 || header_len > (uint64_t{100} << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(fname, ": truncated safetensors file (header of ",
                                                   header_len, " bytes, file of ", size, ")"));
  }
  json header = json::parse(bytes + 8, bytes + 8 + header_len, nullptr, false);
  if (header.is_discarded() || !header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(fname, ": safetensors header is not JSON"));
  }
  const size_t data_begin = 8 + header_len;
  const size_t data_size = size - data_begin;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const json& t = it.value();
    if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") ||
        !t.contains("data_offsets")) {
      return absl::InvalidArgumentError(
          absl::StrCat(fname, ": tensor \"", it.key(), "\" has a malformed header entry"));
    }
    TensorRef ref;
    const std::string dtype = t["dtype"].is_string() ? t["dtype"].get<std::string>() : "?";
    if (dtype == "F32") {
      ref.dtype = DType::kF32;
    } else if (dtype == "F16") {
      ref.dtype = DType::kF16;
    } else if (dtype == "BF16") {
      ref.dtype = DType::kBF16;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(fname, ": tensor \"", it.key(),
                                                     "\" has unsupported dtype ", dtype,
                                                     " (supported: F32, F16, BF16)"));
    }
    if (!t["shape"].is_array() || !t["data_offsets"].is_array() || t["data_offsets"].size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(fname, ": tensor \"", it.key(), "\" has a malformed shape or offsets"));
    }
    for (const auto& d : t["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(fname, ": tensor \"", it.key(), "\" has a bad dimension"));
      }
      ref.shape.push_back(d.get<int64_t>());
    }
    const auto& off = t["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      return absl::InvalidArgumentError(
          absl::StrCat(fname, ": tensor \"", it.key(), "\" has bad data_offsets"));
    }
    const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    const uint64_t expect = static_cast<uint64_t>(ref.numel()) * DTypeSize(ref.dtype);
    if (e < b || e - b != expect) {
      return absl::InvalidArgumentError(absl::StrCat(fname, ": tensor \"", it.key(), "\" holds ",
                                                     e - b, " bytes but its shape needs ", expect));
    }
    if (e > data_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(fname, ": truncated safetensors file: tensor \"", it.key(), "\" ends at byte ",
                       data_begin + e, " of a ", size, "-byte file"));
    }
    ref.data = bytes + data_begin + b;
    ref.bytes = e - b;
    if (!tensors_.emplace(it.key(), std::move(ref)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(fname, ": tensor \"", it.key(), "\" appears in more than one file"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<WeightFiles>> WeightFiles::Open(const fs::path& dir) {
  auto files = std::unique_ptr<WeightFiles>(new WeightFiles());
  const fs::path single = dir / "model.safetensors";
  const fs::path index = dir / "model.safetensors.index.json";
  std::error_code ec;
  if (fs::exists(single, ec)) {
    if (auto s = files->AddFile(single); !s.ok()) return s;
    return files;
  }
  if (!fs::exists(index, ec)) {
    return absl::NotFoundError(absl::StrCat(dir.string(),
                                            ": no model.safetensors or "
                                            "model.safetensors.index.json"));
  }
  std::ifstream in(index);
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") ||
      !j["weight_map"].is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index.string(), ": not a safetensors index (no weight_map)"));
  }
  std::set<std::string> shards;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(index.string(), ": bad entry for ", it.key()));
    }
    const std::string shard = it.value().get<std::string>();
    if (shard.find('/') != std::string::npos || shard.find("..") != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(index.string(), ": bad shard name ", shard));
    }
    shards.insert(shard);
  }
  for (const auto& shard : shards) {
    if (auto s = files->AddFile(dir / shard); !s.ok()) return s;
  }
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (files->Find(it.key()) == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(index.string(), ": tensor \"", it.key(),
                                                     "\" is not in ", it.value().get<std::string>()));
    }
  }
  return files;
}

}  // namespace duet::model
