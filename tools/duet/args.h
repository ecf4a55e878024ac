// Minimal command-line flags: --name value, --name=value, and boolean --name.
#pragma once

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace duet::cli {

class Args {
 public:
  // argv after the subcommand. `bool_flags` take no value. Every flag must be in `known`
  // (plus bool_flags); an unknown flag is an error naming it.
  static absl::StatusOr<Args> Parse(int argc, char** argv, const std::set<std::string>& known,
                                    const std::set<std::string>& bool_flags);

  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::optional<std::string> Get(const std::string& name) const;
  std::vector<std::string> GetAll(const std::string& name) const;
  absl::StatusOr<std::string> Require(const std::string& name) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double fallback) const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t fallback) const;

 private:
  std::map<std::string, std::vector<std::string>> values_;
};

// "1,2,3" -> {1,2,3}; INVALID_ARGUMENT naming the bad element.
absl::StatusOr<std::vector<int32_t>> ParseIdList(const std::string& s);

}  // namespace duet::cli
