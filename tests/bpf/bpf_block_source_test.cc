// Tests of the bpf block source (userspace/harvest/bpf_block_source.h).
//
// The invariant tests follow KVM's dirty_log_test: a writer process writes
// random ranges of a disk image while the test harvests in rounds; after each
// harvest the test scans the image, and every block whose content changed
// must be reported — by that harvest or, for a write that landed between the
// harvest and the scan, by the next one. The test also plays the pre-copy
// protocol (ship every reported block as scanned after the harvest) and checks
// that, once the writer has stopped, the shipped image equals the real one.
#include "harvest/bpf_block_source.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <thread>

#include "base/error.h"
#include "test_support.h"
#include "base/units.h"

namespace vmsync {
namespace {

using bpftest::hashBlocks;
using bpftest::LoopDevice;
using bpftest::ScratchImage;

constexpr std::uint64_t kImageBytes = 64 << 20;

// Creates `source` from `options`, or skips (fails under VMSYNC_REQUIRE_ALL=1).
#define CREATE_SOURCE_OR_SKIP(source, options)                                                \
  if (::geteuid() != 0) BPFTEST_SKIP_OR_FAIL("needs root to load BPF programs");              \
  auto source##Probe = tryCreateBpfBlockSource(options);                                      \
  if (!source##Probe.source)                                                                  \
    BPFTEST_SKIP_OR_FAIL("bpf block source unavailable: " + source##Probe.unavailableReason); \
  std::unique_ptr<BpfBlockSource> source = std::move(source##Probe.source)

volatile sig_atomic_t writerStop = 0;

// The writer child: waits for a byte on `goFd`, then writes random ranges
// until SIGTERM. `sectorAligned` (block device with O_DIRECT) keeps offsets,
// lengths and the buffer 512-byte aligned. Never returns.
[[noreturn]] void runWriter(int fd, int goFd, std::uint64_t bytes, bool sectorAligned,
                            std::chrono::microseconds pause, std::uint64_t seed) {
  struct sigaction action {};
  action.sa_handler = [](int) { writerStop = 1; };
  ::sigaction(SIGTERM, &action, nullptr);
  char go;
  if (::read(goFd, &go, 1) != 1) ::_exit(2);
  std::mt19937_64 random(seed);
  constexpr std::size_t kMaxLength = 32 * 512;
  void* memory = nullptr;
  if (::posix_memalign(&memory, 4096, kMaxLength)) ::_exit(3);
  auto* buffer = static_cast<std::uint64_t*>(memory);
  while (!writerStop) {
    std::uint64_t length, offset;
    if (sectorAligned) {
      length = 512 * (1 + random() % 32);
      offset = 512 * (random() % ((bytes - length) / 512 + 1));
    } else {
      length = 1 + random() % kMaxLength;
      offset = random() % (bytes - length + 1);
    }
    for (std::size_t i = 0; i < kMaxLength / 8; ++i) buffer[i] = random();
    ssize_t written;
    switch (sectorAligned ? 0 : random() % 3) {
      case 0:
        written = ::pwrite(fd, buffer, length, static_cast<off_t>(offset));
        break;
      case 1: {
        std::size_t half = length / 2;
        iovec parts[2] = {{buffer, half}, {reinterpret_cast<char*>(buffer) + half, length - half}};
        written = ::pwritev(fd, parts, 2, static_cast<off_t>(offset));
        break;
      }
      default: {
        iovec part = {buffer, length};
        written = ::pwritev2(fd, &part, 1, static_cast<off_t>(offset), 0);
        break;
      }
    }
    if (written != static_cast<ssize_t>(length)) ::_exit(4);
    if (pause.count()) ::usleep(static_cast<useconds_t>(pause.count()));
  }
  ::_exit(0);
}

// A writer child blocked until start(); stopped and reaped on destruction.
class Writer {
 public:
  Writer(int fd, std::uint64_t bytes, bool sectorAligned, std::chrono::microseconds pause) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC)) throwLastErrno("cannot create a pipe");
    pid_ = ::fork();
    if (pid_ < 0) throwLastErrno("cannot fork the writer");
    if (pid_ == 0) {
      ::close(fds[1]);
      runWriter(fd, fds[0], bytes, sectorAligned, pause, 1234);
    }
    ::close(fds[0]);
    goFd_ = fds[1];
  }
  ~Writer() {
    if (pid_ > 0) stop();
    if (goFd_ >= 0) ::close(goFd_);
  }
  pid_t pid() const { return pid_; }
  void start() { ASSERT_EQ(::write(goFd_, "g", 1), 1); }
  /// Stops the writer; returns its exit status (0: every write was whole).
  int stop() {
    int status = bpftest::stopChild(pid_);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
  int goFd_ = -1;
};

struct InvariantResult {
  int rounds = 0;
  int everythingRounds = 0;
  std::string firstRescanReason;
  std::uint64_t changedBlocks = 0;
  std::uint64_t reportedBlocks = 0;
};

// Plays `rounds` harvest/scan rounds against a running writer, then stops it
// and plays the final round. Adds a failure for every changed block that was
// not reported in time and for every block whose shipped copy is stale at the end.
InvariantResult checkInvariant(BpfBlockSource& source, const std::string& image, Writer& writer,
                               int rounds, std::chrono::milliseconds interval) {
  InvariantResult result;
  std::vector<std::uint64_t> previous = hashBlocks(image);  // the initial full copy
  std::vector<std::uint64_t> shipped = previous;
  const std::size_t blocks = previous.size();
  std::set<std::uint64_t> owed;  // changed, not reported yet: the next harvest must
  int failures = 0;

  auto playRound = [&](bool final) {
    DirtyUnits dirty = source.harvest();
    std::vector<std::uint64_t> now = hashBlocks(image);
    std::vector<bool> reported(blocks, dirty.everything);
    if (dirty.everything) {
      ++result.everythingRounds;
      if (result.firstRescanReason.empty()) result.firstRescanReason = dirty.rescanReason;
      EXPECT_FALSE(dirty.rescanReason.empty()) << "a rescan must say why";
    }
    for (std::uint64_t unit : dirty.units) {
      if (unit >= blocks) {
        ADD_FAILURE() << "reported block " << unit << " beyond the image's " << blocks;
        continue;
      }
      reported[unit] = true;
    }
    for (std::uint64_t unit : owed)
      if (!reported[unit] && failures++ < 20)
        ADD_FAILURE() << "round " << result.rounds << ": block " << unit
                      << " changed in the previous round and is still not reported";
    owed.clear();
    for (std::size_t unit = 0; unit < blocks; ++unit) {
      if (reported[unit]) {
        ++result.reportedBlocks;
        shipped[unit] = now[unit];
      }
      if (now[unit] != previous[unit]) {
        ++result.changedBlocks;
        if (!reported[unit]) {
          if (final && failures++ < 20)
            ADD_FAILURE() << "final round (writer stopped): block " << unit
                          << " changed but is not reported";
          owed.insert(unit);
        }
      }
    }
    previous = std::move(now);
    ++result.rounds;
  };

  writer.start();
  for (int round = 0; round < rounds; ++round) {
    std::this_thread::sleep_for(interval);
    playRound(false);
  }
  EXPECT_EQ(writer.stop(), 0) << "the writer failed a write";
  playRound(true);

  std::vector<std::uint64_t> final = hashBlocks(image);
  std::uint64_t stale = 0;
  for (std::size_t unit = 0; unit < blocks; ++unit)
    if (shipped[unit] != final[unit] && stale++ < 20)
      ADD_FAILURE() << "block " << unit << ": the shipped copy differs from the image";
  EXPECT_EQ(stale, 0u) << "the pre-copy replica does not match the image";
  return result;
}

std::set<std::uint64_t> unitSet(const DirtyUnits& dirty) {
  return {dirty.units.begin(), dirty.units.end()};
}

// --- No root needed: configuration errors say what is wrong. ---

TEST(BpfBlockSourceOptions, RejectsARingSizeThatIsNotAPowerOfTwo) {
  BpfBlockSourceOptions options;
  options.mode = BpfBlockSourceOptions::Mode::File;
  options.vmmPid = ::getpid();
  options.imageFd = 0;
  options.ringBytes = 10000;
  auto probe = tryCreateBpfBlockSource(options);
  EXPECT_EQ(probe.source, nullptr);
  EXPECT_NE(probe.unavailableReason.find("power of two"), std::string::npos)
      << probe.unavailableReason;
}

TEST(BpfBlockSourceOptions, RejectsAPathThatIsNotABlockDevice) {
  BpfBlockSourceOptions options;
  options.blockDevicePath = "/dev/null";
  auto probe = tryCreateBpfBlockSource(options);
  EXPECT_EQ(probe.source, nullptr);
  EXPECT_EQ(probe.unavailableReason, "/dev/null is not a block device");
}

// --- File mode: the VMM's pwrite family on the image fd. ---

class FileMode : public ::testing::Test {
 protected:
  void SetUp() override {
    image_ = std::make_unique<ScratchImage>(kImageBytes);
    fd_ = ::open(image_->path().c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd_, 0) << std::strerror(errno);
  }
  void TearDown() override {
    if (fd_ >= 0) ::close(fd_);
  }
  BpfBlockSourceOptions optionsFor(pid_t pid) const {
    BpfBlockSourceOptions options;
    options.mode = BpfBlockSourceOptions::Mode::File;
    options.vmmPid = pid;
    options.imageFd = fd_;
    return options;
  }
  std::unique_ptr<ScratchImage> image_;
  int fd_ = -1;
};

TEST_F(FileMode, ReportsExactlyTheBlocksAByteRangeTouches) {
  CREATE_SOURCE_OR_SKIP(source, optionsFor(::getpid()));
  char bytes[8192] = {1};
  ASSERT_EQ(::pwrite(fd_, bytes, 2, 4095), 2);        // units 0 and 1
  ASSERT_EQ(::pwrite(fd_, bytes, 4096, 8192), 4096);  // unit 2 only
  iovec parts[2] = {{bytes, 1}, {bytes, 4096}};
  ASSERT_EQ(::pwritev(fd_, parts, 2, 10 * 4096 + 4095), 4097);  // units 10, 11
  ASSERT_EQ(::pwritev2(fd_, parts, 1, 20 * 4096, 0), 1);        // unit 20
  DirtyUnits dirty = source->harvest();
  EXPECT_FALSE(dirty.everything) << dirty.rescanReason;
  EXPECT_EQ(unitSet(dirty), (std::set<std::uint64_t>{0, 1, 2, 10, 11, 20}));
  // Reset: nothing written since.
  dirty = source->harvest();
  EXPECT_FALSE(dirty.everything) << dirty.rescanReason;
  EXPECT_TRUE(dirty.units.empty());
}

TEST_F(FileMode, FindsTheImageFileDescriptorOfAProcess) {
  EXPECT_EQ(findFileDescriptor(::getpid(), image_->path()), fd_);
  int second = ::open(image_->path().c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(second, 0);
  EXPECT_THROW(findFileDescriptor(::getpid(), image_->path()), Error);
  ::close(second);
}

TEST_F(FileMode, IgnoresOtherFileDescriptors) {
  CREATE_SOURCE_OR_SKIP(source, optionsFor(::getpid()));
  int other = ::open(image_->path().c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(other, 0);
  char byte = 7;
  ASSERT_EQ(::pwrite(other, &byte, 1, 0), 1);
  ::close(other);
  DirtyUnits dirty = source->harvest();
  EXPECT_FALSE(dirty.everything) << dirty.rescanReason;
  EXPECT_TRUE(dirty.units.empty());
}

TEST_F(FileMode, AWriteAtTheFilePositionForcesARescan) {
  CREATE_SOURCE_OR_SKIP(source, optionsFor(::getpid()));
  char byte = 7;
  ASSERT_EQ(::write(fd_, &byte, 1), 1);
  DirtyUnits dirty = source->harvest();
  EXPECT_TRUE(dirty.everything);
  EXPECT_NE(dirty.rescanReason.find("write(2)"), std::string::npos) << dirty.rescanReason;
  dirty = source->harvest();
  EXPECT_FALSE(dirty.everything) << dirty.rescanReason;
}

TEST_F(FileMode, PunchingAHoleReportsItsRange) {
  CREATE_SOURCE_OR_SKIP(source, optionsFor(::getpid()));
  ASSERT_EQ(::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 3 * 4096 + 100, 4096), 0)
      << std::strerror(errno);
  DirtyUnits dirty = source->harvest();
  EXPECT_FALSE(dirty.everything) << dirty.rescanReason;
  EXPECT_EQ(unitSet(dirty), (std::set<std::uint64_t>{3, 4}));
}

TEST_F(FileMode, WritesAtAnUnknownOffsetForceARescan) {
  CREATE_SOURCE_OR_SKIP(source, optionsFor(::getpid()));
  char byte = 7;
  iovec part = {&byte, 1};
  ASSERT_EQ(::pwritev2(fd_, &part, 1, -1, 0), 1);  // at the file position
  DirtyUnits dirty = source->harvest();
  EXPECT_TRUE(dirty.everything);
  EXPECT_NE(dirty.rescanReason.find("pwritev2"), std::string::npos) << dirty.rescanReason;

  ASSERT_EQ(::ftruncate(fd_, static_cast<off_t>(kImageBytes)), 0);
  dirty = source->harvest();
  EXPECT_TRUE(dirty.everything);
  EXPECT_NE(dirty.rescanReason.find("truncated"), std::string::npos) << dirty.rescanReason;

  dirty = source->harvest();
  EXPECT_FALSE(dirty.everything) << dirty.rescanReason;
}

TEST_F(FileMode, EveryChangedBlockIsReported) {
  Writer writer(fd_, kImageBytes, false, std::chrono::microseconds(200));
  CREATE_SOURCE_OR_SKIP(source, optionsFor(writer.pid()));
  InvariantResult result =
      checkInvariant(*source, image_->path(), writer, 40, std::chrono::milliseconds(20));
  EXPECT_EQ(result.everythingRounds, 0) << result.firstRescanReason;
  EXPECT_GT(result.changedBlocks, 0u) << "the writer changed nothing: the test proves nothing";
  RecordProperty("changed_blocks", std::to_string(result.changedBlocks));
  RecordProperty("reported_blocks", std::to_string(result.reportedBlocks));
}

TEST_F(FileMode, AFullRingTurnsTheRoundIntoARescanAndDigestsStillMatch) {
  Writer writer(fd_, kImageBytes, false, std::chrono::microseconds(0));
  BpfBlockSourceOptions options = optionsFor(writer.pid());
  options.ringBytes = 4096;
  options.drainInBackground = false;
  CREATE_SOURCE_OR_SKIP(source, options);
  InvariantResult result =
      checkInvariant(*source, image_->path(), writer, 10, std::chrono::milliseconds(20));
  EXPECT_GT(result.everythingRounds, 0) << "the tiny ring never filled";
  EXPECT_NE(result.firstRescanReason.find("ring buffer was full"), std::string::npos)
      << result.firstRescanReason;
  EXPECT_GT(source->stats().ringFullDrops, 0u);
}

// --- Block device mode: a loop device over the image. ---

class BlockDeviceMode : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) BPFTEST_SKIP_OR_FAIL("needs root to set up a loop device");
    image_ = std::make_unique<ScratchImage>(kImageBytes);
    try {
      loop_ = std::make_unique<LoopDevice>(image_->path());
    } catch (const Error& error) {
      BPFTEST_SKIP_OR_FAIL(error.what());
    }
    fd_ = ::open(loop_->path().c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
    ASSERT_GE(fd_, 0) << "cannot open " << loop_->path() << ": " << std::strerror(errno);
  }
  void TearDown() override {
    if (fd_ >= 0) ::close(fd_);
    loop_.reset();
  }
  BpfBlockSourceOptions options() const {
    BpfBlockSourceOptions options;
    options.blockDevicePath = loop_->path();
    return options;
  }
  std::unique_ptr<ScratchImage> image_;
  std::unique_ptr<LoopDevice> loop_;
  int fd_ = -1;
};

TEST_F(BlockDeviceMode, ReportsExactlyTheBlocksASectorRangeTouches) {
  CREATE_SOURCE_OR_SKIP(source, options());
  void* memory = nullptr;
  ASSERT_EQ(::posix_memalign(&memory, 4096, 8192), 0);
  std::unique_ptr<void, decltype(&std::free)> buffer(memory, &std::free);
  std::memset(memory, 0x5a, 8192);
  ASSERT_EQ(::pwrite(fd_, memory, 1024, 7 * 512), 1024);   // sectors 7, 8: units 0, 1
  ASSERT_EQ(::pwrite(fd_, memory, 4096, 16 * 512), 4096);  // sectors 16..23: unit 2
  ASSERT_EQ(::pwrite(fd_, memory, 512, 81 * 512), 512);    // sector 81: unit 10
  DirtyUnits dirty = source->harvest();
  EXPECT_FALSE(dirty.everything) << dirty.rescanReason;
  EXPECT_EQ(unitSet(dirty), (std::set<std::uint64_t>{0, 1, 2, 10}));
  dirty = source->harvest();
  EXPECT_FALSE(dirty.everything) << dirty.rescanReason;
  EXPECT_TRUE(dirty.units.empty());
}

TEST_F(BlockDeviceMode, EveryChangedBlockIsReported) {
  Writer writer(fd_, kImageBytes, true, std::chrono::microseconds(200));
  CREATE_SOURCE_OR_SKIP(source, options());
  InvariantResult result =
      checkInvariant(*source, image_->path(), writer, 40, std::chrono::milliseconds(20));
  EXPECT_EQ(result.everythingRounds, 0) << result.firstRescanReason;
  EXPECT_GT(result.changedBlocks, 0u) << "the writer changed nothing: the test proves nothing";
  // Completions the kernel skipped without a word; their issue records
  // covered them (see bpf_block_source.h).
  RecordProperty("issued_requests", std::to_string(source->stats().issuedRequests));
  RecordProperty("in_flight_at_end", std::to_string(source->stats().inFlightRequests));
}

TEST_F(BlockDeviceMode, AFullRingTurnsTheRoundIntoARescanAndDigestsStillMatch) {
  Writer writer(fd_, kImageBytes, true, std::chrono::microseconds(0));
  BpfBlockSourceOptions options = this->options();
  options.ringBytes = 4096;
  options.drainInBackground = false;
  CREATE_SOURCE_OR_SKIP(source, options);
  InvariantResult result =
      checkInvariant(*source, image_->path(), writer, 10, std::chrono::milliseconds(50));
  EXPECT_GT(result.everythingRounds, 0) << "the tiny ring never filled";
  EXPECT_NE(result.firstRescanReason.find("ring buffer was full"), std::string::npos)
      << result.firstRescanReason;
}

}  // namespace
}  // namespace vmsync
