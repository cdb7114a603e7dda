// The thread count of the CPU kernels' helper pool (cpu_workers.h).
#include <cstdint>

#include "cpu_workers.h"

// Threads per call, the caller's included; more than once only adds helpers. Until called, calls run on the
// caller's thread alone.
extern "C" void JaxspecCpuKernelThreads(int64_t threads) { jaxspec::Workers::Get().Start(threads); }
