#include "base/thread_pool.h"

#include <sched.h>

#include <algorithm>
#include <cstdlib>

namespace vmsync {

namespace {

/// Set while this thread runs a chunk: a loop started from inside one runs
/// inline rather than waiting for the pool it is part of.
thread_local bool insideChunk = false;

}  // namespace

ThreadPool::ThreadPool(unsigned threads) {
  if (threads == 0) threads = defaultThreadCount();
  for (unsigned i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void ThreadPool::runChunks() {
  for (;;) {
    std::size_t begin, end;
    {
      std::lock_guard lock(mutex_);
      if (next_ >= count_) return;
      begin = next_;
      end = std::min(count_, begin + grain_);
      next_ = end;
    }
    try {
      insideChunk = true;
      (*body_)(begin, end);
      insideChunk = false;
    } catch (...) {
      insideChunk = false;
      std::lock_guard lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }
}

void ThreadPool::work() {
  std::uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
    }
    runChunks();
    std::lock_guard lock(mutex_);
    if (--busy_ == 0) done_.notify_one();
  }
}

void ThreadPool::parallelFor(std::size_t count, std::size_t grain,
                             const std::function<void(std::size_t begin, std::size_t end)>& body) {
  if (count == 0) return;
  grain = std::max<std::size_t>(grain, 1);
  if (workers_.empty() || count <= grain || insideChunk) {
    body(0, count);
    return;
  }
  std::lock_guard loop(loopMutex_);
  {
    std::lock_guard lock(mutex_);
    body_ = &body;
    count_ = count;
    grain_ = grain;
    next_ = 0;
    error_ = nullptr;
    busy_ = static_cast<unsigned>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  runChunks();
  std::exception_ptr error;
  {
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return busy_ == 0; });
    body_ = nullptr;
    error = error_;
  }
  if (error) std::rethrow_exception(error);
}

unsigned defaultThreadCount() {
  if (const char* env = std::getenv("VMSYNC_THREADS")) {
    long n = std::strtol(env, nullptr, 10);
    if (n > 0) return static_cast<unsigned>(std::min(n, 256L));
  }
  cpu_set_t set;
  if (::sched_getaffinity(0, sizeof set, &set) == 0) return static_cast<unsigned>(std::max(1, CPU_COUNT(&set)));
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadPool& defaultThreadPool() {
  static ThreadPool pool(defaultThreadCount());
  return pool;
}

}  // namespace vmsync
