// Work splitting on the XLA CPU intra-op thread pool.
//
// Handlers return an ffi::Future instead of waiting, so no pool worker ever blocks on a latch.
// Tasks are claimed dynamically, but every task writes only its own outputs, so results do not
// depend on which thread ran which task or on the number of threads.
//
// One parallel phase per handler call: the ffi::ThreadPool refers to the call's execution
// context, which does not outlive the handler's return, so a task must not schedule more work.
// Serial work goes before the phase (in the handler) or after it (`finish`); an algorithm with
// two parallel phases is two FFI calls, or one whose later tasks wait for earlier ones
// (AwaitCount): tasks are handed out in index order, so when a task starts, every lower-numbered
// task is running on another worker or done, and waiting for it cannot deadlock, with any number
// of threads. A task must never wait for a higher-numbered one.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jsparse {

namespace ffi = xla::ffi;

// Runs body(task) for every task in [0, num_tasks) on the pool, then finish() once on the thread
// that completed the last task; the returned future becomes available after finish() returns.
// body and finish are shared by the workers and must only read shared state or write outputs
// owned by their task.
//
// The future waits for the tasks, not for the workers: a worker that wakes after every task was
// claimed (on a loaded VM a sleeping core can take a millisecond to wake) finds none and leaves,
// touching nothing but the shared state it holds, so a call's latency never includes the wake-up
// of a worker that turned out not to be needed. body and finish are destroyed once the last task
// is done, so what they hold (scratch blocks) does not wait for such a late worker either.
template <typename Body, typename Finish>
ffi::Future ParallelFor(ffi::ThreadPool& pool, int64_t num_tasks, Body body, Finish finish) {
  if (num_tasks <= 0) {
    finish();
    ffi::CountDownPromise done(1);
    ffi::Future future(done);
    done.CountDown();
    return future;
  }
  struct Shared {
    Shared(Body b, Finish f, int64_t n, ffi::CountDownPromise d)
        : body(std::move(b)), finish(std::move(f)), num_tasks(n), remaining(n), done(std::move(d)) {}
    std::optional<Body> body;
    std::optional<Finish> finish;
    const int64_t num_tasks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> remaining;  // tasks not done yet
    ffi::CountDownPromise done;
  };
  ffi::CountDownPromise done(1);
  ffi::Future future(done);
  auto shared = std::make_shared<Shared>(std::move(body), std::move(finish), num_tasks, done);
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), num_tasks);
  for (int64_t w = 0; w < workers; ++w) {
    pool.Schedule([shared]() {
      for (int64_t task; (task = shared->next.fetch_add(1)) < shared->num_tasks;) {
        (*shared->body)(task);
        if (shared->remaining.fetch_sub(1) == 1) {  // the last task: no other thread uses body now
          (*shared->finish)();
          shared->body.reset();
          shared->finish.reset();
          shared->done.CountDown();
          return;
        }
      }
    });
  }
  return future;
}

// Waits until `counter` reaches `target`. Only for counts that lower-numbered tasks of the same
// ParallelFor raise (see the header comment), which makes every wait short and finite.
inline void AwaitCount(const std::atomic<int64_t>& counter, int64_t target) {
  while (counter.load(std::memory_order_acquire) < target) std::this_thread::yield();
}

template <typename Body>
ffi::Future ParallelFor(ffi::ThreadPool& pool, int64_t num_tasks, Body body) {
  return ParallelFor(pool, num_tasks, std::move(body), [] {});
}

}  // namespace jsparse
