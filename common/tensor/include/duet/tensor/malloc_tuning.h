// Process-wide allocator settings for servers and benchmarks.
#pragma once

namespace duet {

// glibc hands freed blocks of a megabyte or more back to the kernel (mmap threshold, heap
// trimming), so every K/V message of a stream would be built in fresh pages; on a VM a page
// fault costs tens of microseconds and then dominates the codec. This keeps such memory in the
// process (mmap threshold 256 MiB, trim threshold 512 MiB) unless the environment already set
// MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_. Call once at start, before threads.
void KeepFreedMemory();

}  // namespace duet
