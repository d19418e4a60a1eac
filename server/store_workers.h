// Threads for the server's blocking disk work (writing and fsyncing
// checkpoints and state files), so one VM's disk does not stall the event
// loop every other VM's calls run on.
#pragma once

#include <kj/async.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace vmsync {

/// A fixed set of threads taking jobs in the order they were queued. Jobs
/// of one VM are kept in order by their caller (it queues the next when the
/// previous resolved); jobs of different VMs run side by side.
class StoreWorkers {
 public:
  explicit StoreWorkers(unsigned threads);
  /// Finishes the jobs queued, then joins.
  ~StoreWorkers();
  StoreWorkers(const StoreWorkers&) = delete;
  StoreWorkers& operator=(const StoreWorkers&) = delete;

  /// Runs `job` on a worker. The promise resolves on the calling thread's
  /// event loop when the job returned, or rejects with what it threw, its
  /// message unchanged (as an RPC error, what the device is shown). `job`
  /// must own everything it touches: the promise may be dropped while it
  /// runs.
  kj::Promise<void> run(std::function<void()> job);

  /// The process's workers (VMSYNC_STORE_THREADS, default 4: the jobs wait
  /// on the disk, not the CPU), made on first use.
  static StoreWorkers& shared();

 private:
  void work();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace vmsync
