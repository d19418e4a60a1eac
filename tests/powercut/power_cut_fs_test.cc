// The power-cut file system keeps exactly what a careful program made durable:
// first the model's rules one by one, then the mounted file system through
// real system calls, with the checkpoint store's own commit protocol.
#include "power_cut_fs.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/fs.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "base/durable_file.h"
#include "checkpoint/checkpoint_record.h"
#include "power_cut_mount.h"

namespace vmsync::testing {
namespace {

constexpr std::uint64_t kRoot = PowerCutFs::kRootIno;

class Model : public ::testing::Test {
 protected:
  std::uint64_t make(const std::string& name, std::uint64_t parent = kRoot,
                     mode_t mode = S_IFREG | 0600) {
    PowerCutAttr a;
    EXPECT_EQ(fs.make(parent, name, mode, 0, 0, &a), 0) << name;
    return a.ino;
  }
  void write(std::uint64_t ino, std::uint64_t offset, const std::string& text, bool sync = false) {
    EXPECT_EQ(fs.write(ino, offset, {text.data(), text.size()}, sync),
              static_cast<long>(text.size()));
  }
  std::string read(std::uint64_t ino, std::uint64_t offset = 0, std::size_t size = 1 << 20) {
    std::string out;
    EXPECT_EQ(fs.read(ino, offset, size, &out), 0);
    return out;
  }
  /// The inode `name` names in `parent` now, or 0.
  std::uint64_t named(const std::string& name, std::uint64_t parent = kRoot) {
    PowerCutAttr a;
    return fs.lookup(parent, name, &a) == 0 ? a.ino : 0;
  }

  PowerCutFs fs;
};

TEST_F(Model, AFileNeitherItNorItsDirectorySyncedIsGone) {
  std::uint64_t f = make("a");
  write(f, 0, "hello");
  EXPECT_EQ(read(f), "hello");  // visible before the cut
  PowerCutReport r = fs.cut();
  EXPECT_EQ(r.namesUndone, 1u);
  EXPECT_EQ(r.filesReverted, 1u);
  EXPECT_EQ(r.inodesDropped, 1u);
  EXPECT_EQ(named("a"), 0u);
}

TEST_F(Model, ASyncedFileWhoseDirectoryWasNotSyncedLosesItsName) {
  std::uint64_t f = make("a");
  write(f, 0, "hello");
  ASSERT_EQ(fs.fsync(f), 0);
  EXPECT_EQ(fs.cut().namesUndone, 1u);
  EXPECT_EQ(named("a"), 0u);
}

TEST_F(Model, ANameSyncedBeforeItsDataLeavesAnEmptyFile) {
  std::uint64_t f = make("a");
  ASSERT_EQ(fs.fsyncdir(kRoot), 0);
  write(f, 0, "hello");
  EXPECT_EQ(fs.cut().filesReverted, 1u);
  ASSERT_EQ(named("a"), f);
  PowerCutAttr a;
  ASSERT_EQ(fs.getattr(f, &a), 0);
  EXPECT_EQ(a.size, 0u);
}

TEST_F(Model, AnOverwriteAfterTheLastSyncIsRolledBack) {
  std::uint64_t f = make("a");
  write(f, 0, "old data");
  ASSERT_EQ(fs.fsync(f), 0);
  ASSERT_EQ(fs.fsyncdir(kRoot), 0);
  EXPECT_EQ(fs.unsynced().filesReverted, 0u);
  write(f, 0, "NEW");
  write(f, 200000, "far");  // another chunk, past the end
  EXPECT_EQ(read(f, 0, 8), "NEW data");
  PowerCutReport r = fs.cut();
  EXPECT_EQ(r.filesReverted, 1u);
  EXPECT_EQ(r.namesUndone, 0u);
  EXPECT_EQ(read(f), "old data");
}

TEST_F(Model, AWriteThroughASyncDescriptorIsDurableAtOnce) {
  std::uint64_t f = make("a");
  ASSERT_EQ(fs.fsyncdir(kRoot), 0);
  write(f, 0, "synced", /*sync=*/true);
  EXPECT_EQ(fs.cut().filesReverted, 0u);
  EXPECT_EQ(read(f), "synced");
}

TEST_F(Model, ARenameNotSyncedIsUndoneAndTheOldNameComesBack) {
  std::uint64_t f = make("record.tmp");
  write(f, 0, "payload");
  ASSERT_EQ(fs.fsync(f), 0);
  ASSERT_EQ(fs.fsyncdir(kRoot), 0);
  ASSERT_EQ(fs.rename(kRoot, "record.tmp", kRoot, "record", 0), 0);
  EXPECT_EQ(named("record"), f);
  const PowerCutReport r = fs.cut();
  EXPECT_EQ(r.namesUndone, 2u);  // "record" added, "record.tmp" removed
  EXPECT_EQ(r.namesUndoneAt, (std::vector<std::string>{"/record", "/record.tmp"}));
  EXPECT_EQ(named("record"), 0u);
  EXPECT_EQ(named("record.tmp"), f);
  EXPECT_EQ(read(f), "payload");
}

TEST_F(Model, ARenameAcrossDirectoriesIsDurableOnEachSideOnItsOwn) {
  std::uint64_t from = make("from", kRoot, S_IFDIR | 0700);
  std::uint64_t to = make("to", kRoot, S_IFDIR | 0700);
  std::uint64_t f = make("f", from);
  ASSERT_EQ(fs.fsync(f), 0);
  ASSERT_EQ(fs.fsyncdir(from), 0);
  ASSERT_EQ(fs.fsyncdir(kRoot), 0);
  ASSERT_EQ(fs.rename(from, "f", to, "g", 0), 0);
  ASSERT_EQ(fs.fsyncdir(to), 0);  // the new name is durable, the removal of the old one is not
  fs.cut();
  EXPECT_EQ(named("g", to), f);
  EXPECT_EQ(named("f", from), f);
}

TEST_F(Model, AnUnlinkNotSyncedComesBackAndASyncedOneStaysGone) {
  std::uint64_t a = make("a");
  std::uint64_t b = make("b");
  write(a, 0, "A", true);
  write(b, 0, "B", true);
  ASSERT_EQ(fs.fsyncdir(kRoot), 0);
  ASSERT_EQ(fs.unlink(kRoot, "a"), 0);
  ASSERT_EQ(fs.fsyncdir(kRoot), 0);
  ASSERT_EQ(fs.unlink(kRoot, "b"), 0);
  EXPECT_EQ(named("b"), 0u);
  fs.cut();
  EXPECT_EQ(named("a"), 0u);
  EXPECT_EQ(named("b"), b);
  EXPECT_EQ(read(b), "B");
}

TEST_F(Model, ATruncateIsRolledBackToTheSyncedSizeAndBytes) {
  std::uint64_t f = make("a");
  write(f, 0, std::string(70000, 'x'), true);
  ASSERT_EQ(fs.fsyncdir(kRoot), 0);
  PowerCutAttr a;
  PowerCutSetAttr shrink;
  shrink.size = 10;
  ASSERT_EQ(fs.setattr(f, shrink, &a), 0);
  PowerCutSetAttr grow;
  grow.size = 70000;
  ASSERT_EQ(fs.setattr(f, grow, &a), 0);
  EXPECT_EQ(read(f, 10, 5), std::string(5, '\0'));  // the cut tail reads as zeros
  fs.cut();
  EXPECT_EQ(read(f), std::string(70000, 'x'));
}

TEST_F(Model, AnOpenUnlinkedFileKeepsItsDataUntilReleased) {
  std::uint64_t f = make("a");
  write(f, 0, "still here");
  ASSERT_EQ(fs.open(f), 0);
  ASSERT_EQ(fs.unlink(kRoot, "a"), 0);
  EXPECT_EQ(read(f), "still here");
  fs.release(f);
  std::string out;
  EXPECT_EQ(fs.read(f, 0, 10, &out), -ESTALE);
}

TEST_F(Model, ASyncThePowerCutInterruptedMakesNothingDurable) {
  std::uint64_t f = make("a");
  ASSERT_EQ(fs.fsyncdir(kRoot), 0);
  write(f, 0, "lost");
  const std::uint64_t seen = fs.cuts();  // the sync begins...
  fs.cut();                              // ...the power goes...
  EXPECT_EQ(fs.fsync(f, seen), -EIO);    // ...and it never completes,
  fs.restore();
  EXPECT_EQ(fs.fsync(f, seen), -EIO);    // not even once the power is back
  EXPECT_EQ(fs.fsync(f, fs.cuts()), 0);  // one begun after the cut does
  EXPECT_EQ(read(f), "");
}

TEST_F(Model, AfterTheCutEveryChangeFailsUntilThePowerIsBack) {
  std::uint64_t f = make("a");
  ASSERT_EQ(fs.fsyncdir(kRoot), 0);
  fs.cut();
  PowerCutAttr a;
  EXPECT_EQ(fs.write(f, 0, {"x", 1}, false), -EIO);
  EXPECT_EQ(fs.make(kRoot, "b", S_IFREG | 0600, 0, 0, &a), -EIO);
  EXPECT_EQ(fs.rename(kRoot, "a", kRoot, "c", 0), -EIO);
  EXPECT_EQ(fs.unlink(kRoot, "a"), -EIO);
  EXPECT_EQ(fs.fsyncdir(kRoot), -EIO);
  EXPECT_EQ(read(f), "");  // reading what survived works
  fs.restore();
  write(f, 0, "back");
  EXPECT_EQ(read(f), "back");
}

TEST_F(Model, RenameRefusesWhatTheKernelWouldRefuse) {
  std::uint64_t d = make("d", kRoot, S_IFDIR | 0700);
  make("inside", d);
  make("e", kRoot, S_IFDIR | 0700);
  make("f");
  EXPECT_EQ(fs.rename(kRoot, "f", kRoot, "d", RENAME_NOREPLACE), -EEXIST);
  EXPECT_EQ(fs.rename(kRoot, "e", kRoot, "d", 0), -ENOTEMPTY);
  EXPECT_EQ(fs.rename(kRoot, "f", kRoot, "e", 0), -EISDIR);
  EXPECT_EQ(fs.rename(kRoot, "e", kRoot, "f", 0), -ENOTDIR);
  EXPECT_EQ(fs.rename(kRoot, "e", kRoot, "f", RENAME_EXCHANGE), -EINVAL);
  EXPECT_EQ(fs.rename(kRoot, "missing", kRoot, "x", 0), -ENOENT);
  EXPECT_EQ(fs.rmdir(kRoot, "d"), -ENOTEMPTY);
  PowerCutAttr a;
  EXPECT_EQ(fs.make(kRoot, "f", S_IFREG | 0600, 0, 0, &a), -EEXIST);
  EXPECT_EQ(fs.make(kRoot, "device", S_IFCHR | 0600, 0, 0, &a), -EPERM);
}

/// The mounted file system, through the kernel.
class Mounted : public ::testing::Test {
 protected:
  void SetUp() override {
    mount = std::make_unique<PowerCutMount>(dir.path() + "/mnt");
    if (!mount->missing().empty()) VMSYNC_SKIP_OR_FAIL(mount->missing());
  }
  TempDir dir;
  std::unique_ptr<PowerCutMount> mount;
};

TEST_F(Mounted, AFileWrittenWithoutSyncIsGoneAfterTheCut) {
  const std::string path = mount->path() + "/plain";
  std::ofstream(path) << "written, never synced";
  ASSERT_EQ(readFile(path), "written, never synced");
  PowerCutReport r = mount->cut();
  EXPECT_EQ(r.namesUndone, 1u);
  EXPECT_EQ(r.filesRevertedAt, std::vector<std::string>{"/plain"});
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST_F(Mounted, ARecordCommittedByTheStoreProtocolSurvivesAndItsTemporaryDoesNot) {
  const std::string path = mount->path() + "/record";
  const std::string text(100000, 'r');
  writeRecordFile(path, std::as_bytes(std::span(text.data(), text.size())));
  // An overwrite of another file, synced but its name not: the cut must take it.
  const std::string other = mount->path() + "/other";
  int fd = ::open(other.c_str(), O_WRONLY | O_CREAT, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::write(fd, "x", 1), 1);
  ASSERT_EQ(::fsync(fd), 0);
  ::close(fd);
  PowerCutReport r = mount->cut();
  EXPECT_EQ(r.namesUndone, 1u) << "only 'other' was not durable";
  std::string why;
  auto words = readRecordFile(path, why);
  ASSERT_TRUE(words != nullptr) << why;
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  EXPECT_FALSE(std::filesystem::exists(other));
}

TEST_F(Mounted, AWriteAfterTheCutFailsUntilThePowerIsBack) {
  const std::string path = mount->path() + "/late";
  writeFileDurably(path, "v1", 2);
  int fd = ::open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  mount->cut();
  EXPECT_EQ(::pwrite(fd, "v2", 2, 0),
            -1);  // the process outlived the power: nothing it writes lands
  EXPECT_EQ(errno, EIO);
  ::close(fd);
  mount->restore();
  EXPECT_EQ(readFile(path), "v1");
  writeFileDurably(path, "v3", 2);
  EXPECT_EQ(readFile(path), "v3");
}

TEST_F(Mounted, ARenameWithoutTheDirectorySyncIsUndone) {
  const std::string tmp = mount->path() + "/state.tmp";
  writeFileDurably(tmp, "v1", 2);  // durable, name and all
  ASSERT_EQ(::rename(tmp.c_str(), (mount->path() + "/state").c_str()), 0);
  ASSERT_TRUE(std::filesystem::exists(mount->path() + "/state"));
  EXPECT_EQ(mount->cut().namesUndone, 2u);
  EXPECT_FALSE(std::filesystem::exists(mount->path() + "/state"));
  EXPECT_EQ(readFile(tmp), "v1");
}

TEST_F(Mounted, AUnixSocketBindsThereAsQemuMonitorsDo) {
  const std::string path = mount->path() + "/qmp.sock";
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << std::strerror(errno);
  ::close(fd);
  EXPECT_TRUE(std::filesystem::is_socket(path));
}

}  // namespace
}  // namespace vmsync::testing
