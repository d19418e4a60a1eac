// Files that are whole or absent after a crash.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace vmsync {

/// Writes `size` bytes to `path` atomically and durably: a temporary file,
/// fsync, rename into place, fsync of the directory.
void writeFileDurably(const std::string& path, const void* bytes, std::size_t size);

/// fsyncs directory `dir`, making creations, renames and removals in it durable.
void syncDirectory(const std::string& dir);
/// fsyncs the directory that holds `path` ("." for a bare name).
void syncParentDirectory(const std::string& path);

/// Reads a whole file; throws Error naming it when it cannot, or when it is
/// larger than `maxBytes`.
std::string readWholeFile(const std::string& path, std::size_t maxBytes);

/// Reads exactly `size` bytes of `fd` at `offset`, again after a short read;
/// false at a premature end of file. Throws Error naming `path` when a read fails.
bool readExactly(int fd, void* into, std::size_t size, off_t offset, const std::string& path);

/// Byte ranges [first, end) of the open file `fd`, `size` bytes long, that may
/// hold data, in order; the rest of the file is holes and reads as zeros. Found
/// with SEEK_DATA / SEEK_HOLE; where the file system cannot tell, the rest of
/// the file is one range, and so it is once `maxRanges` - 1 ranges are found.
std::vector<std::pair<std::uint64_t, std::uint64_t>> dataRanges(int fd, std::uint64_t size,
                                                                std::size_t maxRanges);

/// Copies the file `from` to a new file `to` (mode 0600; a file there before
/// is unlinked first), leaving the holes of `from` holes in `to`: a sparse
/// image stays sparse. With `durable`, the copy and its name are on stable
/// storage when it returns. Throws Error naming the file that failed.
void copySparse(const std::string& from, const std::string& to, bool durable = false);

/// Creates directory `dir` (and missing parents) for what no other user may
/// read: guest data, keys, checkpoint chains. It gets mode 0700; one that
/// exists with permissions for group or others is made 0700, with a warning,
/// unless it is shared (the sticky bit, as on /tmp) or owned by another user,
/// which is only warned about. Throws Error naming `dir` when it cannot.
void makePrivateDirectory(const std::string& dir);

/// Makes the existing file `path` mode 0600 when group or others have any
/// permission on it, with a warning; nothing when it does not exist.
void makePrivateFile(const std::string& path);

/// The warning to give when the file `path`, which holds `what`, can be read
/// by group or others ("" when it cannot, or does not exist).
std::string readableByOthers(const std::string& path, const std::string& what);

}  // namespace vmsync
