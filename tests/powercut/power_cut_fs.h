// A file system held in memory that knows which of its state a power cut
// would keep: what a process wrote is visible at once, but only what it made
// durable survives cut(). The rules are the strict ones a careful program
// must assume of a local file system:
//
//   - a file's data and size are durable as of its last fsync/fdatasync (or
//     a write through a descriptor opened O_SYNC/O_DSYNC);
//   - a name (create, mkdir, link, unlink, rmdir, rename) is durable once the
//     directory holding it was fsynced; a rename across directories needs
//     both, each side on its own;
//   - attributes other than the size (mode, owner, times) are kept as set.
//
// So a cut can leave an empty file under a name that was synced before the
// data, bring back a name that was unlinked or renamed away, and lose a name
// whose file was synced. The FUSE front end (power_cut_fuse.cc) serves it;
// the tests cut the power under the sync server and a standby with it.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace vmsync::testing {

/// What stat() shows of an inode.
struct PowerCutAttr {
  std::uint64_t ino = 0;
  mode_t mode = 0;
  nlink_t nlink = 0;
  std::uint64_t size = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  timespec atime{}, mtime{}, ctime{};
};

/// What setattr changes: only the fields that are set.
struct PowerCutSetAttr {
  std::optional<mode_t> mode;
  std::optional<uid_t> uid;
  std::optional<gid_t> gid;
  std::optional<std::uint64_t> size;
  std::optional<timespec> atime, mtime;
};

/// What a cut threw away.
struct PowerCutReport {
  std::uint64_t namesUndone =
      0;  // directory entries added, removed or retargeted since the last fsync of their directory
  std::uint64_t filesReverted = 0;  // files whose data or size changed since their last fsync
  std::uint64_t inodesDropped = 0;  // files and directories no durable name reaches
  /// Paths (from the root of the mount) of the names undone and the files
  /// reverted, the first few of each, to say what a program left unsynced.
  std::vector<std::string> namesUndoneAt, filesRevertedAt;
};

/// The report for people: "N names undone, M files reverted", then ", name
/// PATH" and ", data PATH" for the paths it lists.
std::string describe(const PowerCutReport& report);

/// The file system. Every method is safe to call from several threads; the
/// ones that can fail return 0 or a negative errno, as the kernel wants it.
class PowerCutFs {
 public:
  static constexpr std::uint64_t kRootIno = 1;  // FUSE_ROOT_ID

  PowerCutFs();
  ~PowerCutFs();
  PowerCutFs(const PowerCutFs&) = delete;
  PowerCutFs& operator=(const PowerCutFs&) = delete;

  int lookup(std::uint64_t parent, const std::string& name, PowerCutAttr* out);
  int getattr(std::uint64_t ino, PowerCutAttr* out);
  int setattr(std::uint64_t ino, const PowerCutSetAttr& change, PowerCutAttr* out);
  /// Makes a regular file (`mode` carries S_IFREG), a directory (S_IFDIR), or
  /// a socket or FIFO (S_IFSOCK, S_IFIFO: a name and no data).
  int make(std::uint64_t parent, const std::string& name, mode_t mode, uid_t uid, gid_t gid,
           PowerCutAttr* out);
  int link(std::uint64_t ino, std::uint64_t newParent, const std::string& newName,
           PowerCutAttr* out);
  int unlink(std::uint64_t parent, const std::string& name);
  int rmdir(std::uint64_t parent, const std::string& name);
  /// `flags`: 0 or RENAME_NOREPLACE; RENAME_EXCHANGE and others give -EINVAL.
  int rename(std::uint64_t parent, const std::string& name, std::uint64_t newParent,
             const std::string& newName, unsigned flags);
  /// Entries of a directory, "." and ".." not included.
  int readdir(std::uint64_t ino, std::vector<std::pair<std::string, PowerCutAttr>>* out);

  /// Reads up to `size` bytes at `offset` into `out` (fewer at the end of the file).
  int read(std::uint64_t ino, std::uint64_t offset, std::size_t size, std::string* out);
  /// Writes `data` at `offset`; `sync` makes it durable at once (O_SYNC).
  /// Returns the bytes written or a negative errno.
  long write(std::uint64_t ino, std::uint64_t offset, std::span<const char> data, bool sync);
  /// With `cutsSeen` (what cuts() said as the sync began): a sync the power
  /// cut interrupted makes nothing durable and gives -EIO.
  int fsync(std::uint64_t ino, std::optional<std::uint64_t> cutsSeen = std::nullopt);
  int fsyncdir(std::uint64_t ino, std::optional<std::uint64_t> cutsSeen = std::nullopt);
  /// How many cuts there were.
  std::uint64_t cuts() const;

  /// An open descriptor keeps an unlinked file's data until it is released.
  int open(std::uint64_t ino);
  void release(std::uint64_t ino);

  /// The power cut: every file back to its durable data and size, every
  /// directory to its durable entries, and what no durable name reaches gone.
  /// Until restore(), every change fails with -EIO (what processes still
  /// running do after the instant of the cut never reaches the disk), and so
  /// does a sync that was under way.
  PowerCutReport cut();
  /// The power is back.
  void restore();

  /// What a cut now would throw away, without cutting.
  PowerCutReport unsynced() const;

 private:
  struct Inode;
  Inode* find(std::uint64_t ino) const;
  Inode* child(const Inode& dir, const std::string& name) const;
  PowerCutAttr attrOf(const Inode& inode) const;
  void dropLink(Inode& inode);
  void forgetIfUnreferenced(Inode& inode);
  void setSize(Inode& inode, std::uint64_t size);
  PowerCutReport unsyncedLocked() const;

  mutable std::mutex mutex_;
  std::map<std::uint64_t, std::unique_ptr<Inode>> inodes_;
  std::uint64_t nextIno_ = kRootIno + 1;
  std::uint64_t cuts_ = 0;
  bool off_ = false;  // cut and not restored
};

}  // namespace vmsync::testing
