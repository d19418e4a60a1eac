// Revocation: a lost device's credential stops working without enrolling the
// others again. `vmsync enroll` records each credential it issues in the
// identity directory (enrolled.json) under a number, which its certificate
// carries in its name ("phone@alice#7"); `vmsync revoke` adds the numbers of
// a device's or a user's credentials to revoked.json there. The server reads
// both while it runs.
#pragma once

#include <cstdint>
#include <string>
#include <sys/types.h>
#include <vector>

namespace vmsync {

/// One credential `vmsync enroll` issued.
struct Enrollment {
  std::string user;
  std::string device;
  std::string id;           // its number, in decimal; in the certificate's name after '#' 
  std::int64_t issued = 0;  // Unix seconds
  std::int64_t expires = 0;
};

/// One `vmsync revoke`: the credentials `ids` of `user`'s `device` (every
/// device of the user when `device` is empty) issued up to `time`.
struct Revocation {
  std::string user;
  std::string device;
  std::vector<std::string> ids;
  std::int64_t time = 0;
  std::string reason;
};

/// Records a credential for `user`'s `device`, valid for `days`, in identity
/// directory `dir`, and returns it with its number: one more than the
/// highest so far.
Enrollment recordEnrollment(const std::string& dir, const std::string& user, const std::string& device, int days);
/// The credentials issued from `dir` (none before the first enrollment).
std::vector<Enrollment> readEnrollments(const std::string& dir);
/// The revocations in `dir` (none before the first).
std::vector<Revocation> readRevocations(const std::string& dir);

/// `vmsync revoke`: revokes every credential issued so far to `user`'s
/// `device`, or to every device of `user` when `device` is empty; also any
/// such credential issued before the record was kept. Returns the revocation
/// written. Throws Error naming the file when it cannot.
Revocation revoke(const std::string& dir, const std::string& user, const std::string& device,
                  const std::string& reason);

/// What the server holds of the two files, read again when they change.
class RevocationList {
 public:
  /// `dir`: the server's identity directory.
  explicit RevocationList(std::string dir);

  /// Reads the files again when they changed since the last read. Returns
  /// the enrollments and revocations that are new since then (the first
  /// read reports none). A damaged file keeps the last good list and says
  /// why in `error`.
  struct Changes {
    bool changed = false;
    std::vector<Enrollment> enrolled;
    std::vector<Revocation> revoked;
    std::string error;
  };
  Changes reload();

  /// Why the credential numbered `id` ("" for one from before numbers) of
  /// `device` of `user` may no longer connect, or "" when it may.
  std::string refusal(const std::string& user, const std::string& device, const std::string& id) const;

 private:
  struct Stamp {
    std::int64_t mtimeNs = -1;
    off_t size = -1;
    ino_t inode = 0;
    bool operator==(const Stamp&) const = default;
  };
  Stamp stampOf(const std::string& path) const;

  std::string dir_;
  Stamp enrolledStamp_, revokedStamp_;
  bool loaded_ = false;
  std::vector<Enrollment> enrollments_;
  std::vector<Revocation> revocations_;
};

}  // namespace vmsync
