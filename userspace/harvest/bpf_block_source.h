// The `bpf` block source: eBPF programs on kernel tracepoints record every
// write to the VM's disk into a BPF ring buffer; this class drains the ring
// into a set of dirty 4096-byte blocks and hands that set over at each harvest.
//
// Two modes (bpf/block_writes.bpf.c explains what each traces):
// - block device: the VM's disk is a block device (a loop device over the
//   image); write requests on that disk are recorded when issued and done;
// - file: the VMM writes the image file with pwrite64/pwritev/pwritev2
//   (QEMU's aio=threads); the VMM's calls on the image's fd are recorded.
//
// Lost records are never silent: a full ring, a full per-thread table, a ring
// read error, a program the kernel skipped (see below) or a write the
// programs could not place (write(2) at the file position, ftruncate, ...)
// turn that harvest into `everything` with a reason.
//
// The kernel runs a tracing program at most once per CPU at a time and skips
// a nested run, counting it in the program's recursion_misses: any count
// turns the harvest into a rescan.
//
// Block device mode records each write request when issued and again when it
// completes. A harvest reports the completed requests' blocks, and also the
// blocks of every request issued but not seen completing: its data may land
// after the harvest. Such a request is reported at every harvest until its
// completion is read, or, if the kernel skipped the completion (it can, without
// saying so), until the disk's request timeout has passed since its issue.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "harvest/dirty_source.h"

struct block_writes_bpf;  // the bpftool skeleton (block_writes.skel.h)
struct ring_buffer;       // libbpf

namespace vmsync {

/// What to trace and how.
struct BpfBlockSourceOptions {
  enum class Mode { BlockDevice, File };
  Mode mode = Mode::BlockDevice;
  /// Block device mode: the VM's disk, a whole disk such as /dev/loop3.
  std::string blockDevicePath;
  /// File mode: the VMM's process id (as seen from the initial pid namespace)
  /// and the number of its file descriptor on the disk image.
  pid_t vmmPid = 0;
  int imageFd = -1;
  /// Size of the BPF ring buffer in bytes: a power of two, at least one page.
  /// Each record takes 32 bytes (24 + an 8-byte header).
  std::size_t ringBytes = 4 << 20;
  /// Drain the ring from a thread woken by epoll, so that the ring only
  /// fills if that thread falls behind. If false, the ring is drained at
  /// harvest only (tests use this to fill a tiny ring on purpose).
  bool drainInBackground = true;
  /// The drain thread is woken once this many bytes wait in the ring (a
  /// wake-up per record would cost the VMM a context switch per write), and
  /// otherwise drains every `drainInterval` milliseconds. 0: ringBytes / 8.
  std::size_t wakeupBytes = 0;
  int drainIntervalMilliseconds = 50;
  /// Writes ending beyond this offset turn the round into `everything`
  /// instead of growing the dirty bitmap without bound.
  std::uint64_t maxImageBytes = std::uint64_t{1} << 40;
  /// Block device mode: how long an issued request whose completion was
  /// never read keeps being reported. 0: the disk's request timeout
  /// (queue/io_timeout in sysfs) plus 5 s, or 35 s if sysfs does not say.
  int inFlightExpiryMilliseconds = 0;
  /// Block device mode: past this many requests issued and not completed,
  /// the harvest rescans and forgets them instead of growing without bound.
  std::size_t maxInFlight = 1 << 16;
  /// File mode needs tracefs for the syscall tracepoints; mount it at
  /// /sys/kernel/tracing if it is not mounted there or under debugfs.
  bool mountTracefsIfMissing = true;
};

/// Counters for logs and tests.
struct BpfBlockSourceStats {
  std::uint64_t records = 0;           ///< records read from the ring
  std::uint64_t unknownRanges = 0;     ///< records that forced a rescan
  std::uint64_t ringFullDrops = 0;     ///< reservations that failed in BPF
  std::uint64_t pendingFullDrops = 0;  ///< per-thread entries that did not fit
  /// Times the kernel said it skipped one of the programs because it was
  /// already running on that CPU (bpf_prog_info.recursion_misses, summed).
  std::uint64_t skippedRuns = 0;
  /// Block device mode: requests seen issued; those issued whose completion
  /// was not read by the last harvest; and those whose completion was never
  /// read, reported until the request timeout instead.
  std::uint64_t issuedRequests = 0;
  std::uint64_t inFlightRequests = 0;
  std::uint64_t unseenCompletions = 0;
};

/// Owns the loaded and attached programs, the ring buffer and the drain thread.
class BpfBlockSource final : public BlockSource {
 public:
  /// Opens, configures, loads and attaches the programs. Throws Error with a
  /// message a user can act on ("cannot load BPF program block_writes:
  /// Operation not permitted").
  explicit BpfBlockSource(const BpfBlockSourceOptions& options);
  ~BpfBlockSource() override;
  BpfBlockSource(const BpfBlockSource&) = delete;
  BpfBlockSource& operator=(const BpfBlockSource&) = delete;

  std::string name() const override { return "bpf"; }
  /// Drains the ring, then hands over the dirty blocks and resets them.
  DirtyUnits harvest() override;

  /// What is traced, for the start-up log ("bpf: block device /dev/loop3 (7:3)").
  const std::string& description() const { return description_; }
  /// Totals since creation.
  BpfBlockSourceStats stats() const;

 private:
  struct SkeletonDeleter {
    void operator()(block_writes_bpf* skeleton) const;
  };
  struct RingBufferDeleter {
    void operator()(ring_buffer* ring) const;
  };

  static int onRecord(void* self, void* data, std::size_t size);
  void fold(const void* data, std::size_t size);  // with mutex_ held
  void markUnits(std::uint64_t first, std::uint64_t last);
  void markRange(std::uint64_t offset, std::uint64_t length);
  void drainLocked();
  std::string checkSkippedRunsLocked();
  void drainLoop();
  void stopDrainThread();

  BpfBlockSourceOptions options_;
  std::string description_;
  std::unique_ptr<block_writes_bpf, SkeletonDeleter> skeleton_;
  std::unique_ptr<ring_buffer, RingBufferDeleter> ring_;

  mutable std::mutex mutex_;
  std::vector<std::uint64_t> dirtyBits_;  // one bit per 4096-byte block
  std::string everythingReason_;          // non-empty: this round rescans
  std::uint64_t seenRingFullDrops_ = 0;
  std::uint64_t seenPendingFullDrops_ = 0;
  // Per loaded program: its skip counter at the last harvest.
  struct ProgramSkips {
    int fd = -1;
    std::string name;
    std::uint64_t seen = 0;
  };
  std::vector<ProgramSkips> programs_;
  // Block device mode: requests issued, completion not read yet, by their
  // byte range; the value holds the issue times (oldest first).
  std::map<std::pair<std::uint64_t, std::uint64_t>,
           std::deque<std::chrono::steady_clock::time_point>>
      inFlight_;
  std::size_t inFlightCount_ = 0;
  std::chrono::milliseconds inFlightExpiry_{0};
  BpfBlockSourceStats stats_;

  int stopEventFd_ = -1;
  int drainEpollFd_ = -1;
  std::thread drainThread_;
};

/// The bpf source, or why it cannot be used here (for `--block-source auto`,
/// which then falls back to the scan source and says so).
struct BpfBlockSourceProbe {
  std::unique_ptr<BpfBlockSource> source;  ///< null if unavailable
  std::string unavailableReason;           ///< set if source is null
};

/// Tries to create the bpf source; never throws Error.
BpfBlockSourceProbe tryCreateBpfBlockSource(const BpfBlockSourceOptions& options);

/// Kernel dev_t encoding (major << 20 | minor) of a block device path; throws
/// Error if the path is not a whole-disk block device.
std::uint32_t kernelDevOfWholeDisk(const std::string& blockDevicePath);

/// The number of the one file descriptor of process `pid` open on the file
/// at `path` (same device and inode), for file mode: QEMU started paused,
/// then the source, then `cont`. Throws Error if there is none, or several
/// (file mode follows one fd).
int findFileDescriptor(pid_t pid, const std::string& path);

}  // namespace vmsync
