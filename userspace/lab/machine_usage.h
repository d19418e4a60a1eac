// What a process and the machine did while a bench ran, read from /proc:
// disk busy time, bytes written, CPU, and what an event loop's thread is doing.
// `vmsync bench server` uses them to say where the server saturates.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <utility>

namespace vmsync {

/// Milliseconds the disk holding `path` spent doing I/O so far (/proc/diskstats), or -1.
double diskBusyMs(const std::string& path);

/// Bytes the process wrote to storage so far (/proc/PID/io write_bytes), or 0.
double writtenBytes(pid_t pid);

/// (busy, total) jiffies of every CPU of the machine so far (/proc/stat).
std::pair<double, double> machineJiffies();

/// CPU seconds this process used so far (user and system).
double selfCpuSeconds();

/// CPU milliseconds the calling thread used so far.
double threadCpuMs();

/// What the server's main thread (its event loop) is doing, sampled every
/// 5 ms from /proc: running, waiting on the disk (state D: an fsync), or
/// waiting for work (an idle event loop sleeps in epoll_wait).
class LoopSampler {
 public:
  explicit LoopSampler(pid_t pid);
  ~LoopSampler() {
    stop_ = true;
    thread_.join();
  }
  double running() const { return total_ ? static_cast<double>(running_) / total_ : 0; }
  double disk() const { return total_ ? static_cast<double>(disk_) / total_ : 0; }

 private:
  std::string path_;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> total_{0}, running_{0}, disk_{0};
  std::thread thread_;
};

}  // namespace vmsync
