// The CPU kernels' own helper threads (one pool per process, shared by every kernel of the library that
// jaxspec.ops.cpu_build compiles): Workers::Get().Run(chunks, body) runs body(0..chunks-1) on the calling thread
// and the helpers, and returns when all are done.
#ifndef JAXSPEC_OPS_CPU_WORKERS_H_
#define JAXSPEC_OPS_CPU_WORKERS_H_

#include <immintrin.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

namespace jaxspec {

// The calling thread plus `threads - 1` helpers, started by JaxspecCpuKernelThreads. Why not XLA's intra-op
// pool: its threads go to sleep between ops, and waking one costs tens of microseconds, about what a whole
// product of a few rows takes here, with ~120 such products per forward. A helper spins for a short while after
// each call, so it is awake for the next product of the same forward, and then sleeps.
//
// A call publishes (generation, next chunk) in one atomic word; a thread claims a chunk by advancing it with a
// compare-and-swap, which fails once the generation has moved on, so a late helper never runs a stale call's
// chunk. The caller works too and returns when every chunk of its call is done. A call that finds another one
// running (XLA may run two ops at once) runs alone on its own thread.
class Workers {
 public:
  static Workers& Get() {
    static Workers* workers = new Workers();  // never destroyed: its threads live as long as the process
    return *workers;
  }

  void Start(int64_t threads) {
    std::lock_guard<std::mutex> lock(call_mu_);
    for (; helpers_ < threads - 1; ++helpers_) std::thread([this] { Loop(); }).detach();
  }

  void Run(int64_t chunks, const std::function<void(int64_t)>& body) {
    std::unique_lock<std::mutex> one_call(call_mu_, std::try_to_lock);
    if (!one_call.owns_lock() || helpers_ == 0 || chunks < 2) {
      for (int64_t c = 0; c < chunks; ++c) body(c);
      return;
    }
    body_.store(&body, std::memory_order_relaxed);  // published by the seq_cst store of the ticket below
    chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0);
    const uint64_t generation = (ticket_.load() >> 32) + 1;
    ticket_.store(generation << 32);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      wake_.notify_all();
    }
    Drain(generation);
    while (done_.load() < chunks) _mm_pause();
  }

 private:
  // Claims and runs chunks of `generation` until none is left or a newer call has begun.
  void Drain(uint64_t generation) {
    uint64_t ticket = ticket_.load();
    while ((ticket >> 32) == generation) {
      const int64_t chunk = static_cast<int64_t>(ticket & 0xffffffffu);
      if (chunk >= chunks_.load(std::memory_order_relaxed)) return;
      if (ticket_.compare_exchange_weak(ticket, ticket + 1)) {
        (*body_.load(std::memory_order_relaxed))(chunk);  // the call cannot end before this chunk is done
        done_.fetch_add(1);
        ticket = ticket_.load();
      }
    }
  }

  void Loop() {
    uint64_t seen = ticket_.load() >> 32;
    for (;;) {
      uint64_t generation = ticket_.load() >> 32;
      for (int spin = 0; generation == seen && spin < kSpins; ++spin) {
        _mm_pause();
        generation = ticket_.load() >> 32;
      }
      if (generation == seen) {
        std::unique_lock<std::mutex> lock(sleep_mu_);
        sleeping_.fetch_add(1);
        wake_.wait(lock, [&] { return (ticket_.load() >> 32) != seen; });
        sleeping_.fetch_sub(1);
        generation = ticket_.load() >> 32;
      }
      seen = generation;
      Drain(generation);
    }
  }

  static constexpr int kSpins = 1 << 16;  // ~0.2-2 ms of pause instructions
  int64_t helpers_ = 0;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<const std::function<void(int64_t)>*> body_{nullptr};
  std::atomic<int64_t> chunks_{0};
  std::mutex call_mu_, sleep_mu_;
  std::condition_variable wake_;
};

}  // namespace jaxspec

#endif  // JAXSPEC_OPS_CPU_WORKERS_H_
