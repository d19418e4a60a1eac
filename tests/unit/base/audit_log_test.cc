// The audit log: one parseable JSON line per event, private to its owner, and
// a flood of one kind of event held to a line per interval with a count.
#include "base/audit_log.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "test_env.h"

namespace vmsync {
namespace {

std::vector<nlohmann::json> linesOf(const std::string& path) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

TEST(AuditLog, WritesOneJsonLinePerEventWithOnlyTheFieldsGiven) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/audit.jsonl";
  {
    AuditLog log(path);
    log.record({.action = "register", .result = "refused", .user = "mallory", .device = "phone", .vm = "vm1",
                .reason = "it belongs to user alice"});
    log.record({.action = "lease", .result = "granted", .device = "laptop"});
  }
  AuditLog again(path);  // appends
  again.record({.action = "enroll", .result = "done", .user = "bob\xff", .device = "tablet"});
  auto lines = linesOf(path);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0]["action"], "register");
  EXPECT_EQ(lines[0]["result"], "refused");
  EXPECT_EQ(lines[0]["user"], "mallory");
  EXPECT_EQ(lines[0]["device"], "phone");
  EXPECT_EQ(lines[0]["vm"], "vm1");
  EXPECT_EQ(lines[0]["reason"], "it belongs to user alice");
  EXPECT_TRUE(lines[0]["time"].get<std::string>().ends_with("Z"));
  EXPECT_FALSE(lines[1].contains("user"));
  EXPECT_FALSE(lines[1].contains("reason"));
  EXPECT_EQ(lines[2]["device"], "tablet");  // a name that is not UTF-8 still makes a line
  struct stat st{};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST(AuditLog, RepeatedEventsOfOneKeyAreCountedNotWritten) {
  testing::TempDir dir;
  const std::string path = dir.path() + "/audit.jsonl";
  AuditLog log(path);
  const AuditEvent failed{.action = "connect", .result = "refused", .reason = "bad certificate", .from = "10.0.0.9"};
  for (int i = 0; i < 100; ++i) log.recordLimited("connect 10.0.0.9", failed, std::chrono::milliseconds(200));
  log.recordLimited("connect 10.0.0.7", failed, std::chrono::milliseconds(200));
  std::this_thread::sleep_for(std::chrono::milliseconds(250));
  log.recordLimited("connect 10.0.0.9", failed, std::chrono::milliseconds(200));
  auto lines = linesOf(path);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_FALSE(lines[0].contains("suppressed"));
  EXPECT_EQ(lines[2]["suppressed"], 99);
  EXPECT_EQ(lines[2]["from"], "10.0.0.9");
}

}  // namespace
}  // namespace vmsync
