#include "vmm/write_ring.h"

#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "base/error.h"

namespace vmsync {

WriteRing::WriteRing(const std::string& path, bool punt)
    : punt_(punt), owner_(std::this_thread::get_id()) {
  // Completions are reaped by this thread when it waits, not pushed at it
  // (no wake-up per write a worker finishes). Kernels before 6.1 refuse the
  // flags; the ring then works as plain io_uring.
  int rc = io_uring_queue_init(kEntries, &ring_,
                               IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN);
  if (rc == -EINVAL) rc = io_uring_queue_init(kEntries, &ring_, 0);
  if (rc < 0) throwErrno(-rc, fmt::format("cannot set up io_uring to write image {}", path));
  // A file takes one buffered write at a time (the inode lock), and io_uring
  // queues buffered writes to one file one after another anyway: one worker,
  // so that no more are started or woken for nothing. Best effort.
  unsigned workers[2] = {1, 1};
  (void)io_uring_register_iowq_max_workers(&ring_, workers);
}

WriteRing::~WriteRing() { io_uring_queue_exit(&ring_); }

void WriteRing::write(int fd, const std::string& path, std::span<const UnitWrite> writes) {
  std::vector<std::uint32_t> written(writes.size(), 0);  // bytes of each unit written so far
  std::vector<std::size_t> again;                        // units to submit again for the rest
  std::size_t next = 0;                                  // the next unit not yet submitted
  unsigned inFlight = 0;
  int error = 0;  // the first failure; once set, nothing new is submitted
  std::uint64_t errorAt = 0;
  while (true) {
    while (error == 0 && inFlight < kEntries && (!again.empty() || next < writes.size())) {
      std::size_t id;
      bool retry = !again.empty();
      if (retry) {
        id = again.back();
        again.pop_back();
      } else {
        id = next++;
      }
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) {  // cannot happen with fewer than kEntries in flight
        again.push_back(id);
        break;
      }
      const UnitWrite& unit = writes[id];
      io_uring_prep_write(sqe, fd, unit.bytes + written[id], kUnitSize - written[id],
                          unit.index * kUnitSize + written[id]);
      io_uring_sqe_set_data64(sqe, id);
      // A write that could not go inline (EAGAIN) goes to a worker the next time.
      if (punt_ || retry) sqe->flags |= IOSQE_ASYNC;
      ++inFlight;
    }
    if (inFlight == 0) break;
    // Waits for every write in flight, not one: with deferred task work the
    // completions then wake this thread once per batch.
    const int rc = io_uring_submit_and_wait(&ring_, inFlight);
    if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
      // The ring itself failed. Writes in flight may still read the caller's
      // buffers, so neither returning nor throwing is safe.
      spdlog::critical("io_uring failed while writing image {}: {}", path, std::strerror(-rc));
      std::abort();
    }
    unsigned head;
    unsigned seen = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++seen;
      --inFlight;
      const auto id = static_cast<std::size_t>(io_uring_cqe_get_data64(cqe));
      const int res = cqe->res;
      if (res == -EAGAIN || res == -EINTR) {
        again.push_back(id);
      } else if (res <= 0) {
        if (error == 0) {
          error = res < 0 ? -res : EIO;  // a write of nothing: the device gave up
          errorAt = writes[id].index * kUnitSize + written[id];
        }
      } else {
        written[id] += static_cast<std::uint32_t>(res);
        if (written[id] < kUnitSize) again.push_back(id);  // short: the rest next round
      }
    }
    io_uring_cq_advance(&ring_, seen);
  }
  if (error != 0) throwErrno(error, fmt::format("cannot write image {} at byte {}", path, errorAt));
}

}  // namespace vmsync
