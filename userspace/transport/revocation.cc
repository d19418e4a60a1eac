#include "transport/revocation.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <ctime>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "base/durable_file.h"
#include "base/error.h"

namespace vmsync {

namespace {

constexpr std::size_t kMaxRecordBytes = 64u << 20;

std::string enrolledPath(const std::string& dir) { return dir + "/enrolled.json"; }
std::string revokedPath(const std::string& dir) { return dir + "/revoked.json"; }

std::int64_t nowSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

/// Holds the identity directory's record lock: one enroll or revoke at a
/// time changes the records, so none is lost.
class RecordLock {
 public:
  explicit RecordLock(const std::string& dir) {
    const std::string path = dir + "/records.lock";
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd_ < 0) throwLastErrno(fmt::format("cannot open {}", path));
    if (::flock(fd_, LOCK_EX) != 0) {
      int err = errno;
      ::close(fd_);
      throwErrno(err, fmt::format("cannot lock {}", path));
    }
  }
  ~RecordLock() { ::close(fd_); }
  RecordLock(const RecordLock&) = delete;
  RecordLock& operator=(const RecordLock&) = delete;

 private:
  int fd_ = -1;
};

/// The JSON object in `path` with its list `key`; one with an empty list when
/// there is no such file.
nlohmann::json readRecord(const std::string& path, const char* key) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 && errno == ENOENT) return nlohmann::json{{key, nlohmann::json::array()}};
  try {
    auto j = nlohmann::json::parse(readWholeFile(path, kMaxRecordBytes));
    if (!j.is_object() || !j.contains(key) || !j.at(key).is_array()) fail("{} has no \"{}\" list", path, key);
    return j;
  } catch (const nlohmann::json::exception& e) {
    fail("{} is damaged: {}", path, e.what());
  }
}

void writeRecord(const std::string& path, const nlohmann::json& j) {
  const std::string text = j.dump(2) + "\n";
  writeFileDurably(path, text.data(), text.size());
}

Enrollment enrollmentFrom(const nlohmann::json& j) {
  return Enrollment{j.at("user").get<std::string>(), j.at("device").get<std::string>(), j.at("id").get<std::string>(),
                    j.at("issued").get<std::int64_t>(), j.at("expires").get<std::int64_t>()};
}

Revocation revocationFrom(const nlohmann::json& j) {
  return Revocation{j.at("user").get<std::string>(), j.value("device", std::string()),
                    j.at("ids").get<std::vector<std::string>>(), j.at("time").get<std::int64_t>(),
                    j.value("reason", std::string())};
}

std::string timeText(std::int64_t unixSeconds) {
  const std::time_t t = static_cast<std::time_t>(unixSeconds);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

}  // namespace

Enrollment recordEnrollment(const std::string& dir, const std::string& user, const std::string& device, int days) {
  RecordLock lock(dir);
  std::uint64_t highest = 0;
  for (const auto& e : readEnrollments(dir)) {
    std::uint64_t n = 0;
    if (std::from_chars(e.id.data(), e.id.data() + e.id.size(), n).ec == std::errc{}) highest = std::max(highest, n);
  }
  const std::int64_t issued = nowSeconds();
  Enrollment e{user, device, std::to_string(highest + 1), issued, issued + static_cast<std::int64_t>(days) * 86400};
  auto j = readRecord(enrolledPath(dir), "enrollments");
  j["enrollments"].push_back(
      {{"user", e.user}, {"device", e.device}, {"id", e.id}, {"issued", e.issued}, {"expires", e.expires}});
  writeRecord(enrolledPath(dir), j);
  return e;
}

std::vector<Enrollment> readEnrollments(const std::string& dir) {
  std::vector<Enrollment> out;
  const std::string path = enrolledPath(dir);
  try {
    const auto record = readRecord(path, "enrollments");  // not a temporary: the loop reads into it
    for (const auto& e : record.at("enrollments")) out.push_back(enrollmentFrom(e));
  } catch (const nlohmann::json::exception& e) {
    fail("{} is damaged: {}", path, e.what());
  }
  return out;
}

std::vector<Revocation> readRevocations(const std::string& dir) {
  std::vector<Revocation> out;
  const std::string path = revokedPath(dir);
  try {
    const auto record = readRecord(path, "revocations");
    for (const auto& r : record.at("revocations")) out.push_back(revocationFrom(r));
  } catch (const nlohmann::json::exception& e) {
    fail("{} is damaged: {}", path, e.what());
  }
  return out;
}

Revocation revoke(const std::string& dir, const std::string& user, const std::string& device,
                  const std::string& reason) {
  struct stat st {};
  if (::stat((dir + "/ca.pem").c_str(), &st) != 0)
    fail("{} holds no server identity (no ca.pem): give the directory of `vmsync init`", dir);
  RecordLock lock(dir);
  Revocation r{user, device, {}, nowSeconds(), reason};
  for (const auto& e : readEnrollments(dir))
    if (e.user == user && (device.empty() || e.device == device)) r.ids.push_back(e.id);
  auto j = readRecord(revokedPath(dir), "revocations");
  nlohmann::json entry{{"user", r.user}, {"ids", r.ids}, {"time", r.time}};
  if (!r.device.empty()) entry["device"] = r.device;
  if (!r.reason.empty()) entry["reason"] = r.reason;
  j["revocations"].push_back(entry);
  writeRecord(revokedPath(dir), j);
  return r;
}

RevocationList::RevocationList(std::string dir) : dir_(std::move(dir)) {}

RevocationList::Stamp RevocationList::stampOf(const std::string& path) const {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return Stamp{};
  return Stamp{static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec, st.st_size,
               st.st_ino};
}

RevocationList::Changes RevocationList::reload() {
  Changes changes;
  const Stamp enrolled = stampOf(enrolledPath(dir_)), revoked = stampOf(revokedPath(dir_));
  if (loaded_ && enrolled == enrolledStamp_ && revoked == revokedStamp_) return changes;
  std::vector<Enrollment> enrollments;
  std::vector<Revocation> revocations;
  try {
    enrollments = readEnrollments(dir_);
    revocations = readRevocations(dir_);
  } catch (const Error& e) {
    // Keep what was good, and do not try again until a file changes.
    enrolledStamp_ = enrolled;
    revokedStamp_ = revoked;
    changes.error = e.what();
    return changes;
  }
  if (loaded_) {
    std::set<std::string> known;
    for (const auto& e : enrollments_) known.insert(e.id);
    for (const auto& e : enrollments)
      if (!known.contains(e.id)) changes.enrolled.push_back(e);
    // Revocations are only ever appended.
    for (std::size_t i = revocations_.size(); i < revocations.size(); ++i) changes.revoked.push_back(revocations[i]);
  }
  changes.changed = true;
  enrollments_ = std::move(enrollments);
  revocations_ = std::move(revocations);
  enrolledStamp_ = enrolled;
  revokedStamp_ = revoked;
  loaded_ = true;
  return changes;
}

std::string RevocationList::refusal(const std::string& user, const std::string& device, const std::string& id) const {
  const Revocation* latest = nullptr;
  for (const auto& r : revocations_) {
    if (r.user != user || (!r.device.empty() && r.device != device)) continue;
    if (!id.empty() && std::find(r.ids.begin(), r.ids.end(), id) != r.ids.end())
      return fmt::format("its credential #{} was revoked at {}{}", id, timeText(r.time),
                         r.reason.empty() ? "" : " (" + r.reason + ")");
    latest = &r;
  }
  if (latest == nullptr) return {};
  // A credential of a revoked name must be one issued since and on record:
  // one from before the record was kept cannot be told from the lost one.
  for (const auto& e : enrollments_)
    if (e.user == user && e.device == device && !id.empty() && e.id == id) return {};
  return fmt::format("its credential is not on the enrollment record and the name was revoked at {}{}",
                     timeText(latest->time), latest->reason.empty() ? "" : " (" + latest->reason + ")");
}

}  // namespace vmsync
