// Inputs that stand for several files: sections separated by kSectionMark,
// and a scratch directory to write them into. Shared by the targets that
// fuzz what a process reads from its data or state directory at start-up.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/checkpoint_record.h"

namespace vmsync::fuzz {

/// Separates the sections of a multi-file input (a whole word, so a section
/// that holds a Cap'n Proto message keeps its alignment in the seeds).
inline constexpr std::string_view kSectionMark = "\n=FILE=\n";

/// The input cut at every kSectionMark, at most `limit` sections (the last
/// one keeps the rest).
inline std::vector<std::string_view> splitSections(const std::uint8_t* data, std::size_t size,
                                                   std::size_t limit) {
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> sections;
  while (sections.size() + 1 < limit) {
    std::size_t at = rest.find(kSectionMark);
    if (at == std::string_view::npos) break;
    sections.push_back(rest.substr(0, at));
    rest.remove_prefix(at + kSectionMark.size());
  }
  sections.push_back(rest);
  return sections;
}

/// A directory for the target's files, on tmpfs when there is one (fsync is
/// then free), removed at exit.
class ScratchDir {
 public:
  explicit ScratchDir(const char* name) {
    std::string base = std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : "/tmp";
    std::string tmpl = base + "/vmsync-fuzz-" + name + "-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
    path_ = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  /// Empties the directory for the next input.
  void clear() const {
    for (const auto& entry : std::filesystem::directory_iterator(path_)) std::filesystem::remove_all(entry.path());
  }

 private:
  std::string path_;
};

/// Copies the directory tree `from` into `to`, again when a signal (the event
/// loop's wake-ups) interrupts the copy.
inline void copyTree(const std::string& from, const std::string& to) {
  for (int attempt = 0;; ++attempt) {
    try {
      std::filesystem::copy(from, to,
                            std::filesystem::copy_options::recursive | std::filesystem::copy_options::overwrite_existing);
      return;
    } catch (const std::filesystem::filesystem_error& e) {
      if (e.code() != std::errc::interrupted || attempt == 100) throw;
    }
  }
}

/// Writes `bytes` to `path` as they are (no fsync: a fuzz run needs no durability).
inline void writeFile(const std::string& path, std::string_view bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) std::abort();
  if (!bytes.empty() && ::write(fd, bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size())) std::abort();
  ::close(fd);
}

/// Writes `payload` as a checkpoint record (header and checksum as the real
/// writer makes them, so the reader gets past them to the message); with
/// `damage`, the checksum is off by one.
inline void writeRecord(const std::string& path, std::string_view payload, bool damage) {
  auto bytes = std::as_bytes(std::span(payload.data(), payload.size()));
  RecordHeader header = makeRecordHeader(bytes);
  if (damage) header.checksum += 1;
  std::string file(reinterpret_cast<const char*>(&header), sizeof header);
  file.append(payload);
  writeFile(path, file);
}

}  // namespace vmsync::fuzz
