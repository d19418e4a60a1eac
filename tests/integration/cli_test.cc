// The command line as people meet it: --version, exit codes and the errors
// of a wrong command line, the config file, bash completion and NO_COLOR.
// Every case runs the built `vmsync` binary.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "test_env.h"

namespace vmsync::testing {
namespace {

struct Result {
  int exitCode;
  std::string out;
  std::string err;
};

Result vmsync(std::vector<std::string> args) {
  args.insert(args.begin(), vmsyncBinary());
  Result r;
  r.exitCode = run(args, &r.out, &r.err);
  return r;
}

void writeFile(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
}

TEST(Cli, VersionNamesTheReleaseAndTheCommit) {
  const auto r = vmsync({"--version"});
  EXPECT_EQ(r.exitCode, 0) << r.err;
  const std::regex line("vmsync [0-9]+\\.[0-9]+\\.[0-9]+ \\(commit [0-9a-f]{12}(-dirty)?\\)\n");
  EXPECT_TRUE(std::regex_match(r.out, line))
      << "got: " << r.out;
}

TEST(Cli, AnUnknownCommandIsNamedWithTheCommandsThereAre) {
  auto r = vmsync({"frobnicate"});
  EXPECT_EQ(r.exitCode, 2);
  EXPECT_NE(r.err.find("`vmsync` has no command 'frobnicate'"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("switch"), std::string::npos) << r.err;

  r = vmsync({"bench", "swich"});
  EXPECT_EQ(r.exitCode, 2);
  EXPECT_NE(r.err.find("`vmsync bench` has no command 'swich'; its commands are: switch, server"), std::string::npos)
      << r.err;

  r = vmsync({"bench"});
  EXPECT_EQ(r.exitCode, 2);
  EXPECT_NE(r.err.find("`vmsync bench` needs a command: switch, server"), std::string::npos) << r.err;
}

TEST(Cli, ABadOptionIsAUsageErrorAndAFailedCommandIsNot) {
  auto r = vmsync({"status", "--bogus"});
  EXPECT_EQ(r.exitCode, 2);
  EXPECT_NE(r.err.find("--bogus"), std::string::npos) << r.err;

  r = vmsync({"active", "--device", "A", "--state", "/tmp/x", "--accel", "warp"});
  EXPECT_EQ(r.exitCode, 2);
  EXPECT_NE(r.err.find("warp"), std::string::npos) << r.err;

  const std::string closed = "127.0.0.1:" + std::to_string(freePort());
  r = vmsync({"status", "--insecure", "--server", closed});
  EXPECT_EQ(r.exitCode, 1);
  EXPECT_NE(r.err.find("cannot reach the sync server at " + closed), std::string::npos) << r.err;
}

TEST(Cli, TheConfigFileGivesWhatTheCommandLineLeavesOut) {
  TempDir dir;
  const std::string fromTop = "127.0.0.1:" + std::to_string(freePort());
  const std::string fromSection = "127.0.0.1:" + std::to_string(freePort());
  const std::string fromCommandLine = "127.0.0.1:" + std::to_string(freePort());
  writeFile(dir / "vmsync.toml", "# shared by every command that talks to a server\n"
                                 "server = \"" + fromTop + "\"\n"
                                 "insecure = true\n"
                                 "[status]\n"
                                 "server = \"" + fromSection + "\"\n");
  // `stop` takes the top-level key, `status` its own section's.
  auto r = vmsync({"--config", dir / "vmsync.toml", "stop"});
  EXPECT_EQ(r.exitCode, 1);
  EXPECT_NE(r.err.find("cannot reach the sync server at " + fromTop), std::string::npos) << r.err;
  r = vmsync({"--config", dir / "vmsync.toml", "status"});
  EXPECT_EQ(r.exitCode, 1);
  EXPECT_NE(r.err.find("cannot reach the sync server at " + fromSection), std::string::npos) << r.err;
  // A top-level key every command with the option overrides in its section
  // is still a known key.
  writeFile(dir / "shadowed.toml", "server = \"" + fromTop + "\"\ninsecure = true\n[status]\nserver = \"" +
                                       fromSection + "\"\n[stop]\nserver = \"" + fromSection +
                                       "\"\n[switch]\nserver = \"" + fromSection + "\"\n[active]\nserver = \"" +
                                       fromSection + "\"\n[standby]\nserver = \"" + fromSection + "\"\n");
  r = vmsync({"--config", dir / "shadowed.toml", "status"});
  EXPECT_EQ(r.exitCode, 1) << r.err;
  EXPECT_NE(r.err.find("cannot reach the sync server at " + fromSection), std::string::npos) << r.err;
  // The command line wins.
  r = vmsync({"--config", dir / "vmsync.toml", "status", "--server", fromCommandLine});
  EXPECT_NE(r.err.find("cannot reach the sync server at " + fromCommandLine), std::string::npos) << r.err;
  // A device's own name does not reach the commands that name the device they
  // act on: `enroll` without --device is still missing it.
  writeFile(dir / "device.toml", "device = \"A\"\n");
  r = vmsync({"--config", dir / "device.toml", "enroll", "--dir", dir / "id", "--user", "u", "--out", dir / "u.cred"});
  EXPECT_EQ(r.exitCode, 2);
  EXPECT_NE(r.err.find("--device is required"), std::string::npos) << r.err;
  // $VMSYNC_CONFIG names the file when --config does not.
  r.exitCode = run({"env", "VMSYNC_CONFIG=" + (dir / "vmsync.toml"), vmsyncBinary(), "stop"}, &r.out, &r.err);
  EXPECT_EQ(r.exitCode, 1);
  EXPECT_NE(r.err.find("cannot reach the sync server at " + fromTop), std::string::npos) << r.err;
}

TEST(Cli, AConfigFileThatIsWrongIsAUsageErrorNamingWhat) {
  TempDir dir;
  writeFile(dir / "typo.toml", "servr = \"127.0.0.1:1\"\n");
  auto r = vmsync({"--config", dir / "typo.toml", "status"});
  EXPECT_EQ(r.exitCode, 2);
  EXPECT_NE(r.err.find("unknown key 'servr'"), std::string::npos) << r.err;

  writeFile(dir / "section.toml", "[status]\nlisten = \"127.0.0.1:1\"\n");
  r = vmsync({"--config", dir / "section.toml", "status"});
  EXPECT_EQ(r.exitCode, 2);
  EXPECT_NE(r.err.find("`vmsync status` has no option --listen"), std::string::npos) << r.err;

  r = vmsync({"--config", dir / "absent.toml", "status"});
  EXPECT_EQ(r.exitCode, 2);
  EXPECT_NE(r.err.find("absent.toml"), std::string::npos) << r.err;
  r.exitCode = run({"env", "VMSYNC_CONFIG=" + (dir / "absent.toml"), vmsyncBinary(), "status"}, &r.out, &r.err);
  EXPECT_EQ(r.exitCode, 2);
  EXPECT_NE(r.err.find("absent.toml"), std::string::npos) << r.err;
}

TEST(Cli, AServerAndItsClientsRunFromOneConfigFile) {
  TempDir dir;
  const std::string address = "127.0.0.1:" + std::to_string(freePort());
  writeFile(dir / "vmsync.toml", "server = \"" + address + "\"\ninsecure = true\n"
                                 "[server]\nlisten = \"" + address + "\"\ndata = \"" + (dir / "data") + "\"\n");
  Process server({vmsyncBinary(), "--config", dir / "vmsync.toml", "server"}, dir / "server.log");
  ASSERT_TRUE(waitFor([&] { return readFile(dir / "server.log").find("listening on " + address) != std::string::npos; },
                      std::chrono::seconds(20)))
      << readFile(dir / "server.log");
  const auto r = vmsync({"--config", dir / "vmsync.toml", "status", "--json"});
  ASSERT_EQ(r.exitCode, 0) << r.err;
  const auto status = nlohmann::json::parse(r.out);
  ASSERT_TRUE(status.contains("vms")) << r.out;
  EXPECT_TRUE(status["vms"].is_array()) << r.out;
  EXPECT_EQ(status["vms"].size(), 0u) << r.out;
}

/// What the completion offers for a command line whose last word is `current`.
std::string complete(const std::string& script, const std::vector<std::string>& before, const std::string& current) {
  std::string words = "vmsync";
  for (const auto& w : before) words += " '" + w + "'";
  words += " '" + current + "'";
  const std::string program = "source '" + script + "' && COMP_WORDS=(" + words +
                              ") && COMP_CWORD=" + std::to_string(before.size() + 1) +
                              " && _vmsync && echo \"${COMPREPLY[*]}\"";
  std::string out;
  EXPECT_EQ(run({"bash", "--norc", "-c", program}, &out), 0) << out;
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

TEST(Cli, BashCompletionOffersCommandsOptionsAndValues) {
  TempDir dir;
  const auto r = vmsync({"completion", "bash"});
  ASSERT_EQ(r.exitCode, 0) << r.err;
  writeFile(dir / "vmsync.bash", r.out);
  const std::string script = dir / "vmsync.bash";

  EXPECT_EQ(complete(script, {}, ""),
            "server active standby switch status stop init enroll revoke completion study bench");
  EXPECT_EQ(complete(script, {"bench"}, "s"), "switch server");
  EXPECT_EQ(complete(script, {"active"}, "--acc"), "--accel");
  EXPECT_EQ(complete(script, {"active", "--accel"}, ""), "auto kvm tcg");
  // An option's value is not taken for a command: --state's value is skipped.
  EXPECT_EQ(complete(script, {"active", "--state", "switch"}, "--pol"), "--policy");
  EXPECT_EQ(complete(script, {"--log-level", "debug"}, "sw"), "switch");
  EXPECT_EQ(complete(script, {"switch", "--to", "B"}, "--js"), "--json");
  EXPECT_EQ(complete(script, {"active", "--interval"}, ""), "");
  writeFile(dir / "phone.cred", "");
  EXPECT_EQ(complete(script, {"standby", "--credential"}, dir / "phone."), dir / "phone.cred");

  std::string registered;
  ASSERT_EQ(run({"bash", "--norc", "-c", "source '" + script + "' && complete -p vmsync"}, &registered), 0);
  EXPECT_NE(registered.find("-F _vmsync"), std::string::npos) << registered;
}

TEST(Cli, NoColorTakesTheColoursOutOfTheLogOnATerminal) {
  TempDir dir;
  // The server logs at start-up; `script` gives it a terminal, where spdlog
  // colours the level unless NO_COLOR is set.
  auto logOnTerminal = [&](const std::string& environment) {
    const std::string address = "127.0.0.1:" + std::to_string(freePort());
    const std::string command = environment + " timeout -s INT 2 '" + vmsyncBinary() + "' server --insecure --listen " +
                                address + " --data '" + (dir / "data") + "'";
    std::string out;
    run({"script", "-qec", command, "/dev/null"}, &out);
    EXPECT_NE(out.find("listening on " + address), std::string::npos) << out;
    return out;
  };
  EXPECT_NE(logOnTerminal("").find("\x1b["), std::string::npos) << "without NO_COLOR the level is coloured";
  EXPECT_EQ(logOnTerminal("NO_COLOR=1").find("\x1b["), std::string::npos) << "NO_COLOR=1 leaves no colour";
}

}  // namespace
}  // namespace vmsync::testing
