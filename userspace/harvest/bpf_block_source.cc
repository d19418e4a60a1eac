#include "harvest/bpf_block_source.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <fmt/ranges.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string_view>

#include "block_writes.h"
#include "block_writes.skel.h"
#include "base/error.h"
#include "base/units.h"

namespace vmsync {
namespace {

constexpr const char* kProgramName = "block_writes";

std::string describeUnknownReason(unsigned reason) {
  switch (reason) {
    case BLOCK_WRITE_REASON_EXIT_WITHOUT_ENTRY:
      return "a write call was in flight when tracing started";
    case BLOCK_WRITE_REASON_FILE_POSITION_WRITE:
      return "the VMM wrote the image with write(2)/writev(2) at the file position";
    case BLOCK_WRITE_REASON_PWRITEV2_NO_OFFSET:
      return "the VMM wrote the image with pwritev2(2) at the file position or RWF_APPEND";
    case BLOCK_WRITE_REASON_TRUNCATE:
      return "the VMM truncated the image";
    default:
      return fmt::format("a write could not be placed (reason {})", reason);
  }
}

constexpr long kTracefsMagic = 0x74726163;  // TRACEFS_MAGIC in linux/magic.h

bool isTracefs(const char* path) {
  struct statfs fs {};
  return ::statfs(path, &fs) == 0 && fs.f_type == kTracefsMagic;
}

// libbpf looks up syscall tracepoint ids in tracefs, under debugfs first.
// Returns a note for the log if it had to mount tracefs.
std::string ensureTracefs(bool mountIfMissing) {
  for (const char* dir : {"/sys/kernel/debug/tracing", "/sys/kernel/tracing"}) {
    if (!isTracefs(dir)) continue;
    std::string syscalls = fmt::format("{}/events/syscalls", dir);
    if (::access(syscalls.c_str(), R_OK | X_OK) != 0)
      throwLastErrno(
          fmt::format("file mode needs the syscall tracepoints: cannot use {}", syscalls));
    return {};
  }
  if (!mountIfMissing)
    fail(
        "file mode needs the syscall tracepoints, but tracefs is not mounted at "
        "/sys/kernel/tracing");
  if (::mount("nodev", "/sys/kernel/tracing", "tracefs", 0, nullptr) != 0)
    throwLastErrno(
        "file mode needs tracefs, which is not mounted: cannot mount it on "
        "/sys/kernel/tracing");
  if (::access("/sys/kernel/tracing/events/syscalls", R_OK | X_OK) != 0)
    throwLastErrno(
        "file mode needs the syscall tracepoints: cannot use "
        "/sys/kernel/tracing/events/syscalls");
  return "; mounted tracefs on /sys/kernel/tracing";
}

// Checks that `fd` of process `pid` is a regular file opened without O_APPEND
// (pwrite on an O_APPEND file ignores its offset on Linux). Returns its path.
std::string checkImageFd(pid_t pid, int fd) {
  if (pid <= 0 || fd < 0)
    fail("bpf file mode needs the VMM's pid and image fd (got {} and {})", pid, fd);
  std::string link = fmt::format("/proc/{}/fd/{}", pid, fd);
  char target[PATH_MAX];
  ssize_t n = ::readlink(link.c_str(), target, sizeof(target) - 1);
  if (n < 0) throwLastErrno(fmt::format("cannot inspect the VMM's image fd {}", link));
  target[n] = '\0';
  struct stat st {};
  if (::stat(link.c_str(), &st) != 0) throwLastErrno(fmt::format("cannot stat {}", link));
  if (!S_ISREG(st.st_mode)) fail("{} ({}) is not a regular file", link, target);

  std::ifstream info(fmt::format("/proc/{}/fdinfo/{}", pid, fd));
  std::string key;
  while (info >> key) {
    if (key == "flags:") {
      unsigned long flags = 0;
      info >> std::oct >> flags;
      if (flags & O_APPEND)
        fail("the VMM opened {} with O_APPEND: its pwrite offsets cannot be trusted", target);
      break;
    }
  }
  return target;
}

}  // namespace

std::uint32_t kernelDevOfWholeDisk(const std::string& blockDevicePath) {
  struct stat st {};
  if (::stat(blockDevicePath.c_str(), &st) != 0)
    throwLastErrno(fmt::format("cannot stat the VM's disk {}", blockDevicePath));
  if (!S_ISBLK(st.st_mode)) fail("{} is not a block device", blockDevicePath);
  unsigned maj = major(st.st_rdev), min = minor(st.st_rdev);
  if (::access(fmt::format("/sys/dev/block/{}:{}/partition", maj, min).c_str(), F_OK) == 0)
    fail("{} is a partition; bpf block device mode needs the whole disk", blockDevicePath);
  if (maj >= (1u << 12) || min >= (1u << 20))
    fail("{} has device number {}:{}, beyond the kernel's dev_t", blockDevicePath, maj, min);
  return (maj << 20) | min;
}

int findFileDescriptor(pid_t pid, const std::string& path) {
  struct stat wanted {};
  if (::stat(path.c_str(), &wanted) != 0) throwLastErrno(fmt::format("cannot stat {}", path));
  std::string directory = fmt::format("/proc/{}/fd", pid);
  std::error_code error;
  std::vector<int> found;
  for (const auto& entry : std::filesystem::directory_iterator(directory, error)) {
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) != 0) continue;  // closed meanwhile
    if (st.st_dev == wanted.st_dev && st.st_ino == wanted.st_ino)
      found.push_back(std::stoi(entry.path().filename().string()));
  }
  if (error) throwErrno(error.value(), fmt::format("cannot list {}", directory));
  if (found.empty()) fail("process {} has no file descriptor open on {}", pid, path);
  if (found.size() > 1)
    fail("process {} has {} file descriptors open on {} ({}); bpf file mode follows one", pid,
         found.size(), path, fmt::join(found, ", "));
  return found.front();
}

void BpfBlockSource::SkeletonDeleter::operator()(block_writes_bpf* skeleton) const {
  block_writes_bpf__destroy(skeleton);
}

void BpfBlockSource::RingBufferDeleter::operator()(ring_buffer* ring) const {
  ring_buffer__free(ring);
}

BpfBlockSource::BpfBlockSource(const BpfBlockSourceOptions& options) : options_(options) {
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  if (!std::has_single_bit(options_.ringBytes) || options_.ringBytes < page ||
      options_.ringBytes > (std::size_t{1} << 31))
    fail("BPF ring buffer size {} must be a power of two between {} and 2 GiB", options_.ringBytes,
         page);

  const bool blockMode = options_.mode == BpfBlockSourceOptions::Mode::BlockDevice;
  std::uint32_t dev = 0;
  std::string notes;
  if (blockMode) {
    dev = kernelDevOfWholeDisk(options_.blockDevicePath);
    description_ = fmt::format("bpf: block device {} ({}:{})", options_.blockDevicePath, dev >> 20,
                               dev & ((1u << 20) - 1));
    inFlightExpiry_ = std::chrono::milliseconds(options_.inFlightExpiryMilliseconds);
    if (inFlightExpiry_.count() <= 0) {
      long timeout = 30000;
      std::ifstream sysfs(
          fmt::format("/sys/dev/block/{}:{}/queue/io_timeout", dev >> 20, dev & ((1u << 20) - 1)));
      if (long value = 0; sysfs >> value && value > 0) timeout = value;
      inFlightExpiry_ = std::chrono::milliseconds(timeout + 5000);
    }
  } else {
    std::string path = checkImageFd(options_.vmmPid, options_.imageFd);
    notes = ensureTracefs(options_.mountTracefsIfMissing);
    description_ = fmt::format("bpf: writes of process {} on fd {} ({})", options_.vmmPid,
                               options_.imageFd, path);
  }

  skeleton_.reset(block_writes_bpf__open());
  if (!skeleton_) throwLastErrno(fmt::format("cannot open BPF program {}", kProgramName));

  auto& rodata = *skeleton_->rodata;
  rodata.mode = blockMode ? BLOCK_WRITES_MODE_BLOCK_DEVICE : BLOCK_WRITES_MODE_FILE;
  rodata.target_dev = dev;
  rodata.target_tgid = static_cast<std::uint32_t>(options_.vmmPid);
  rodata.target_fd = options_.imageFd;
  rodata.wakeup_bytes = options_.wakeupBytes ? options_.wakeupBytes : options_.ringBytes / 8;

  int err = bpf_map__set_max_entries(skeleton_->maps.events,
                                     static_cast<std::uint32_t>(options_.ringBytes));
  if (err)
    throwErrno(-err,
               fmt::format("cannot size the BPF ring buffer to {} bytes", options_.ringBytes));

  // Load only the programs of the chosen mode.
  bpf_program* program = nullptr;
  bpf_object__for_each_program(program, skeleton_->obj) {
    bool isBlockProgram =
        program == skeleton_->progs.block_rq_issue || program == skeleton_->progs.block_rq_complete;
    bpf_program__set_autoload(program, isBlockProgram == blockMode);
  }

  err = block_writes_bpf__load(skeleton_.get());
  if (err) throwErrno(-err, fmt::format("cannot load BPF program {}", kProgramName));
  err = block_writes_bpf__attach(skeleton_.get());
  if (err) throwErrno(-err, fmt::format("cannot attach BPF program {}", kProgramName));

  bpf_object__for_each_program(program, skeleton_->obj) {
    if (!bpf_program__autoload(program)) continue;
    programs_.push_back({.fd = bpf_program__fd(program), .name = bpf_program__name(program)});
  }
  for (ProgramSkips& skips : programs_) {
    bpf_prog_info info{};
    std::uint32_t length = sizeof(info);
    err = bpf_obj_get_info_by_fd(skips.fd, &info, &length);
    if (err) throwErrno(-err, fmt::format("cannot read BPF program {}'s counters", skips.name));
    if (length < offsetof(bpf_prog_info, recursion_misses) + sizeof(info.recursion_misses))
      fail(
          "this kernel does not count the runs it skips of BPF program {} "
          "(bpf_prog_info.recursion_misses, Linux 5.12): lost records could go unseen",
          skips.name);
    skips.seen = info.recursion_misses;
  }

  ring_.reset(ring_buffer__new(bpf_map__fd(skeleton_->maps.events), &BpfBlockSource::onRecord, this,
                               nullptr));
  if (!ring_) throwLastErrno("cannot open the BPF ring buffer of block_writes");
  description_ += notes;

  if (options_.drainInBackground) {
    stopEventFd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (stopEventFd_ < 0) throwLastErrno("cannot create an eventfd for the BPF drain thread");
    drainEpollFd_ = ::epoll_create1(EPOLL_CLOEXEC);
    if (drainEpollFd_ < 0) {
      ::close(stopEventFd_);
      throwLastErrno("cannot create an epoll for the BPF drain thread");
    }
    epoll_event ringEvent{.events = EPOLLIN, .data = {.u32 = 0}};
    epoll_event stopEvent{.events = EPOLLIN, .data = {.u32 = 1}};
    if (::epoll_ctl(drainEpollFd_, EPOLL_CTL_ADD, ring_buffer__epoll_fd(ring_.get()), &ringEvent) ||
        ::epoll_ctl(drainEpollFd_, EPOLL_CTL_ADD, stopEventFd_, &stopEvent)) {
      int saved = errno;
      ::close(stopEventFd_);
      ::close(drainEpollFd_);
      throwErrno(saved, "cannot watch the BPF ring buffer with epoll");
    }
    try {
      drainThread_ = std::thread([this] { drainLoop(); });
    } catch (...) {
      stopDrainThread();  // closes the fds
      throw;
    }
  }
}

BpfBlockSource::~BpfBlockSource() { stopDrainThread(); }

void BpfBlockSource::stopDrainThread() {
  if (drainThread_.joinable()) {
    std::uint64_t one = 1;
    // An eventfd write of 1 cannot fail short of a bug; the thread also checks nothing else.
    [[maybe_unused]] ssize_t n = ::write(stopEventFd_, &one, sizeof(one));
    drainThread_.join();
  }
  if (stopEventFd_ >= 0) ::close(stopEventFd_);
  if (drainEpollFd_ >= 0) ::close(drainEpollFd_);
  stopEventFd_ = drainEpollFd_ = -1;
}

void BpfBlockSource::drainLoop() {
  for (;;) {
    epoll_event events[2];
    int n = ::epoll_wait(drainEpollFd_, events, 2, options_.drainIntervalMilliseconds);
    if (n < 0) {
      int err = errno;
      if (err == EINTR) continue;
      std::lock_guard lock(mutex_);
      everythingReason_ =
          fmt::format("the BPF drain thread stopped: epoll_wait: {}", std::strerror(err));
      return;  // harvest() drains the ring itself from now on
    }
    for (int i = 0; i < n; ++i)
      if (events[i].data.u32 == 1) return;
    std::lock_guard lock(mutex_);
    drainLocked();
  }
}

void BpfBlockSource::drainLocked() {
  int n = ring_buffer__consume(ring_.get());
  if (n < 0 && everythingReason_.empty())
    everythingReason_ = fmt::format("cannot read the BPF ring buffer: {}", std::strerror(-n));
}

int BpfBlockSource::onRecord(void* self, void* data, std::size_t size) {
  static_cast<BpfBlockSource*>(self)->fold(data, size);
  return 0;
}

void BpfBlockSource::fold(const void* data, std::size_t size) {
  ++stats_.records;
  if (size < sizeof(block_write_event)) {
    everythingReason_ = fmt::format("malformed BPF record of {} bytes", size);
    return;
  }
  block_write_event event;
  std::memcpy(&event, data, sizeof(event));
  if (event.flags & BLOCK_WRITE_UNKNOWN_RANGE) {
    ++stats_.unknownRanges;
    if (everythingReason_.empty()) everythingReason_ = describeUnknownReason(event.reason);
    return;
  }
  if (event.length == 0) return;
  std::uint64_t end = event.offset + event.length;
  if (end < event.offset || end > options_.maxImageBytes) {
    if (everythingReason_.empty())
      everythingReason_ = fmt::format("a write at offset {} of {} bytes lies beyond {} bytes",
                                      event.offset, event.length, options_.maxImageBytes);
    return;
  }
  markRange(event.offset, event.length);
  auto key = std::make_pair(event.offset, event.length);
  if (event.flags & BLOCK_WRITE_ISSUED) {
    ++stats_.issuedRequests;
    inFlight_[key].push_back(std::chrono::steady_clock::now());
    ++inFlightCount_;
  } else if (auto found = inFlight_.find(key); found != inFlight_.end()) {
    // The completion of the oldest request issued on this range. A partial
    // completion matches nothing; its request is then reported until it expires.
    found->second.pop_front();
    if (found->second.empty()) inFlight_.erase(found);
    --inFlightCount_;
  }
}

void BpfBlockSource::markRange(std::uint64_t offset, std::uint64_t length) {
  markUnits(offset / kUnitSize, (offset + length - 1) / kUnitSize);
}

void BpfBlockSource::markUnits(std::uint64_t first, std::uint64_t last) {
  std::size_t lastWord = static_cast<std::size_t>(last / 64);
  if (dirtyBits_.size() <= lastWord) dirtyBits_.resize(lastWord + 1, 0);
  for (std::uint64_t word = first / 64; word <= lastWord; ++word) {
    std::uint64_t lo = word == first / 64 ? first % 64 : 0;
    std::uint64_t hi = word == lastWord ? last % 64 : 63;
    std::uint64_t mask = (hi == 63 ? ~std::uint64_t{0} : ((std::uint64_t{1} << (hi + 1)) - 1)) &
                         ~((std::uint64_t{1} << lo) - 1);
    dirtyBits_[word] |= mask;
  }
}

DirtyUnits BpfBlockSource::harvest() {
  std::lock_guard lock(mutex_);
  drainLocked();

  // Records are made after the data landed, so a drop counted after the
  // drain above still shows up here or in the next harvest, before the
  // caller can have copied stale bytes for good.
  auto* bss = skeleton_->bss;
  std::uint64_t ringDrops = __atomic_load_n(&bss->ring_full_drops, __ATOMIC_ACQUIRE);
  std::uint64_t pendingDrops = __atomic_load_n(&bss->pending_full_drops, __ATOMIC_ACQUIRE);
  auto addReason = [this](std::string reason) {
    everythingReason_ =
        everythingReason_.empty() ? std::move(reason) : reason + "; " + everythingReason_;
  };
  if (ringDrops != seenRingFullDrops_) {
    addReason(fmt::format("{} BPF records lost: the {}-byte ring buffer was full",
                          ringDrops - seenRingFullDrops_, options_.ringBytes));
    seenRingFullDrops_ = ringDrops;
  }
  if (pendingDrops != seenPendingFullDrops_) {
    addReason(fmt::format("{} write calls untracked: the BPF per-thread table was full",
                          pendingDrops - seenPendingFullDrops_));
    seenPendingFullDrops_ = pendingDrops;
  }
  stats_.ringFullDrops = ringDrops;
  stats_.pendingFullDrops = pendingDrops;
  if (std::string skipped = checkSkippedRunsLocked(); !skipped.empty()) addReason(skipped);

  // Requests issued but not seen completing: their data may land after this
  // harvest, or may have landed with the completion record skipped. Report
  // them now and at every harvest until their completion or their expiry.
  const auto now = std::chrono::steady_clock::now();
  for (auto it = inFlight_.begin(); it != inFlight_.end();) {
    markRange(it->first.first, it->first.second);
    auto& issued = it->second;
    while (!issued.empty() && now - issued.front() > inFlightExpiry_) {
      issued.pop_front();
      --inFlightCount_;
      ++stats_.unseenCompletions;
    }
    it = issued.empty() ? inFlight_.erase(it) : std::next(it);
  }
  if (inFlightCount_ > options_.maxInFlight) {
    addReason(fmt::format("{} write requests issued without a completion seen (limit {})",
                          inFlightCount_, options_.maxInFlight));
    // The rescan covers what has landed. A request still in flight is then
    // covered by its completion record alone.
    inFlight_.clear();
    inFlightCount_ = 0;
  }
  stats_.inFlightRequests = inFlightCount_;

  DirtyUnits result;
  if (!everythingReason_.empty()) {
    result.everything = true;
    result.rescanReason = std::move(everythingReason_);
    everythingReason_.clear();
    std::fill(dirtyBits_.begin(), dirtyBits_.end(), 0);
    return result;
  }
  for (std::size_t word = 0; word < dirtyBits_.size(); ++word) {
    std::uint64_t bits = dirtyBits_[word];
    if (!bits) continue;
    dirtyBits_[word] = 0;
    while (bits) {
      result.units.push_back(word * 64 + static_cast<std::uint64_t>(std::countr_zero(bits)));
      bits &= bits - 1;
    }
  }
  return result;
}

std::string BpfBlockSource::checkSkippedRunsLocked() {
  std::uint64_t total = 0;
  for (ProgramSkips& program : programs_) {
    bpf_prog_info info{};
    std::uint32_t length = sizeof(info);
    if (int err = bpf_obj_get_info_by_fd(program.fd, &info, &length); err)
      return fmt::format("cannot read BPF program {}'s skip counter: {}", program.name,
                         std::strerror(-err));
    total += info.recursion_misses - program.seen;
    program.seen = info.recursion_misses;
  }
  stats_.skippedRuns += total;
  if (!total) return {};
  return fmt::format(
      "the kernel skipped the BPF programs {} times (a write traced while another was being "
      "traced on the same CPU)",
      total);
}

BpfBlockSourceStats BpfBlockSource::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

BpfBlockSourceProbe tryCreateBpfBlockSource(const BpfBlockSourceOptions& options) {
  BpfBlockSourceProbe probe;
  try {
    probe.source = std::make_unique<BpfBlockSource>(options);
  } catch (const Error& error) {
    probe.unavailableReason = error.what();
  } catch (const std::system_error& error) {  // std::thread
    probe.unavailableReason = fmt::format("cannot start the BPF drain thread: {}", error.what());
  }
  return probe;
}

}  // namespace vmsync
