// Files that are whole or absent after a crash.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <string>

namespace vmsync {

/// Writes `size` bytes to `path` atomically and durably: a temporary file,
/// fsync, rename into place, fsync of the directory.
void writeFileDurably(const std::string& path, const void* bytes, std::size_t size);

/// Reads a whole file; throws Error naming it when it cannot, or when it is
/// larger than `maxBytes`.
std::string readWholeFile(const std::string& path, std::size_t maxBytes);

/// Reads exactly `size` bytes of `fd` at `offset`, again after a short read;
/// false at a premature end of file. Throws Error naming `path` when a read fails.
bool readExactly(int fd, void* into, std::size_t size, off_t offset, const std::string& path);

}  // namespace vmsync
