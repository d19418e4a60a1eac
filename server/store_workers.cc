#include "store_workers.h"

#include <cstdlib>
#include <exception>
#include <memory>

#include "base/error.h"
#include "transport/rpc_util.h"

namespace vmsync {

StoreWorkers::StoreWorkers(unsigned threads) {
  if (threads == 0) fail("the store needs at least one worker thread");
  for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { work(); });
}

StoreWorkers::~StoreWorkers() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

void StoreWorkers::work() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stopping, and nothing left
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    job();
  }
}

kj::Promise<void> StoreWorkers::run(std::function<void()> job) {
  auto done = kj::newPromiseAndCrossThreadFulfiller<void>();
  // Shared: std::function needs a copyable callable, and kj::Own is not.
  auto fulfiller = std::make_shared<kj::Own<kj::CrossThreadPromiseFulfiller<void>>>(kj::mv(done.fulfiller));
  auto error = std::make_shared<std::exception_ptr>();  // written before the fulfiller is told
  {
    std::lock_guard lock(mutex_);
    jobs_.push_back([job = std::move(job), fulfiller, error]() mutable {
      try {
        job();
      } catch (...) {
        *error = std::current_exception();
      }
      // What the job held goes here, before the event loop hears of it: the
      // loop never shares an object with a job that is still being destroyed.
      job = nullptr;
      (*fulfiller)->fulfill();
    });
  }
  wake_.notify_one();
  return done.promise.then([error]() {
    if (!*error) return;
    try {
      std::rethrow_exception(*error);
    } catch (const std::exception& e) {
      rpcFail(e.what());  // the message as it was, not wrapped as a foreign exception
    }
  });
}

StoreWorkers& StoreWorkers::shared() {
  static StoreWorkers workers([] {
    const char* v = std::getenv("VMSYNC_STORE_THREADS");
    const int n = v ? std::atoi(v) : 0;
    return n > 0 ? static_cast<unsigned>(n) : 4u;
  }());
  return workers;
}

}  // namespace vmsync
