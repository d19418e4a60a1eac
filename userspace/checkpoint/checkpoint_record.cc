#include "checkpoint/checkpoint_record.h"

#include <capnp/serialize.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <kj/common.h>
#include <liburing.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <climits>
#include <new>
#include <vector>

#include "base/durable_file.h"
#include "base/error.h"

namespace vmsync {

namespace {

/// Writes `iov` to a new file `fd` at offset 0 and fsyncs it: one io_uring
/// submission of a write linked to an fsync (the fsync runs only after the
/// whole write completed). A short write is finished with pwrite, then fsync.
void writeAndSync(int fd, const std::string& path, std::span<const iovec> iov, std::size_t total) {
  io_uring ring{};
  int rc = io_uring_queue_init(2, &ring, 0);
  if (rc < 0) throwErrno(-rc, "cannot set up io_uring for the checkpoint log");
  io_uring_sqe* write = io_uring_get_sqe(&ring);
  io_uring_prep_writev(write, fd, iov.data(), static_cast<unsigned>(iov.size()), 0);
  write->flags |= IOSQE_IO_LINK;
  write->user_data = 1;
  io_uring_sqe* sync = io_uring_get_sqe(&ring);
  io_uring_prep_fsync(sync, fd, 0);
  sync->user_data = 2;
  rc = io_uring_submit_and_wait(&ring, 2);
  std::int64_t written = -1;
  int syncResult = -ECANCELED;
  for (int seen = 0; rc >= 0 && seen < 2; ++seen) {
    io_uring_cqe* cqe = nullptr;
    rc = io_uring_wait_cqe(&ring, &cqe);
    if (rc < 0) break;
    if (cqe->user_data == 1) written = cqe->res;
    else syncResult = cqe->res;
    io_uring_cqe_seen(&ring, cqe);
  }
  io_uring_queue_exit(&ring);
  if (rc < 0) throwErrno(-rc, fmt::format("io_uring failed while writing {}", path));
  if (written < 0) throwErrno(static_cast<int>(-written), fmt::format("cannot write {}", path));
  if (static_cast<std::size_t>(written) < total) {
    // Short write (the linked fsync was cancelled): finish it by hand.
    std::size_t done = static_cast<std::size_t>(written);
    std::size_t base = 0;
    for (const iovec& part : iov) {
      while (done < base + part.iov_len) {
        const char* from = static_cast<const char*>(part.iov_base) + (done - base);
        ssize_t n = ::pwrite(fd, from, base + part.iov_len - done, static_cast<off_t>(done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) throwErrno(n < 0 ? errno : EIO, fmt::format("cannot write {}", path));
        done += static_cast<std::size_t>(n);
      }
      base += part.iov_len;
    }
    syncResult = ::fsync(fd) == 0 ? 0 : -errno;
  }
  if (syncResult < 0) throwErrno(-syncResult, fmt::format("cannot fsync {}", path));
}

/// Writes `iov` to a new file `fd` at offset 0 in windows of `window` bytes,
/// each on the disk before the next is written (sync_file_range, waiting
/// before and after), then fsyncs it. A background writer of a large file
/// (a fold's new base) so holds at most one window in the disk's queue and
/// in the file system's journal: one fsync of a file of hundreds of MiB
/// would make every other file's fsync wait for all of it, on ext4 (whose
/// journal commits write a file's data with it) as on the disk's queue.
void writePacedAndSync(int fd, const std::string& path, std::span<const iovec> iov, std::size_t window) {
  std::size_t offset = 0;
  std::size_t piece = 0, inPiece = 0;  // the cursor: iov[piece], inPiece bytes in
  std::vector<iovec> batch;
  while (piece < iov.size()) {
    // The next window: from the cursor on, up to `window` bytes.
    batch.clear();
    std::size_t bytes = 0;
    while (piece < iov.size() && bytes < window && batch.size() < IOV_MAX) {
      const std::size_t take = std::min(iov[piece].iov_len - inPiece, window - bytes);
      batch.push_back({static_cast<char*>(iov[piece].iov_base) + inPiece, take});
      bytes += take;
      inPiece += take;
      if (inPiece == iov[piece].iov_len) {
        ++piece;
        inPiece = 0;
      }
    }
    std::size_t done = 0;
    while (done < bytes) {
      ssize_t n = ::pwritev(fd, batch.data(), static_cast<int>(batch.size()), static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throwErrno(n < 0 ? errno : EIO, fmt::format("cannot write {}", path));
      done += static_cast<std::size_t>(n);
      // Drop what was written from the front of the batch.
      std::size_t skip = static_cast<std::size_t>(n);
      std::size_t first = 0;
      while (first < batch.size() && skip >= batch[first].iov_len) skip -= batch[first++].iov_len;
      batch.erase(batch.begin(), batch.begin() + static_cast<std::ptrdiff_t>(first));
      if (!batch.empty()) {
        batch.front().iov_base = static_cast<char*>(batch.front().iov_base) + skip;
        batch.front().iov_len -= skip;
      }
    }
    if (::sync_file_range(fd, static_cast<off_t>(offset), static_cast<off_t>(bytes),
                          SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) != 0)
      throwLastErrno(fmt::format("cannot write {} to the disk", path));
    offset += bytes;
  }
  if (::fsync(fd) != 0) throwLastErrno(fmt::format("cannot fsync {}", path));
}

}  // namespace

kj::Maybe<kj::Array<capnp::word>> readRecordFile(const std::string& path, std::string& why) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throwLastErrno(fmt::format("cannot open {}", path));
  KJ_DEFER(::close(fd));
  struct stat st {};
  if (::fstat(fd, &st) != 0) throwLastErrno(fmt::format("cannot stat {}", path));
  RecordHeader header{};
  if (static_cast<std::uint64_t>(st.st_size) < sizeof header ||
      !readExactly(fd, &header, sizeof header, 0, path)) {
    why = fmt::format("it has {} bytes, less than a record header", st.st_size);
    return nullptr;
  }
  why = checkRecordHeader(header, static_cast<std::uint64_t>(st.st_size) - sizeof header);
  if (!why.empty()) return nullptr;
  auto words = kj::heapArray<capnp::word>(header.length / sizeof(capnp::word));
  auto bytes = words.asBytes();
  if (!readExactly(fd, bytes.begin(), bytes.size(), sizeof header, path)) {
    why = "the file shrank while it was read";
    return nullptr;
  }
  why = checkRecordPayload(header, std::as_bytes(std::span(bytes.begin(), bytes.size())));
  if (!why.empty()) return nullptr;
  return kj::mv(words);
}

namespace {

/// Writes `header` and then `payload` (its pieces, in order) as one record to
/// `path`, as writeRecordFile() says.
void writeRecordPieces(const std::string& path, RecordHeader header, std::span<const iovec> payload,
                       bool crashPoints, std::size_t pacedWindow) {
  auto stop = [crashPoints](const char* point) {
    if (crashPoints) crashPoint(point);
  };
  std::vector<iovec> iov{{&header, sizeof header}};
  iov.insert(iov.end(), payload.begin(), payload.end());
  const std::string tmp = path + ".tmp";
  stop("before-data-write");
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) throwLastErrno(fmt::format("cannot create {}", tmp));
  {
    KJ_DEFER(::close(fd));
    if (pacedWindow > 0) writePacedAndSync(fd, tmp, iov, pacedWindow);
    else writeAndSync(fd, tmp, iov, sizeof header + header.length);
  }
  stop("after-data-fsync");
  // The commit: the rename makes the record visible, the directory fsync makes
  // the rename durable.
  if (::rename(tmp.c_str(), path.c_str()) != 0) throwLastErrno(fmt::format("cannot rename {} into place", tmp));
  stop("after-rename");
  syncParentDirectory(path);
  stop("after-commit");
}

void checkPayloadSize(const std::string& path, std::uint64_t bytes) {
  if (bytes > kMaxRecordPayload)
    fail("record for {} is {} bytes, above the limit of {}", path, bytes, kMaxRecordPayload);
}

/// writeRecordFile() of one contiguous `payload`, written as writeRecordPieces() says.
void writePayloadRecord(const std::string& path, std::span<const std::byte> payload, bool crashPoints,
                        std::size_t pacedWindow) {
  checkPayloadSize(path, payload.size());
  const iovec piece{const_cast<std::byte*>(payload.data()), payload.size()};
  writeRecordPieces(path, makeRecordHeader(payload), {&piece, 1}, crashPoints, pacedWindow);
}

}  // namespace

void writeRecordFile(const std::string& path, std::span<const std::byte> payload,
                     bool crashPoints) {
  writePayloadRecord(path, payload, crashPoints, 0);
}

void writeMessageRecordFile(const std::string& path, capnp::MessageBuilder& message,
                            bool crashPoints, std::size_t pacedWindow) {
  auto segments = message.getSegmentsForOutput();
  // The segment table of Cap'n Proto's flat format: the number of segments
  // less one, each segment's size in words, padded to a whole word.
  std::vector<std::uint32_t> table(1 + segments.size() + (segments.size() % 2 == 0 ? 1 : 0), 0);
  table[0] = static_cast<std::uint32_t>(segments.size() - 1);
  for (std::size_t i = 0; i < segments.size(); ++i)
    table[1 + i] = static_cast<std::uint32_t>(segments[i].size());
  std::vector<iovec> pieces{{table.data(), table.size() * sizeof(std::uint32_t)}};
  for (auto segment : segments)
    pieces.push_back(
        {const_cast<capnp::word*>(segment.begin()), segment.size() * sizeof(capnp::word)});
  if (pieces.size() + 1 > IOV_MAX) {
    // More segments than one write takes: flatten it after all.
    auto words = capnp::messageToFlatArray(segments);
    auto bytes = words.asBytes();
    writePayloadRecord(path, std::as_bytes(std::span(bytes.begin(), bytes.size())), crashPoints, pacedWindow);
    return;
  }
  XXH3_state_t* state = XXH3_createState();
  if (state == nullptr) throw std::bad_alloc();
  KJ_DEFER(XXH3_freeState(state));
  XXH3_64bits_reset(state);
  std::uint64_t length = 0;
  for (const iovec& piece : pieces) {
    XXH3_64bits_update(state, piece.iov_base, piece.iov_len);
    length += piece.iov_len;
  }
  checkPayloadSize(path, length);
  writeRecordPieces(
      path, RecordHeader{kRecordMagic, kRecordVersion, 0, length, XXH3_64bits_digest(state)},
      pieces, crashPoints, pacedWindow);
}

RecordHeader makeRecordHeader(std::span<const std::byte> payload) {
  return RecordHeader{kRecordMagic, kRecordVersion, 0, payload.size(), XXH3_64bits(payload.data(), payload.size())};
}

std::string checkRecordHeader(const RecordHeader& header, std::uint64_t available) {
  if (header.magic != kRecordMagic) return "it does not start with a vmsync record header";
  if (header.version != kRecordVersion)
    return fmt::format("record version {} is not the supported version {}", header.version, kRecordVersion);
  if (header.length > kMaxRecordPayload)
    return fmt::format("record claims {} bytes, above the limit of {}", header.length, kMaxRecordPayload);
  if (header.length % 8 != 0) return fmt::format("record length {} is not a whole number of words", header.length);
  if (header.length != available)
    return fmt::format("record claims {} bytes but {} follow its header (torn write)", header.length, available);
  return {};
}

std::string checkRecordPayload(const RecordHeader& header, std::span<const std::byte> payload) {
  std::uint64_t actual = XXH3_64bits(payload.data(), payload.size());
  if (actual != header.checksum)
    return fmt::format("payload checksum {:016x} does not match the recorded {:016x}", actual, header.checksum);
  return {};
}

}  // namespace vmsync
