// Read-only, mmap'd safetensors checkpoints: one file, or shards listed in
// model.safetensors.index.json. Tensors are views into the mapping; nothing is copied.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "duet/tensor/dtype.h"

namespace duet::model {

struct TensorRef {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // valid while the owning WeightFiles lives
  size_t bytes = 0;
  int64_t numel() const;
};

class WeightFiles {
 public:
  // Opens model.safetensors, or the shards of model.safetensors.index.json, in dir.
  // Errors name the file and problem: NOT_FOUND (missing file), INVALID_ARGUMENT (bad header,
  // truncated file, unsupported dtype, offsets that disagree with the shape, duplicate tensor).
  static absl::StatusOr<std::unique_ptr<WeightFiles>> Open(const std::filesystem::path& dir);
  ~WeightFiles();

  const std::map<std::string, TensorRef>& tensors() const { return tensors_; }
  const TensorRef* Find(const std::string& name) const;

 private:
  struct Mapping {
    void* addr = nullptr;
    size_t size = 0;
  };
  absl::Status AddFile(const std::filesystem::path& file);

  std::vector<Mapping> mappings_;
  std::map<std::string, TensorRef> tensors_;
};

}  // namespace duet::model
