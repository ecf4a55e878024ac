// duet-prefill's configuration: command-line flags, each with an environment-variable twin
// (the flag wins). Validated as a whole before anything starts.
//
//   --model DIR            DUET_MODEL            required; a model directory
//   --listen HOST:PORT     DUET_LISTEN           127.0.0.1:50052; port 0 picks a free port
//   --threads N            DUET_THREADS          kernel threads; 0 = all cores
//   --max-queue N          DUET_MAX_QUEUE        16 requests may wait
//   --max-batch N          DUET_MAX_BATCH        16 waiting prompts share one forward pass
//   --precision bf16|f32   DUET_PRECISION        bf16
//   --model-name NAME      DUET_MODEL_NAME       the model directory's name
//   --block-size N         DUET_BLOCK_SIZE       16 tokens per K/V block
//   --max-chunk-bytes N    DUET_MAX_CHUNK_BYTES  1 MiB of k+v per chunk message (<= 3 MiB)
//   --max-context N        DUET_MAX_CONTEXT      the model's; caps the prompt and the K/V pool
//   --metrics-listen H:P   DUET_METRICS_LISTEN   127.0.0.1:9402; /metrics over HTTP; off = none
//   --drain-s N            DUET_DRAIN_S          20; SIGTERM grace for running streams
#pragma once

#include <chrono>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "duet/prefill/server.h"

namespace duet::prefill {

struct PrefillFlags {
  ServerOptions server;
  bool help = false;  // --help / -h: print Usage() and exit 0
  std::chrono::seconds drain{20};  // --drain-s: SIGTERM grace for running streams
};

// Reads environment variables through `getenv` (std::getenv in main; a fake in tests).
using GetEnv = std::function<const char*(const char* name)>;

// INVALID_ARGUMENT with a one-line message naming the flag (or variable) and its value.
absl::StatusOr<PrefillFlags> ParseFlags(int argc, const char* const* argv, const GetEnv& getenv);

std::string Usage();

}  // namespace duet::prefill
