// vmsync_powercut_fs: mounts a PowerCutFs (power_cut_fs.h) with FUSE and
// takes commands on a Unix socket, one line each, answered with one line:
//
//   cut        the power cut: everything not yet durable is gone, and every
//              change fails (EIO) until the power is back
//   restore    the power is back
//   unsynced   what a cut now would throw away
//
// Usage: vmsync_powercut_fs MOUNTPOINT CONTROL_SOCKET [SYNC_MS]
// SYNC_MS: each fsync takes that long, as on a phone's flash, which widens
// the window in which a cut finds a write not yet durable (0 by default).
// It serves until SIGTERM or SIGINT, then unmounts. The control socket exists
// only once the mount is up, so a caller can wait for it.
#define FUSE_USE_VERSION 35
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "power_cut_fs.h"

namespace {

using vmsync::testing::PowerCutAttr;
using vmsync::testing::PowerCutFs;
using vmsync::testing::PowerCutReport;
using vmsync::testing::PowerCutSetAttr;

PowerCutFs* fs(fuse_req_t req) { return static_cast<PowerCutFs*>(fuse_req_userdata(req)); }

struct stat toStat(const PowerCutAttr& a) {
  struct stat st {};
  st.st_ino = a.ino;
  st.st_mode = a.mode;
  st.st_nlink = a.nlink;
  st.st_size = static_cast<off_t>(a.size);
  st.st_blocks = static_cast<blkcnt_t>((a.size + 511) / 512);
  st.st_blksize = 4096;
  st.st_uid = a.uid;
  st.st_gid = a.gid;
  st.st_atim = a.atime;
  st.st_mtim = a.mtime;
  st.st_ctim = a.ctime;
  return st;
}

/// Lookups and attributes are never cached by the kernel: after a cut it must
/// ask again rather than show a name or a size the cut took away.
void replyEntry(fuse_req_t req, const PowerCutAttr& a) {
  fuse_entry_param e{};
  e.ino = a.ino;
  e.generation = 1;  // inode numbers are never reused
  e.attr = toStat(a);
  e.attr_timeout = 0;
  e.entry_timeout = 0;
  fuse_reply_entry(req, &e);
}

void replyStatus(fuse_req_t req, int rc) { fuse_reply_err(req, -rc); }

/// fi->fh of a regular file: whether its writes are durable at once.
constexpr std::uint64_t kSyncWrites = 1;

void doLookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  PowerCutAttr a;
  int rc = fs(req)->lookup(parent, name, &a);
  rc == 0 ? replyEntry(req, a) : replyStatus(req, rc);
}

void doForget(fuse_req_t req, fuse_ino_t, uint64_t) { fuse_reply_none(req); }
void doForgetMulti(fuse_req_t req, size_t, fuse_forget_data*) { fuse_reply_none(req); }

void doGetattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  PowerCutAttr a;
  int rc = fs(req)->getattr(ino, &a);
  if (rc != 0) return replyStatus(req, rc);
  struct stat st = toStat(a);
  fuse_reply_attr(req, &st, 0);
}

void doSetattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int toSet, fuse_file_info*) {
  PowerCutSetAttr change;
  if (toSet & FUSE_SET_ATTR_MODE) change.mode = attr->st_mode;
  if (toSet & FUSE_SET_ATTR_UID) change.uid = attr->st_uid;
  if (toSet & FUSE_SET_ATTR_GID) change.gid = attr->st_gid;
  if (toSet & FUSE_SET_ATTR_SIZE) change.size = static_cast<std::uint64_t>(attr->st_size);
  timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  if (toSet & FUSE_SET_ATTR_ATIME_NOW)
    change.atime = now;
  else if (toSet & FUSE_SET_ATTR_ATIME)
    change.atime = attr->st_atim;
  if (toSet & FUSE_SET_ATTR_MTIME_NOW)
    change.mtime = now;
  else if (toSet & FUSE_SET_ATTR_MTIME)
    change.mtime = attr->st_mtim;
  PowerCutAttr a;
  int rc = fs(req)->setattr(ino, change, &a);
  if (rc != 0) return replyStatus(req, rc);
  struct stat st = toStat(a);
  fuse_reply_attr(req, &st, 0);
}

void doMknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t) {
  const fuse_ctx* ctx = fuse_req_ctx(req);
  PowerCutAttr a;
  int rc = fs(req)->make(parent, name, (mode & S_IFMT) | (mode & 07777 & ~ctx->umask), ctx->uid,
                         ctx->gid, &a);
  rc == 0 ? replyEntry(req, a) : replyStatus(req, rc);
}

void doMkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  const fuse_ctx* ctx = fuse_req_ctx(req);
  PowerCutAttr a;
  int rc =
      fs(req)->make(parent, name, S_IFDIR | (mode & 07777 & ~ctx->umask), ctx->uid, ctx->gid, &a);
  rc == 0 ? replyEntry(req, a) : replyStatus(req, rc);
}

void doUnlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  replyStatus(req, fs(req)->unlink(parent, name));
}
void doRmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  replyStatus(req, fs(req)->rmdir(parent, name));
}

void doRename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newParent,
              const char* newName, unsigned flags) {
  replyStatus(req, fs(req)->rename(parent, name, newParent, newName, flags));
}

void doLink(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newParent, const char* newName) {
  PowerCutAttr a;
  int rc = fs(req)->link(ino, newParent, newName, &a);
  rc == 0 ? replyEntry(req, a) : replyStatus(req, rc);
}

void setHandle(fuse_file_info* fi) {
  fi->fh = (fi->flags & (O_SYNC | O_DSYNC)) ? kSyncWrites : 0;
  fi->keep_cache = 0;  // the page cache is dropped at open: a restarted process reads what survived
}

void doCreate(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
              fuse_file_info* fi) {
  const fuse_ctx* ctx = fuse_req_ctx(req);
  PowerCutAttr a;
  int rc =
      fs(req)->make(parent, name, S_IFREG | (mode & 07777 & ~ctx->umask), ctx->uid, ctx->gid, &a);
  if (rc == 0) rc = fs(req)->open(a.ino);
  if (rc != 0) return replyStatus(req, rc);
  setHandle(fi);
  fuse_entry_param e{};
  e.ino = a.ino;
  e.generation = 1;
  e.attr = toStat(a);
  fuse_reply_create(req, &e, fi);
}

void doOpen(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  int rc = fs(req)->open(ino);
  if (rc != 0) return replyStatus(req, rc);
  setHandle(fi);
  fuse_reply_open(req, fi);
}

void doRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, fuse_file_info*) {
  std::string data;
  int rc = fs(req)->read(ino, static_cast<std::uint64_t>(offset), size, &data);
  rc == 0 ? static_cast<void>(fuse_reply_buf(req, data.data(), data.size())) : replyStatus(req, rc);
}

void doWrite(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t offset,
             fuse_file_info* fi) {
  long n =
      fs(req)->write(ino, static_cast<std::uint64_t>(offset), {buf, size}, fi->fh & kSyncWrites);
  n < 0 ? replyStatus(req, static_cast<int>(n))
        : static_cast<void>(fuse_reply_write(req, static_cast<size_t>(n)));
}

void doFlush(fuse_req_t req, fuse_ino_t, fuse_file_info*) { fuse_reply_err(req, 0); }

void doRelease(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  fs(req)->release(ino);
  fuse_reply_err(req, 0);
}

/// How long an fsync takes; requests run on several threads, so only the
/// syncing caller waits. A cut while it waits makes it fail: the power went
/// before the flush completed, even if the caller died first.
std::chrono::milliseconds syncTime{0};

void doFsync(fuse_req_t req, fuse_ino_t ino, int, fuse_file_info*) {
  const std::uint64_t cuts = fs(req)->cuts();
  std::this_thread::sleep_for(syncTime);
  replyStatus(req, fs(req)->fsync(ino, cuts));
}
void doFsyncdir(fuse_req_t req, fuse_ino_t ino, int, fuse_file_info*) {
  const std::uint64_t cuts = fs(req)->cuts();
  std::this_thread::sleep_for(syncTime);
  replyStatus(req, fs(req)->fsyncdir(ino, cuts));
}

/// A directory listing is taken at opendir and served from there.
struct Listing {
  std::vector<std::pair<std::string, PowerCutAttr>> entries;
};

void doOpendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  auto listing = std::make_unique<Listing>();
  int rc = fs(req)->readdir(ino, &listing->entries);
  if (rc != 0) return replyStatus(req, rc);
  PowerCutAttr self;
  fs(req)->getattr(ino, &self);
  listing->entries.insert(listing->entries.begin(), {{".", self}, {"..", self}});
  fi->fh = reinterpret_cast<std::uint64_t>(listing.release());
  fuse_reply_open(req, fi);
}

void doReaddir(fuse_req_t req, fuse_ino_t, size_t size, off_t offset, fuse_file_info* fi) {
  const auto* listing = reinterpret_cast<const Listing*>(fi->fh);
  std::vector<char> buf(size);
  size_t used = 0;
  for (auto i = static_cast<size_t>(offset); i < listing->entries.size(); ++i) {
    const auto& [name, attr] = listing->entries[i];
    struct stat st = toStat(attr);
    size_t need = fuse_add_direntry(req, buf.data() + used, size - used, name.c_str(), &st,
                                    static_cast<off_t>(i + 1));
    if (need > size - used) break;
    used += need;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void doReleasedir(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  delete reinterpret_cast<Listing*>(fi->fh);
  fuse_reply_err(req, 0);
}

void doStatfs(fuse_req_t req, fuse_ino_t) {
  struct statvfs st {};
  st.f_bsize = st.f_frsize = 4096;
  st.f_blocks = st.f_bfree = st.f_bavail = 64ULL
                                           << 20;  // 256 GiB: held in memory, the test's own limit
  st.f_files = st.f_ffree = st.f_favail = 1ULL << 24;
  st.f_namemax = 255;
  fuse_reply_statfs(req, &st);
}

std::string joined(const std::vector<std::string>& paths) {
  std::string out;
  for (const auto& p : paths) out += (out.empty() ? "" : " ") + p;
  return out;
}

/// The control socket's answer (PowerCutMount parses it): one line, the
/// counts first, then the paths (names contain no newline here).
std::string answerLine(const PowerCutReport& r) {
  return std::to_string(r.namesUndone) + " names undone, " + std::to_string(r.filesReverted) +
         " files reverted, " + std::to_string(r.inodesDropped) +
         " inodes dropped; names: " + joined(r.namesUndoneAt) +
         "; files: " + joined(r.filesRevertedAt);
}

/// Answers control commands until the process ends.
void serveControl(int listener, PowerCutFs* fs) {
  for (;;) {
    int c = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) {
      if (errno == EINTR) continue;
      std::fprintf(stderr, "vmsync_powercut_fs: control socket: %s\n", std::strerror(errno));
      return;
    }
    char line[64] = {};
    ssize_t n = ::read(c, line, sizeof line - 1);
    std::string command(line, n > 0 ? static_cast<size_t>(n) : 0);
    while (!command.empty() && (command.back() == '\n' || command.back() == '\r'))
      command.pop_back();
    std::string answer;
    if (command == "cut") {
      answer = "cut: " + answerLine(fs->cut());
      std::fprintf(stderr, "vmsync_powercut_fs: power cut, %s\n", answer.c_str() + 5);
    } else if (command == "restore") {
      fs->restore();
      answer = "restored";
      std::fprintf(stderr, "vmsync_powercut_fs: power restored\n");
    } else if (command == "unsynced") {
      answer = "unsynced: " + answerLine(fs->unsynced());
    } else {
      answer = "error: unknown command '" + command + "' (cut, restore, unsynced)";
    }
    answer += '\n';
    (void)!::write(c, answer.data(), answer.size());
    ::close(c);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::fprintf(stderr, "usage: %s MOUNTPOINT CONTROL_SOCKET [SYNC_MS]\n", argv[0]);
    return 2;
  }
  if (argc == 4) {
    char* end = nullptr;
    const long ms = std::strtol(argv[3], &end, 10);
    if (*argv[3] == '\0' || *end != '\0' || ms < 0 || ms > 10000) {
      std::fprintf(stderr,
                   "vmsync_powercut_fs: SYNC_MS must be 0 to 10000 milliseconds, not '%s'\n",
                   argv[3]);
      return 2;
    }
    syncTime = std::chrono::milliseconds(ms);
  }
  const char* mountpoint = argv[1];
  const std::string control = argv[2];

  fuse_lowlevel_ops ops{};
  ops.lookup = doLookup;
  ops.forget = doForget;
  ops.forget_multi = doForgetMulti;
  ops.getattr = doGetattr;
  ops.setattr = doSetattr;
  ops.mknod = doMknod;
  ops.mkdir = doMkdir;
  ops.unlink = doUnlink;
  ops.rmdir = doRmdir;
  ops.rename = doRename;
  ops.link = doLink;
  ops.create = doCreate;
  ops.open = doOpen;
  ops.read = doRead;
  ops.write = doWrite;
  ops.flush = doFlush;
  ops.release = doRelease;
  ops.fsync = doFsync;
  ops.opendir = doOpendir;
  ops.readdir = doReaddir;
  ops.releasedir = doReleasedir;
  ops.fsyncdir = doFsyncdir;
  ops.statfs = doStatfs;

  PowerCutFs fs;
  std::vector<char*> args{
      argv[0], const_cast<char*>("-o"),
      const_cast<char*>("fsname=vmsync-powercut,subtype=vmsync-powercut,default_permissions")};
  fuse_args fuseArgs = FUSE_ARGS_INIT(static_cast<int>(args.size()), args.data());
  fuse_session* session = fuse_session_new(&fuseArgs, &ops, sizeof ops, &fs);
  if (session == nullptr) {
    std::fprintf(stderr, "vmsync_powercut_fs: cannot create a FUSE session\n");
    return 1;
  }
  if (fuse_set_signal_handlers(session) != 0 || fuse_session_mount(session, mountpoint) != 0) {
    std::fprintf(stderr, "vmsync_powercut_fs: cannot mount at %s (needs /dev/fuse and root)\n",
                 mountpoint);
    fuse_session_destroy(session);
    return 1;
  }

  int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (listener < 0 || control.size() >= sizeof addr.sun_path) {
    std::fprintf(stderr, "vmsync_powercut_fs: cannot make control socket %s\n", control.c_str());
    fuse_session_unmount(session);
    return 1;
  }
  std::memcpy(addr.sun_path, control.c_str(), control.size() + 1);
  ::unlink(control.c_str());
  const std::string ready = control + ".tmp";
  std::memcpy(addr.sun_path, ready.c_str(), ready.size() + 1);
  if (ready.size() >= sizeof addr.sun_path ||
      ::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(listener, 8) != 0 || ::rename(ready.c_str(), control.c_str()) != 0) {
    std::fprintf(stderr, "vmsync_powercut_fs: cannot listen on %s: %s\n", control.c_str(),
                 std::strerror(errno));
    fuse_session_unmount(session);
    return 1;
  }
  std::thread(serveControl, listener, &fs).detach();
  std::fprintf(stderr,
               "vmsync_powercut_fs: mounted at %s, control socket %s, fsync takes %lld ms\n",
               mountpoint, control.c_str(), static_cast<long long>(syncTime.count()));

  fuse_loop_config loop{};
  loop.clone_fd = 0;
  loop.max_idle_threads = 10;
  int rc = fuse_session_loop_mt(session, &loop);
  fuse_session_unmount(session);
  fuse_remove_signal_handlers(session);
  fuse_session_destroy(session);
  ::unlink(control.c_str());
  std::fprintf(stderr, "vmsync_powercut_fs: unmounted %s\n", mountpoint);
  return rc < 0 ? 1 : 0;
}
