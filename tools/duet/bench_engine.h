// `duet bench-engine`: engine speed on random-weight models of real shapes (GPT-2-124M,
// TinyLlama-1.1B), bf16, against the machine's read bandwidth measured in the same run.
#pragma once

namespace duet::cli {

int BenchEngineMain(int argc, char** argv, const char* self_exe);

}  // namespace duet::cli
