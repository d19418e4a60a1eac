// The revocation records: who a revocation shuts out, who it lets back in,
// and what a damaged record does.
#include "transport/revocation.h"

#include <gtest/gtest.h>

#include <fstream>

#include "base/error.h"
#include "test_env.h"

namespace vmsync {
namespace {

using testing::TempDir;

/// An identity directory as `vmsync init` leaves it, as far as the records care.
void makeIdentity(const TempDir& dir) { std::ofstream(dir / "ca.pem") << "authority"; }

TEST(Revocation, ShutsOutTheRevokedCredentialsAndLetsAReplacementIn) {
  TempDir dir;
  makeIdentity(dir);
  const Enrollment phone = recordEnrollment(dir.path(), "alice", "phone", 30);
  const Enrollment laptop = recordEnrollment(dir.path(), "alice", "laptop", 30);
  EXPECT_EQ(phone.id, "1");
  EXPECT_EQ(laptop.id, "2");
  EXPECT_EQ(phone.expires - phone.issued, 30 * 86400);
  RevocationList list(dir.path());
  list.reload();
  EXPECT_EQ(list.refusal("alice", "phone", phone.id), "");
  // Before any revocation, a credential from before the record is fine too.
  EXPECT_EQ(list.refusal("alice", "phone", ""), "");

  const Revocation r = revoke(dir.path(), "alice", "phone", "lost");
  EXPECT_EQ(r.ids, std::vector<std::string>{"1"});
  auto changes = list.reload();
  ASSERT_TRUE(changes.changed);
  ASSERT_EQ(changes.revoked.size(), 1u);
  EXPECT_EQ(changes.revoked[0].device, "phone");
  EXPECT_NE(list.refusal("alice", "phone", phone.id).find("#1 was revoked at"), std::string::npos);
  EXPECT_NE(list.refusal("alice", "phone", phone.id).find("(lost)"), std::string::npos);
  // One from before the record cannot be told from the lost one.
  EXPECT_NE(list.refusal("alice", "phone", "").find("not on the enrollment record"), std::string::npos);
  // Nor can one that names a number the record gave someone else.
  EXPECT_NE(list.refusal("alice", "phone", laptop.id), "");
  EXPECT_EQ(list.refusal("alice", "laptop", laptop.id), "");
  EXPECT_EQ(list.refusal("bob", "phone", "7"), "");

  const Enrollment replacement = recordEnrollment(dir.path(), "alice", "phone", 30);
  changes = list.reload();
  ASSERT_EQ(changes.enrolled.size(), 1u);
  EXPECT_EQ(changes.enrolled[0].id, replacement.id);
  EXPECT_EQ(list.refusal("alice", "phone", replacement.id), "");
  EXPECT_NE(list.refusal("alice", "phone", phone.id), "");
  // Nothing changed: nothing to report.
  EXPECT_FALSE(list.reload().changed);
}

TEST(Revocation, AUserWideRevocationTakesEveryDeviceOfTheUser) {
  TempDir dir;
  makeIdentity(dir);
  const Enrollment phone = recordEnrollment(dir.path(), "alice", "phone", 30);
  const Enrollment laptop = recordEnrollment(dir.path(), "alice", "laptop", 30);
  const Enrollment bobs = recordEnrollment(dir.path(), "bob", "phone", 30);
  EXPECT_EQ(revoke(dir.path(), "alice", "", "").ids.size(), 2u);
  RevocationList list(dir.path());
  list.reload();
  EXPECT_NE(list.refusal("alice", "phone", phone.id), "");
  EXPECT_NE(list.refusal("alice", "laptop", laptop.id), "");
  EXPECT_NE(list.refusal("alice", "tablet", ""), "");  // a device from before the record
  EXPECT_EQ(list.refusal("bob", "phone", bobs.id), "");
}

TEST(Revocation, ADamagedRecordKeepsTheLastGoodListAndSaysWhy) {
  TempDir dir;
  makeIdentity(dir);
  const Enrollment phone = recordEnrollment(dir.path(), "alice", "phone", 30);
  revoke(dir.path(), "alice", "phone", "");
  RevocationList list(dir.path());
  list.reload();
  ASSERT_NE(list.refusal("alice", "phone", phone.id), "");
  std::ofstream(dir / "revoked.json") << "[1, 2";
  const auto changes = list.reload();
  EXPECT_FALSE(changes.changed);
  EXPECT_NE(changes.error.find(dir / "revoked.json"), std::string::npos) << changes.error;
  EXPECT_NE(list.refusal("alice", "phone", phone.id), "");  // still revoked
  // revoke refuses to write over it.
  EXPECT_THROW(revoke(dir.path(), "alice", "laptop", ""), Error);
}

TEST(Revocation, NeedsAnIdentityDirectory) {
  TempDir dir;
  try {
    revoke(dir / "none", "alice", "phone", "");
    FAIL() << "revoked in a directory with no identity";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("holds no server identity"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace vmsync
