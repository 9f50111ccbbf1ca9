// Splits a kernel's tasks over XLA:CPU's intra-op thread pool (shared by the prerl_jax kernels).
#ifndef PRERL_JAX_CPU_KERNEL_POOL_H_
#define PRERL_JAX_CPU_KERNEL_POOL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace prerl_jax {

// Runs tasks 0 .. tasks - 1 in chunks taken in order by the calling thread and the pool's threads;
// returns when all have run. Each thread calls `make_worker()` once and then `worker(task)` per
// task (so a worker can own its scratch). `make_worker` is copied into state shared with the pool
// tasks, which may start after this returns and then find no chunk left.
template <typename MakeWorker>
void ParallelTasks(xla::ffi::ThreadPool& pool, int64_t tasks, int64_t chunks_per_thread,
                   MakeWorker make_worker) {
  struct Shared {
    Shared(MakeWorker make, int64_t tasks, int64_t chunk)
        : make_worker(std::move(make)), tasks(tasks), chunk(chunk),
          chunks((tasks + chunk - 1) / chunk) {}
    MakeWorker make_worker;
    const int64_t tasks, chunk, chunks;
    std::atomic<int64_t> next{0}, finished{0};
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(1, tasks / (chunks_per_thread * threads));
  auto shared = std::make_shared<Shared>(std::move(make_worker), tasks, chunk);
  auto run = [](Shared& s) {
    auto worker = s.make_worker();
    for (int64_t c; (c = s.next.fetch_add(1)) < s.chunks;) {
      const int64_t end = std::min(s.tasks, (c + 1) * s.chunk);
      for (int64_t t = c * s.chunk; t < end; ++t) worker(t);
      s.finished.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < std::min(threads, shared->chunks); ++i) {
    pool.Schedule([shared, run] { run(*shared); });
  }
  run(*shared);
  // Every chunk is taken; wait for those still running on other threads.
  while (shared->finished.load(std::memory_order_acquire) < shared->chunks) {
    std::this_thread::yield();
  }
}

}  // namespace prerl_jax

#endif  // PRERL_JAX_CPU_KERNEL_POOL_H_
