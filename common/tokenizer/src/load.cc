// Building a TokenizerImpl from tokenizer.json (+ tokenizer_config.json) or GPT-2's files.
#include <algorithm>
#include <limits>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "str_util.h"
#include "tokenizer_impl.h"

namespace duet::tokenizer::internal {
namespace {

using json = nlohmann::json;

// Ids beyond this are rejected as corrupt (no real vocabulary comes near).
constexpr int64_t kMaxId = 1 << 24;

absl::Status Invalid(std::string_view what) { return absl::InvalidArgumentError(AsAbsl(what)); }

absl::Status Unsupported(std::string_view component, std::string_view type) {
  return absl::UnimplementedError(
      Cat(component, " type '", type, "' is not supported by duet's tokenizer"));
}

absl::StatusOr<json> ParseJson(std::string_view text, std::string_view what) {
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    return Invalid(Cat(what, " is not valid JSON: ", e.what()));
  }
}

// Field accessors: a missing or null field gives the default; a field of the wrong type throws
// json::type_error, which the builders turn into INVALID_ARGUMENT.
std::string GetString(const json& obj, const char* key, std::string fallback = "") {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  return it->get<std::string>();
}

bool GetBool(const json& obj, const char* key, bool fallback) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  return it->get<bool>();
}

int64_t GetInt(const json& obj, const char* key, int64_t fallback) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  return it->get<int64_t>();
}

absl::StatusOr<int32_t> CheckId(int64_t id, std::string_view what) {
  if (id < 0 || id >= kMaxId) return Invalid(Cat(what, " has id ", id, " out of range"));
  return static_cast<int32_t>(id);
}

// A pattern object {"String": "..."} or {"Regex": "..."}: literal text or a compiled regex.
absl::Status ParsePattern(const json& pattern, std::string& literal,
                          std::shared_ptr<const Regex>& regex) {
  if (pattern.contains("String")) {
    literal = pattern.at("String").get<std::string>();
    return absl::OkStatus();
  }
  if (pattern.contains("Regex")) {
    auto compiled = Regex::Compile(pattern.at("Regex").get<std::string>());
    if (!compiled.ok()) return compiled.status();
    regex = *std::move(compiled);
    return absl::OkStatus();
  }
  return Invalid(Cat("pattern ", pattern.dump(), " is neither String nor Regex"));
}

absl::Status ParseNormalizer(const json& n, std::vector<NormalizerStep>& steps) {
  const std::string type = GetString(n, "type");
  NormalizerStep step;
  if (type == "Sequence") {
    for (const json& child : n.at("normalizers")) {
      if (absl::Status s = ParseNormalizer(child, steps); !s.ok()) return s;
    }
    return absl::OkStatus();
  } else if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    step.kind = NormalizerStep::Kind::kUnicode;
    step.form = type == "NFC"    ? NormalForm::kNfc
                : type == "NFD"  ? NormalForm::kNfd
                : type == "NFKC" ? NormalForm::kNfkc
                                 : NormalForm::kNfkd;
  } else if (type == "Lowercase") {
    step.kind = NormalizerStep::Kind::kLowercase;
  } else if (type == "Prepend") {
    step.kind = NormalizerStep::Kind::kPrepend;
    step.text = GetString(n, "prepend");
  } else if (type == "Replace") {
    step.kind = NormalizerStep::Kind::kReplace;
    if (absl::Status s = ParsePattern(n.at("pattern"), step.text, step.regex); !s.ok()) return s;
    step.content = GetString(n, "content");
  } else if (type == "Strip") {
    step.kind = NormalizerStep::Kind::kStrip;
    step.strip_left = GetBool(n, "strip_left", true);
    step.strip_right = GetBool(n, "strip_right", true);
  } else {
    return Unsupported("normalizer", type);
  }
  steps.push_back(std::move(step));
  return absl::OkStatus();
}

absl::StatusOr<PrependScheme> ParsePrependScheme(const json& obj) {
  // Newer files say prepend_scheme; older ones say add_prefix_space.
  if (obj.contains("prepend_scheme") && !obj.at("prepend_scheme").is_null()) {
    const std::string scheme = obj.at("prepend_scheme").get<std::string>();
    if (scheme == "always") return PrependScheme::kAlways;
    if (scheme == "first") return PrependScheme::kFirst;
    if (scheme == "never") return PrependScheme::kNever;
    return Invalid(Cat("unknown Metaspace prepend_scheme '", scheme, "'"));
  }
  return GetBool(obj, "add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
}

absl::Status ParsePreTokenizer(const json& p, std::vector<PreTokenizerStep>& steps) {
  const std::string type = GetString(p, "type");
  PreTokenizerStep step;
  if (type == "Sequence") {
    for (const json& child : p.at("pretokenizers")) {
      if (absl::Status s = ParsePreTokenizer(child, steps); !s.ok()) return s;
    }
    return absl::OkStatus();
  } else if (type == "Split") {
    step.kind = PreTokenizerStep::Kind::kSplit;
    if (absl::Status s = ParsePattern(p.at("pattern"), step.literal, step.regex); !s.ok()) return s;
    const std::string behavior = GetString(p, "behavior", "Isolated");
    if (behavior == "Removed") {
      step.behavior = SplitBehavior::kRemoved;
    } else if (behavior == "Isolated") {
      step.behavior = SplitBehavior::kIsolated;
    } else if (behavior == "MergedWithPrevious") {
      step.behavior = SplitBehavior::kMergedWithPrevious;
    } else if (behavior == "MergedWithNext") {
      step.behavior = SplitBehavior::kMergedWithNext;
    } else if (behavior == "Contiguous") {
      step.behavior = SplitBehavior::kContiguous;
    } else {
      return Invalid(Cat("unknown Split behavior '", behavior, "'"));
    }
    step.invert = GetBool(p, "invert", false);
  } else if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::Kind::kByteLevel;
    step.add_prefix_space = GetBool(p, "add_prefix_space", false);
    if (GetBool(p, "use_regex", true)) {
      auto regex = Regex::Compile(kGpt2Pattern);
      if (!regex.ok()) return regex.status();
      step.regex = *std::move(regex);
    }
  } else if (type == "Metaspace") {
    step.kind = PreTokenizerStep::Kind::kMetaspace;
    step.replacement = GetString(p, "replacement", "\xE2\x96\x81");
    auto scheme = ParsePrependScheme(p);
    if (!scheme.ok()) return scheme.status();
    step.prepend_scheme = *scheme;
    step.split = GetBool(p, "split", true);
  } else if (type == "Digits") {
    step.kind = PreTokenizerStep::Kind::kDigits;
    step.individual_digits = GetBool(p, "individual_digits", false);
  } else {
    return Unsupported("pre_tokenizer", type);
  }
  steps.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status ParseDecoder(const json& d, std::vector<DecoderStep>& steps) {
  const std::string type = GetString(d, "type");
  DecoderStep step;
  if (type == "Sequence") {
    for (const json& child : d.at("decoders")) {
      if (absl::Status s = ParseDecoder(child, steps); !s.ok()) return s;
    }
    return absl::OkStatus();
  } else if (type == "ByteLevel") {
    step.kind = DecoderStep::Kind::kByteLevel;
  } else if (type == "Replace") {
    step.kind = DecoderStep::Kind::kReplace;
    if (absl::Status s = ParsePattern(d.at("pattern"), step.pattern, step.regex); !s.ok()) return s;
    step.content = GetString(d, "content");
  } else if (type == "ByteFallback") {
    step.kind = DecoderStep::Kind::kByteFallback;
  } else if (type == "Fuse") {
    step.kind = DecoderStep::Kind::kFuse;
  } else if (type == "Strip") {
    step.kind = DecoderStep::Kind::kStrip;
    step.content = GetString(d, "content", " ");
    step.start = static_cast<int32_t>(std::clamp<int64_t>(GetInt(d, "start", 0), 0, 1 << 20));
    step.stop = static_cast<int32_t>(std::clamp<int64_t>(GetInt(d, "stop", 0), 0, 1 << 20));
  } else if (type == "Metaspace") {
    step.kind = DecoderStep::Kind::kMetaspace;
    step.content = GetString(d, "replacement", "\xE2\x96\x81");
    auto scheme = ParsePrependScheme(d);
    if (!scheme.ok()) return scheme.status();
    step.prefix_space = *scheme != PrependScheme::kNever;
  } else {
    return Unsupported("decoder", type);
  }
  steps.push_back(std::move(step));
  return absl::OkStatus();
}

// Resolves a token name (added tokens first, then the model vocabulary).
std::optional<int32_t> Lookup(const TokenizerImpl& impl, std::string_view token) {
  if (const auto it = impl.added_by_content.find(AsAbsl(token));
      it != impl.added_by_content.end()) {
    return it->second;
  }
  if (const auto it = impl.model.vocab().find(AsAbsl(token)); it != impl.model.vocab().end()) {
    return it->second;
  }
  return std::nullopt;
}

absl::Status ParsePostProcessor(const json& p, TokenizerImpl& impl) {
  const std::string type = GetString(p, "type");
  if (type == "Sequence") {
    for (const json& child : p.at("processors")) {
      if (absl::Status s = ParsePostProcessor(child, impl); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  if (type == "ByteLevel") return absl::OkStatus();  // offsets only; ids unchanged
  if (type == "TemplateProcessing") {
    const json& special = p.contains("special_tokens") ? p.at("special_tokens") : json::object();
    impl.single_template.clear();
    for (const json& item : p.at("single")) {
      TemplateItem t;
      if (item.contains("Sequence")) {
        t.is_sequence = true;
      } else if (item.contains("SpecialToken")) {
        const std::string name = item.at("SpecialToken").at("id").get<std::string>();
        if (!special.contains(name)) {
          return Invalid(
              Cat("TemplateProcessing uses '", name, "' which is not in its special_tokens"));
        }
        for (const json& id : special.at(name).at("ids")) {
          auto checked = CheckId(id.get<int64_t>(), name);
          if (!checked.ok()) return checked.status();
          t.ids.push_back(*checked);
        }
      } else {
        return Invalid(Cat("TemplateProcessing item ", item.dump(), " is not understood"));
      }
      impl.single_template.push_back(std::move(t));
    }
    return absl::OkStatus();
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    // "cls": [token, id], "sep": [token, id]: the single template is [cls] A [sep].
    auto cls = CheckId(p.at("cls").at(1).get<int64_t>(), "cls");
    auto sep = CheckId(p.at("sep").at(1).get<int64_t>(), "sep");
    if (!cls.ok()) return cls.status();
    if (!sep.ok()) return sep.status();
    impl.single_template = {TemplateItem{false, {*cls}}, TemplateItem{true, {}},
                            TemplateItem{false, {*sep}}};
    return absl::OkStatus();
  }
  return Unsupported("post_processor", type);
}

// Fills entries, the added-token matchers and derived tables once vocab and added tokens are known.
absl::Status Finish(TokenizerImpl& impl, const std::vector<DecoderStep>& decoder_steps,
                    bool has_decoder) {
  int64_t max_id = -1;
  for (const auto& [token, id] : impl.model.vocab()) max_id = std::max<int64_t>(max_id, id);
  for (const AddedToken& t : impl.added_tokens) max_id = std::max<int64_t>(max_id, t.id);
  if (max_id < 0) return Invalid("the vocabulary is empty");
  impl.entries.assign(static_cast<size_t>(max_id + 1), TokenEntry{});
  for (const auto& [token, id] : impl.model.vocab()) {
    TokenEntry& e = impl.entries[id];
    if (e.valid) continue;  // two strings for one id: keep the first seen
    e.token = token;
    e.decoded = DecodeTokenPiece(decoder_steps, token, /*is_added=*/false);
    e.valid = true;
  }
  std::vector<const AddedToken*> raw, normalized;
  for (const AddedToken& t : impl.added_tokens) {
    TokenEntry& e = impl.entries[t.id];
    e.token = t.content;
    e.decoded = DecodeTokenPiece(decoder_steps, t.content, /*is_added=*/true);
    e.valid = true;
    e.special = t.special;
    e.added = true;
    impl.added_by_content.try_emplace(t.content, t.id);
    (t.normalized ? normalized : raw).push_back(&t);
  }
  impl.raw_matcher.Build(raw);
  impl.normalized_matcher.Build(normalized);
  impl.decode_rules = MakeDecodeRules(decoder_steps, has_decoder);
  for (const TemplateItem& item : impl.single_template) {
    for (int32_t id : item.ids) {
      if (id >= static_cast<int32_t>(impl.entries.size()) || !impl.entries[id].valid) {
        return Invalid(Cat("post_processor adds id ", id, " which is not in the vocabulary"));
      }
    }
  }
  return absl::OkStatus();
}

// bos/eos: tokenizer_config.json when it names them (a null there means "none"), else guesses.
void ResolveBosEos(TokenizerImpl& impl, const json* config) {
  auto from_config = [&](const char* key, std::optional<int32_t>& out) -> bool {
    if (config == nullptr || !config->contains(key)) return false;
    const json& v = config->at(key);
    if (v.is_string()) {
      out = Lookup(impl, v.get<std::string>());
    } else if (v.is_object() && v.contains("content") && v.at("content").is_string()) {
      out = Lookup(impl, v.at("content").get<std::string>());
    }
    return true;
  };
  if (!from_config("bos_token", impl.bos_id)) {
    if (!impl.single_template.empty() && !impl.single_template.front().is_sequence &&
        impl.single_template.front().ids.size() == 1) {
      impl.bos_id = impl.single_template.front().ids[0];
    } else {
      for (const char* name : {"<|begin_of_text|>", "<s>"}) {
        if ((impl.bos_id = Lookup(impl, name))) break;
      }
    }
  }
  if (!from_config("eos_token", impl.eos_id)) {
    for (const char* name : {"<|end_of_text|>", "</s>", "<|endoftext|>"}) {
      if ((impl.eos_id = Lookup(impl, name))) break;
    }
  }
}

absl::StatusOr<std::unique_ptr<TokenizerImpl>> BuildFromJsonUnchecked(const json& root,
                                                                      const json* config) {
  auto impl = std::make_unique<TokenizerImpl>();
  if (!root.is_object()) return Invalid("tokenizer.json: the top level is not an object");
  if (!root.contains("model") || !root.at("model").is_object()) {
    return Invalid("tokenizer.json: no \"model\" object");
  }

  // Model.
  const json& model = root.at("model");
  std::string model_type = GetString(model, "type");
  if (model_type.empty() && model.contains("merges")) model_type = "BPE";  // very old files
  if (model_type != "BPE") {
    return absl::UnimplementedError(
        Cat("tokenizer.json: model type '", model_type, "' is not supported (duet supports BPE)"));
  }
  if (!GetString(model, "continuing_subword_prefix").empty()) {
    return absl::UnimplementedError(
        "tokenizer.json: BPE continuing_subword_prefix is not supported");
  }
  absl::flat_hash_map<std::string, int32_t> vocab;
  const json& vocab_json = model.at("vocab");
  if (!vocab_json.is_object()) return Invalid("tokenizer.json: model.vocab is not an object");
  vocab.reserve(vocab_json.size());
  for (const auto& [token, id] : vocab_json.items()) {
    auto checked = CheckId(id.get<int64_t>(), Cat("vocab token '", token, "'"));
    if (!checked.ok()) return checked.status();
    vocab.try_emplace(token, *checked);
  }
  std::vector<std::pair<std::string, std::string>> merges;
  const json& merges_json = model.contains("merges") ? model.at("merges") : json::array();
  merges.reserve(merges_json.size());
  for (const json& m : merges_json) {
    if (m.is_array() && m.size() == 2) {  // tokenizers >= 0.20: ["a", "b"]
      merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else if (m.is_string()) {  // older: "a b"
      const std::string& s = m.get_ref<const std::string&>();
      const size_t space = s.find(' ');
      if (space == std::string::npos) {
        return Invalid(Cat("tokenizer.json: merge '", s, "' has no space"));
      }
      merges.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else {
      return Invalid(Cat("tokenizer.json: merge ", m.dump(), " is not understood"));
    }
  }
  BpeOptions options;
  if (model.contains("unk_token") && model.at("unk_token").is_string()) {
    options.unk_token = model.at("unk_token").get<std::string>();
  }
  options.fuse_unk = GetBool(model, "fuse_unk", false);
  options.byte_fallback = GetBool(model, "byte_fallback", false);
  options.ignore_merges = GetBool(model, "ignore_merges", false);
  options.end_of_word_suffix = GetString(model, "end_of_word_suffix");
  if (absl::Status s = impl->model.Init(std::move(vocab), merges, std::move(options)); !s.ok()) {
    return Invalid(Cat("tokenizer.json: ", s.message()));
  }

  // Added tokens.
  if (root.contains("added_tokens") && !root.at("added_tokens").is_null()) {
    for (const json& t : root.at("added_tokens")) {
      AddedToken token;
      auto id = CheckId(t.at("id").get<int64_t>(), "added token");
      if (!id.ok()) return id.status();
      token.id = *id;
      token.content = t.at("content").get<std::string>();
      token.special = GetBool(t, "special", false);
      token.lstrip = GetBool(t, "lstrip", false);
      token.rstrip = GetBool(t, "rstrip", false);
      token.single_word = GetBool(t, "single_word", false);
      token.normalized = GetBool(t, "normalized", !token.special);
      impl->added_tokens.push_back(std::move(token));
    }
  }

  // Pipeline stages.
  auto stage = [&](const char* key) -> const json* {
    const auto it = root.find(key);
    return it == root.end() || it->is_null() ? nullptr : &*it;
  };
  if (const json* n = stage("normalizer")) {
    if (absl::Status s = ParseNormalizer(*n, impl->normalizers); !s.ok()) return s;
  }
  if (const json* p = stage("pre_tokenizer")) {
    if (absl::Status s = ParsePreTokenizer(*p, impl->pre_tokenizers); !s.ok()) return s;
  }
  if (const json* p = stage("post_processor")) {
    if (absl::Status s = ParsePostProcessor(*p, *impl); !s.ok()) return s;
  }
  std::vector<DecoderStep> decoder_steps;
  const json* decoder = stage("decoder");
  if (decoder != nullptr) {
    if (absl::Status s = ParseDecoder(*decoder, decoder_steps); !s.ok()) return s;
  }
  if (absl::Status s = Finish(*impl, decoder_steps, decoder != nullptr); !s.ok()) return s;
  ResolveBosEos(*impl, config);
  return impl;
}

// Prefixes a status message with where it came from.
absl::Status Prefixed(const absl::Status& s, std::string_view where) {
  if (AsStd(s.message()).starts_with(where)) return s;
  return absl::Status(s.code(), Cat(where, ": ", s.message()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<TokenizerImpl>> BuildFromTokenizerJson(
    std::string_view tokenizer_json, std::string_view tokenizer_config_json) {
  auto root = ParseJson(tokenizer_json, "tokenizer.json");
  if (!root.ok()) return root.status();
  std::optional<json> config;
  if (!tokenizer_config_json.empty()) {
    auto parsed = ParseJson(tokenizer_config_json, "tokenizer_config.json");
    if (!parsed.ok()) return parsed.status();
    if (!parsed->is_object())
      return Invalid("tokenizer_config.json: the top level is not an object");
    config = *std::move(parsed);
  }
  try {
    auto impl = BuildFromJsonUnchecked(*root, config ? &*config : nullptr);
    if (!impl.ok()) return Prefixed(impl.status(), "tokenizer.json");
    return impl;
  } catch (const json::exception& e) {
    return Invalid(Cat("tokenizer.json: unexpected structure: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<TokenizerImpl>> BuildFromGpt2Files(std::string_view vocab_json,
                                                                  std::string_view merges_txt) {
  auto root = ParseJson(vocab_json, "vocab.json");
  if (!root.ok()) return root.status();
  if (!root->is_object()) return Invalid("vocab.json: the top level is not an object");
  auto impl = std::make_unique<TokenizerImpl>();
  absl::flat_hash_map<std::string, int32_t> vocab;
  vocab.reserve(root->size());
  try {
    for (const auto& [token, id] : root->items()) {
      auto checked = CheckId(id.get<int64_t>(), Cat("vocab.json token '", token, "'"));
      if (!checked.ok()) return checked.status();
      vocab.try_emplace(token, *checked);
    }
  } catch (const json::exception& e) {
    return Invalid(Cat("vocab.json: ids must be integers: ", e.what()));
  }
  std::vector<std::pair<std::string, std::string>> merges;
  int line_number = 0;
  for (size_t pos = 0; pos < merges_txt.size();) {
    size_t eol = merges_txt.find('\n', pos);
    if (eol == std::string_view::npos) eol = merges_txt.size();
    std::string_view line = merges_txt.substr(pos, eol - pos);
    pos = eol + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || (line_number == 1 && line.starts_with("#version"))) continue;
    const size_t space = line.find(' ');
    if (space == std::string_view::npos || line.find(' ', space + 1) != std::string_view::npos) {
      return Invalid(
          Cat("merges.txt line ", line_number, ": expected two tokens separated by one space"));
    }
    merges.emplace_back(std::string(line.substr(0, space)), std::string(line.substr(space + 1)));
  }
  if (absl::Status s = impl->model.Init(std::move(vocab), merges, {}); !s.ok()) {
    return Invalid(Cat("merges.txt: ", s.message()));
  }
  // GPT-2's one special token, when the vocabulary has it.
  constexpr std::string_view kEndOfText = "<|endoftext|>";
  if (const auto it = impl->model.vocab().find(AsAbsl(kEndOfText));
      it != impl->model.vocab().end()) {
    AddedToken t;
    t.id = it->second;
    t.content = std::string(kEndOfText);
    t.special = true;
    impl->added_tokens.push_back(std::move(t));
    impl->bos_id = it->second;
    impl->eos_id = it->second;
  }
  PreTokenizerStep byte_level;
  byte_level.kind = PreTokenizerStep::Kind::kByteLevel;
  auto regex = Regex::Compile(kGpt2Pattern);
  if (!regex.ok()) return regex.status();
  byte_level.regex = *std::move(regex);
  impl->pre_tokenizers.push_back(std::move(byte_level));
  DecoderStep decoder;
  decoder.kind = DecoderStep::Kind::kByteLevel;
  if (absl::Status s = Finish(*impl, {decoder}, true); !s.ok()) return Prefixed(s, "vocab.json");
  return impl;
}

}  // namespace duet::tokenizer::internal
