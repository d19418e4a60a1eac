// A small pool of worker threads for data-parallel loops (scanning and
// encoding the units of an image).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace vmsync {

/// Runs the chunks of a loop on `threads` threads: the caller plus threads - 1
/// workers, which sleep between loops. One loop runs at a time; a second caller
/// waits for the first, and a loop started from inside a chunk runs inline.
class ThreadPool {
 public:
  /// `threads` == 0: one per CPU the process may run on.
  explicit ThreadPool(unsigned threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  /// Threads a loop runs on, the caller included.
  unsigned threads() const { return static_cast<unsigned>(workers_.size()) + 1; }

  /// Calls body(begin, end) for consecutive chunks of [0, count) of at most
  /// `grain` items, on every thread, and returns when all are done. The first
  /// exception a chunk throws is rethrown here (the other chunks still run).
  void parallelFor(std::size_t count, std::size_t grain,
                   const std::function<void(std::size_t begin, std::size_t end)>& body);

 private:
  void work();
  void runChunks();

  std::mutex loopMutex_;  // one loop at a time
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
  std::uint64_t generation_ = 0;  // bumped for each loop
  unsigned busy_ = 0;              // workers still in the current loop
  // The current loop.
  const std::function<void(std::size_t, std::size_t)>* body_ = nullptr;
  std::size_t count_ = 0, grain_ = 1;
  std::size_t next_ = 0;  // first item not yet handed out (under mutex_)
  std::exception_ptr error_;
};

/// Threads for scanning images: VMSYNC_THREADS when set to a positive number,
/// else one per CPU the process may run on.
unsigned defaultThreadCount();

/// A process-wide pool of defaultThreadCount() threads, made on first use.
ThreadPool& defaultThreadPool();

}  // namespace vmsync
