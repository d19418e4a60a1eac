#include "power_cut_fs.h"

#include <errno.h>
#include <linux/fs.h>
#include <time.h>

#include <algorithm>
#include <cstring>
#include <set>

namespace vmsync::testing {

namespace {

/// File data lives in chunks shared between the visible and the durable
/// version of a file until a write copies the one it changes.
constexpr std::uint64_t kChunkBytes = 64 * 1024;
using Chunk = std::vector<char>;
using ChunkMap = std::map<std::uint64_t, std::shared_ptr<Chunk>>;
using Entries = std::map<std::string, std::uint64_t>;

timespec now() {
  timespec t{};
  ::clock_gettime(CLOCK_REALTIME, &t);
  return t;
}

/// How many paths a report lists of each kind.
constexpr std::size_t kPathsReported = 8;

void note(std::vector<std::string>& paths, const std::string& path) {
  if (paths.size() < kPathsReported) paths.push_back(path);
}

/// Names present in one map and not the other, or present in both for
/// different inodes; each noted as `dir` + "/" + name.
std::uint64_t differences(const Entries& a, const Entries& b, const std::string& dir,
                          std::vector<std::string>& paths) {
  std::uint64_t count = 0;
  for (const auto& [name, ino] : a) {
    auto it = b.find(name);
    if (it == b.end() || it->second != ino) {
      ++count;
      note(paths, dir + "/" + name);
    }
  }
  for (const auto& [name, ino] : b)
    if (!a.contains(name)) {
      ++count;
      note(paths, dir + "/" + name);
    }
  return count;
}

int checkName(const std::string& name) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
    return -EINVAL;
  if (name.size() > 255) return -ENAMETOOLONG;
  return 0;
}

}  // namespace

std::string describe(const PowerCutReport& report) {
  std::string text = std::to_string(report.namesUndone) + " names undone, " +
                     std::to_string(report.filesReverted) + " files reverted";
  for (const auto& p : report.namesUndoneAt) text += ", name " + p;
  for (const auto& p : report.filesRevertedAt) text += ", data " + p;
  return text;
}

struct PowerCutFs::Inode {
  std::uint64_t ino = 0;
  mode_t mode = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  timespec atime{}, mtime{}, ctime{};
  // A regular file: what readers see, and what a cut would leave.
  ChunkMap data, durableData;
  std::uint64_t size = 0, durableSize = 0;
  bool dataChanged = false;  // since the last fsync
  // A directory: the same for its names.
  Entries entries, durableEntries;
  // References: names in visible and in durable entries, open descriptors.
  std::uint32_t links = 0, durableLinks = 0, opens = 0;

  bool isDirectory() const { return S_ISDIR(mode); }
};

PowerCutFs::PowerCutFs() {
  auto root = std::make_unique<Inode>();
  root->ino = kRootIno;
  root->mode = S_IFDIR | 0755;
  root->atime = root->mtime = root->ctime = now();
  inodes_.emplace(kRootIno, std::move(root));
}

PowerCutFs::~PowerCutFs() = default;

PowerCutFs::Inode* PowerCutFs::find(std::uint64_t ino) const {
  auto it = inodes_.find(ino);
  return it == inodes_.end() ? nullptr : it->second.get();
}

PowerCutFs::Inode* PowerCutFs::child(const Inode& dir, const std::string& name) const {
  auto it = dir.entries.find(name);
  return it == dir.entries.end() ? nullptr : find(it->second);
}

PowerCutAttr PowerCutFs::attrOf(const Inode& inode) const {
  PowerCutAttr a;
  a.ino = inode.ino;
  a.mode = inode.mode;
  a.nlink = inode.isDirectory() ? 2 : inode.links;
  a.size = inode.isDirectory() ? 4096 : inode.size;
  a.uid = inode.uid;
  a.gid = inode.gid;
  a.atime = inode.atime;
  a.mtime = inode.mtime;
  a.ctime = inode.ctime;
  return a;
}

void PowerCutFs::dropLink(Inode& inode) {
  if (inode.links > 0) --inode.links;
  inode.ctime = now();
  forgetIfUnreferenced(inode);
}

void PowerCutFs::forgetIfUnreferenced(Inode& inode) {
  if (inode.ino == kRootIno || inode.links > 0 || inode.durableLinks > 0 || inode.opens > 0) return;
  // Nothing names it, now or after a cut: its durable names of others go too.
  std::vector<std::uint64_t> released;
  for (const auto& [name, ino] : inode.durableEntries) released.push_back(ino);
  inodes_.erase(inode.ino);
  for (std::uint64_t ino : released)
    if (Inode* c = find(ino)) {
      if (c->durableLinks > 0) --c->durableLinks;
      forgetIfUnreferenced(*c);
    }
}

void PowerCutFs::setSize(Inode& inode, std::uint64_t size) {
  if (size < inode.size) {
    // Chunks past the end go; the tail of the last one reads as zeros again.
    inode.data.erase(inode.data.lower_bound((size + kChunkBytes - 1) / kChunkBytes),
                     inode.data.end());
    if (size % kChunkBytes != 0) {
      auto it = inode.data.find(size / kChunkBytes);
      if (it != inode.data.end()) {
        if (it->second.use_count() > 1) it->second = std::make_shared<Chunk>(*it->second);
        std::fill(it->second->begin() + static_cast<long>(size % kChunkBytes), it->second->end(),
                  0);
      }
    }
  }
  if (size != inode.size) inode.dataChanged = true;
  inode.size = size;
}

int PowerCutFs::lookup(std::uint64_t parent, const std::string& name, PowerCutAttr* out) {
  std::lock_guard lock(mutex_);
  Inode* dir = find(parent);
  if (dir == nullptr) return -ESTALE;
  if (!dir->isDirectory()) return -ENOTDIR;
  Inode* c = child(*dir, name);
  if (c == nullptr) return -ENOENT;
  *out = attrOf(*c);
  return 0;
}

int PowerCutFs::getattr(std::uint64_t ino, PowerCutAttr* out) {
  std::lock_guard lock(mutex_);
  Inode* inode = find(ino);
  if (inode == nullptr) return -ESTALE;
  *out = attrOf(*inode);
  return 0;
}

int PowerCutFs::setattr(std::uint64_t ino, const PowerCutSetAttr& change, PowerCutAttr* out) {
  std::lock_guard lock(mutex_);
  if (off_) return -EIO;  // the disk has no power
  Inode* inode = find(ino);
  if (inode == nullptr) return -ESTALE;
  if (change.size) {
    if (inode->isDirectory()) return -EISDIR;
    setSize(*inode, *change.size);
    inode->mtime = now();
  }
  if (change.mode) inode->mode = (inode->mode & S_IFMT) | (*change.mode & 07777);
  if (change.uid) inode->uid = *change.uid;
  if (change.gid) inode->gid = *change.gid;
  if (change.atime) inode->atime = *change.atime;
  if (change.mtime) inode->mtime = *change.mtime;
  inode->ctime = now();
  *out = attrOf(*inode);
  return 0;
}

int PowerCutFs::make(std::uint64_t parent, const std::string& name, mode_t mode, uid_t uid,
                     gid_t gid, PowerCutAttr* out) {
  if (!S_ISREG(mode) && !S_ISDIR(mode) && !S_ISSOCK(mode) && !S_ISFIFO(mode))
    return -EPERM;  // no devices, no symlinks
  if (int rc = checkName(name); rc != 0) return rc;
  std::lock_guard lock(mutex_);
  if (off_) return -EIO;  // the disk has no power
  Inode* dir = find(parent);
  if (dir == nullptr) return -ESTALE;
  if (!dir->isDirectory()) return -ENOTDIR;
  if (dir->entries.contains(name)) return -EEXIST;
  auto inode = std::make_unique<Inode>();
  inode->ino = nextIno_++;
  inode->mode = mode;
  inode->uid = uid;
  inode->gid = gid;
  inode->atime = inode->mtime = inode->ctime = now();
  inode->links = 1;
  dir->entries[name] = inode->ino;
  dir->mtime = dir->ctime = inode->ctime;
  *out = attrOf(*inode);
  inodes_.emplace(inode->ino, std::move(inode));
  return 0;
}

int PowerCutFs::link(std::uint64_t ino, std::uint64_t newParent, const std::string& newName,
                     PowerCutAttr* out) {
  if (int rc = checkName(newName); rc != 0) return rc;
  std::lock_guard lock(mutex_);
  if (off_) return -EIO;  // the disk has no power
  Inode* inode = find(ino);
  Inode* dir = find(newParent);
  if (inode == nullptr || dir == nullptr) return -ESTALE;
  if (inode->isDirectory()) return -EPERM;
  if (!dir->isDirectory()) return -ENOTDIR;
  if (dir->entries.contains(newName)) return -EEXIST;
  dir->entries[newName] = ino;
  ++inode->links;
  inode->ctime = dir->mtime = dir->ctime = now();
  *out = attrOf(*inode);
  return 0;
}

int PowerCutFs::unlink(std::uint64_t parent, const std::string& name) {
  std::lock_guard lock(mutex_);
  if (off_) return -EIO;  // the disk has no power
  Inode* dir = find(parent);
  if (dir == nullptr) return -ESTALE;
  Inode* c = child(*dir, name);
  if (c == nullptr) return -ENOENT;
  if (c->isDirectory()) return -EISDIR;
  dir->entries.erase(name);
  dir->mtime = dir->ctime = now();
  dropLink(*c);
  return 0;
}

int PowerCutFs::rmdir(std::uint64_t parent, const std::string& name) {
  std::lock_guard lock(mutex_);
  if (off_) return -EIO;  // the disk has no power
  Inode* dir = find(parent);
  if (dir == nullptr) return -ESTALE;
  Inode* c = child(*dir, name);
  if (c == nullptr) return -ENOENT;
  if (!c->isDirectory()) return -ENOTDIR;
  if (!c->entries.empty()) return -ENOTEMPTY;
  dir->entries.erase(name);
  dir->mtime = dir->ctime = now();
  dropLink(*c);
  return 0;
}

int PowerCutFs::rename(std::uint64_t parent, const std::string& name, std::uint64_t newParent,
                       const std::string& newName, unsigned flags) {
  if (flags & ~static_cast<unsigned>(RENAME_NOREPLACE)) return -EINVAL;
  if (int rc = checkName(newName); rc != 0) return rc;
  std::lock_guard lock(mutex_);
  if (off_) return -EIO;  // the disk has no power
  Inode* from = find(parent);
  Inode* to = find(newParent);
  if (from == nullptr || to == nullptr) return -ESTALE;
  if (!to->isDirectory()) return -ENOTDIR;
  Inode* moved = child(*from, name);
  if (moved == nullptr) return -ENOENT;
  if (from == to && name == newName) return 0;
  if (Inode* replaced = child(*to, newName)) {
    if (flags & RENAME_NOREPLACE) return -EEXIST;
    if (replaced == moved) return 0;  // two names of one file: POSIX leaves both
    if (moved->isDirectory() && !replaced->isDirectory()) return -ENOTDIR;
    if (!moved->isDirectory() && replaced->isDirectory()) return -EISDIR;
    if (replaced->isDirectory() && !replaced->entries.empty()) return -ENOTEMPTY;
    to->entries.erase(newName);
    dropLink(*replaced);
  }
  from->entries.erase(name);
  to->entries[newName] = moved->ino;
  from->mtime = from->ctime = to->mtime = to->ctime = moved->ctime = now();
  return 0;
}

int PowerCutFs::readdir(std::uint64_t ino, std::vector<std::pair<std::string, PowerCutAttr>>* out) {
  std::lock_guard lock(mutex_);
  Inode* dir = find(ino);
  if (dir == nullptr) return -ESTALE;
  if (!dir->isDirectory()) return -ENOTDIR;
  out->clear();
  for (const auto& [name, childIno] : dir->entries)
    if (Inode* c = find(childIno)) out->emplace_back(name, attrOf(*c));
  return 0;
}

int PowerCutFs::read(std::uint64_t ino, std::uint64_t offset, std::size_t size, std::string* out) {
  std::lock_guard lock(mutex_);
  Inode* inode = find(ino);
  if (inode == nullptr) return -ESTALE;
  if (inode->isDirectory()) return -EISDIR;
  out->clear();
  if (offset >= inode->size) return 0;
  const std::uint64_t end = std::min<std::uint64_t>(inode->size, offset + size);
  out->resize(end - offset);
  for (std::uint64_t at = offset; at < end;) {
    const std::uint64_t index = at / kChunkBytes, within = at % kChunkBytes;
    const std::uint64_t n = std::min(end - at, kChunkBytes - within);
    auto it = inode->data.find(index);
    if (it != inode->data.end())
      std::memcpy(out->data() + (at - offset), it->second->data() + within, n);
    at += n;  // a chunk never written reads as zeros (resize made them)
  }
  return 0;
}

long PowerCutFs::write(std::uint64_t ino, std::uint64_t offset, std::span<const char> data,
                       bool sync) {
  std::lock_guard lock(mutex_);
  if (off_) return -EIO;  // the disk has no power
  Inode* inode = find(ino);
  if (inode == nullptr) return -ESTALE;
  if (inode->isDirectory()) return -EISDIR;
  const std::uint64_t end = offset + data.size();
  for (std::uint64_t at = offset; at < end;) {
    const std::uint64_t index = at / kChunkBytes, within = at % kChunkBytes;
    const std::uint64_t n = std::min(end - at, kChunkBytes - within);
    auto& chunk = inode->data[index];
    if (!chunk)
      chunk = std::make_shared<Chunk>(kChunkBytes, 0);
    else if (chunk.use_count() > 1)
      chunk = std::make_shared<Chunk>(*chunk);  // the durable version keeps the old bytes
    std::memcpy(chunk->data() + within, data.data() + (at - offset), n);
    at += n;
  }
  if (end > inode->size) inode->size = end;
  inode->dataChanged = true;
  inode->mtime = inode->ctime = now();
  if (sync) {
    inode->durableData = inode->data;
    inode->durableSize = inode->size;
    inode->dataChanged = false;
  }
  return static_cast<long>(data.size());
}

void PowerCutFs::restore() {
  std::lock_guard lock(mutex_);
  off_ = false;
}

std::uint64_t PowerCutFs::cuts() const {
  std::lock_guard lock(mutex_);
  return cuts_;
}

int PowerCutFs::fsync(std::uint64_t ino, std::optional<std::uint64_t> cutsSeen) {
  std::lock_guard lock(mutex_);
  if (off_) return -EIO;  // the disk has no power
  if (cutsSeen && *cutsSeen != cuts_) return -EIO;
  Inode* inode = find(ino);
  if (inode == nullptr) return -ESTALE;
  if (inode->isDirectory()) return -EISDIR;  // directories sync through fsyncdir
  inode->durableData = inode->data;
  inode->durableSize = inode->size;
  inode->dataChanged = false;
  return 0;
}

int PowerCutFs::fsyncdir(std::uint64_t ino, std::optional<std::uint64_t> cutsSeen) {
  std::lock_guard lock(mutex_);
  if (off_) return -EIO;  // the disk has no power
  if (cutsSeen && *cutsSeen != cuts_) return -EIO;
  Inode* dir = find(ino);
  if (dir == nullptr) return -ESTALE;
  if (!dir->isDirectory()) return -ENOTDIR;
  for (const auto& [name, childIno] : dir->entries)
    if (Inode* c = find(childIno)) ++c->durableLinks;
  std::vector<std::uint64_t> released;
  for (const auto& [name, childIno] : dir->durableEntries) released.push_back(childIno);
  dir->durableEntries = dir->entries;
  for (std::uint64_t childIno : released)
    if (Inode* c = find(childIno)) {
      if (c->durableLinks > 0) --c->durableLinks;
      forgetIfUnreferenced(*c);
    }
  return 0;
}

int PowerCutFs::open(std::uint64_t ino) {
  std::lock_guard lock(mutex_);
  Inode* inode = find(ino);
  if (inode == nullptr) return -ESTALE;
  ++inode->opens;
  return 0;
}

void PowerCutFs::release(std::uint64_t ino) {
  std::lock_guard lock(mutex_);
  Inode* inode = find(ino);
  if (inode == nullptr || inode->opens == 0) return;  // opened before a cut
  --inode->opens;
  forgetIfUnreferenced(*inode);
}

PowerCutReport PowerCutFs::unsyncedLocked() const {
  // A path for every inode a visible or durable name reaches, for the report.
  std::map<std::uint64_t, std::string> paths{{kRootIno, ""}};
  std::vector<std::uint64_t> walk{kRootIno};
  while (!walk.empty()) {
    const Inode* dir = find(walk.back());
    const std::string at = paths[walk.back()];
    walk.pop_back();
    if (dir == nullptr) continue;
    for (const Entries* entries : {&dir->entries, &dir->durableEntries})
      for (const auto& [name, ino] : *entries)
        if (paths.emplace(ino, at + "/" + name).second) walk.push_back(ino);
  }
  auto pathOf = [&](std::uint64_t ino) {
    auto it = paths.find(ino);
    return it == paths.end() ? "(unnamed inode " + std::to_string(ino) + ")" : it->second;
  };
  PowerCutReport report;
  for (const auto& [ino, inode] : inodes_) {
    report.namesUndone +=
        differences(inode->entries, inode->durableEntries, pathOf(ino), report.namesUndoneAt);
    if (inode->dataChanged) {
      ++report.filesReverted;
      note(report.filesRevertedAt, pathOf(ino));
    }
  }
  // What durable names reach from the root survives; the rest is dropped.
  std::set<std::uint64_t> reached{kRootIno};
  std::vector<std::uint64_t> todo{kRootIno};
  while (!todo.empty()) {
    const Inode* dir = find(todo.back());
    todo.pop_back();
    if (dir == nullptr) continue;
    for (const auto& [name, ino] : dir->durableEntries)
      if (reached.insert(ino).second) todo.push_back(ino);
  }
  for (const auto& [ino, inode] : inodes_)
    if (!reached.contains(ino)) ++report.inodesDropped;
  return report;
}

PowerCutReport PowerCutFs::unsynced() const {
  std::lock_guard lock(mutex_);
  return unsyncedLocked();
}

PowerCutReport PowerCutFs::cut() {
  std::lock_guard lock(mutex_);
  const PowerCutReport report = unsyncedLocked();
  ++cuts_;
  off_ = true;
  for (auto& [ino, inode] : inodes_) {
    inode->data = inode->durableData;
    inode->size = inode->durableSize;
    inode->dataChanged = false;
    inode->entries = inode->durableEntries;
    inode->links = inode->durableLinks = inode->opens =
        0;  // every process that had it open died with the power
  }
  // Count the names again from the root; what none reaches is gone.
  std::set<std::uint64_t> reached{kRootIno};
  std::vector<std::uint64_t> todo{kRootIno};
  while (!todo.empty()) {
    Inode* dir = find(todo.back());
    todo.pop_back();
    if (dir == nullptr) continue;
    for (const auto& [name, ino] : dir->entries)
      if (Inode* c = find(ino)) {
        ++c->links;
        ++c->durableLinks;
        if (reached.insert(ino).second) todo.push_back(ino);
      }
  }
  std::erase_if(inodes_, [&](const auto& item) { return !reached.contains(item.first); });
  return report;
}

}  // namespace vmsync::testing
