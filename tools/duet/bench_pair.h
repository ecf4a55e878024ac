// `duet bench-pair`: the disaggregated pair against one process, on the GPT-2-124M shape with
// random bf16 weights. In one run it prints
//   1. one-process prefill time (Model::Forward in this process) for 128 and 512 prompt tokens;
//   2. TTFT through duet-decode + duet-prefill (child processes on 127.0.0.1) for the same
//      prompts, and TTFT / one-process prefill;
//   3. decode tokens/s with 1 and 16 concurrent sessions through the pair, and their ratio;
//   4. K/V wire bytes per token for f32, bf16 and int8;
//   5. the K/V codec's encode and decode GB/s (duet bench-codec).
// --threads is per process; the default is half the machine's cores, so the two servers do not
// oversubscribe the cores they share.
//   duet bench-pair [--json FILE] [--threads N] [--workdir DIR] [--prefill-bin PATH]
//                   [--decode-bin PATH] [--tokenizer FILE]
#pragma once

namespace duet::cli {

// argv after the subcommand. Returns the process exit code (2 for bad flags, 1 for a failure).
// Starts and stops its own servers; they are stopped on every return path.
int BenchPairMain(int argc, char** argv);

}  // namespace duet::cli
