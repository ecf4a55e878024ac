// `duet bench-codec`: speed of the K/V wire codec (duet/kv/codec.h) on the GPT-2-124M K/V shape
// (12 layers, 12 kv heads, head_dim 64, block size 16), one thread, for each wire dtype:
// encode and decode GB/s (bytes of f32 K/V in the cache per second, best of --runs) and wire
// bytes per token. Prints a table; --json FILE also writes the numbers as JSON.
//   duet bench-codec [--tokens 512] [--runs 10] [--json FILE]
#pragma once

namespace duet::cli {

// argv after the subcommand. Returns the process exit code (2 for bad flags, 1 for a failure).
int BenchCodecMain(int argc, char** argv);

}  // namespace duet::cli
