// One server, two users with two VMs each, on three devices per user: each
// VM runs on one device and is followed by another, a switch of one VM goes
// while the others run and push on, every user sees and touches only their own VMs,
// and when every VM is parked each standby has applied (and checked the
// digest of) its VM's final checkpoint.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "base/version.h"
#include "cluster.h"
#include "metrics_scrape.h"

namespace vmsync::testing {
namespace {

constexpr auto kBootAndSync = std::chrono::seconds(300);

/// The daemons of several VMs of several users against the cluster's server.
class Fleet {
 public:
  Fleet(Cluster& cluster, std::string dir) : cluster_(cluster), dir_(std::move(dir)) {}

  std::string stateDir(const std::string& user, const std::string& vm, const std::string& device) const {
    return dir_ + "/" + user + "-" + vm + "-" + device;
  }
  std::string key(const std::string& user, const std::string& vm, const std::string& device) const {
    return user + "/" + vm + "/" + device;
  }
  /// Starts `vmsync active` (or standby) of `user`'s `device` for `vm`.
  void start(bool active, const std::string& user, const std::string& vm, const std::string& device) {
    std::vector<std::string> argv{vmsyncBinary(), active ? "active" : "standby", "--device", device,
                                  "--vm",         vm,     "--state",  stateDir(user, vm, device),
                                  "--server",     cluster_.address(), "--credential", cluster_.credential(device, user),
                                  "--interval",   "1"};
    if (active) argv.insert(argv.end(), {"--image", guestImage(), "--accel", "tcg"});
    const std::string k = key(user, vm, device);
    daemons_[k] = std::make_unique<Process>(argv, dir_ + "/" + user + "-" + vm + "-" + device + ".log");
  }
  /// `vmsync ARGS --credential (user's cli) --server ...`: exit status; output
  /// in `out`, with stderr too unless `errors` takes it (a --json report is
  /// stdout alone: a switch says on stderr how its target catches up).
  int vmsync(const std::string& user, std::vector<std::string> args, std::string* out,
             std::string* errors = nullptr) {
    args.insert(args.begin(), vmsyncBinary());
    args.insert(args.end(), {"--server", cluster_.address(), "--credential", cluster_.credential("cli", user)});
    return run(args, out, errors);
  }
  /// `vmsync status --vm VM --json` as `user`, or null.
  nlohmann::json status(const std::string& user, const std::string& vm) {
    std::string out, errors;
    if (vmsync(user, {"status", "--vm", vm, "--json"}, &out, &errors) != 0) return nullptr;
    try {
      return nlohmann::json::parse(out);
    } catch (const nlohmann::json::exception&) {
      return nullptr;
    }
  }
  std::uint64_t head(const std::string& user, const std::string& vm) {
    auto s = status(user, vm);
    return s.is_null() ? 0 : s["head_sequence"].get<std::uint64_t>();
  }
  /// Every device of `vm` online, none stale, the head at least `sequence`.
  bool waitForHead(const std::string& user, const std::string& vm, std::uint64_t sequence,
                   std::chrono::seconds timeout) {
    return waitFor(
        [&] {
          auto s = status(user, vm);
          if (s.is_null() || s["head_sequence"].get<std::uint64_t>() < sequence || s["devices"].size() < 2)
            return false;
          for (const auto& d : s["devices"])
            if (d["state"] != "online") return false;
          return true;
        },
        timeout);
  }
  std::string logs(const std::string& user, const std::string& vm) const {
    std::string text;
    for (const auto& [k, p] : daemons_)
      if (k.starts_with(user + "/" + vm + "/")) {
        std::string log = readFile(p->logPath());
        if (log.size() > 4000) log = "..." + log.substr(log.size() - 4000);
        text += "---- " + k + " ----\n" + log;
      }
    return text;
  }
  Process& daemon(const std::string& user, const std::string& vm, const std::string& device) {
    return *daemons_.at(key(user, vm, device));
  }

 private:
  Cluster& cluster_;
  std::string dir_;
  std::map<std::string, std::unique_ptr<Process>> daemons_;
};

struct VmPlan {
  std::string user, vm, active, standby;
};

TEST(MultiVm, TwoUsersTwoVmsEachSwitchWhileOthersRunAndSeeOnlyTheirOwn) {
  std::string missing = missingForVm();
  if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer({"--metrics-listen", "127.0.0.1:0"});
  Fleet fleet(cluster, dir.path());
  // Three devices per user; each VM runs on one and is followed by another.
  const std::vector<VmPlan> plan{{"alice", "work", "phone", "laptop"},
                                 {"alice", "home", "laptop", "tablet"},
                                 {"bob", "work", "tablet", "phone"},
                                 {"bob", "home", "phone", "laptop"}};
  for (const auto& p : plan) {
    fleet.start(false, p.user, p.vm, p.standby);
    fleet.start(true, p.user, p.vm, p.active);
  }
  for (const auto& p : plan)
    ASSERT_TRUE(fleet.waitForHead(p.user, p.vm, 3, kBootAndSync)) << fleet.logs(p.user, p.vm) << cluster.logOf("server");

  // Each user lists exactly their own two VMs.
  for (const std::string user : {"alice", "bob"}) {
    std::string out, errors;
    ASSERT_EQ(fleet.vmsync(user, {"status", "--json"}, &out, &errors), 0) << out << errors;
    std::set<std::string> seen;
    const auto listed = nlohmann::json::parse(out);
    for (const auto& vm : listed["vms"]) {
      EXPECT_EQ(vm["user"], user) << out;
      EXPECT_GE(vm["head_sequence"].get<std::uint64_t>(), 3u) << out;
      EXPECT_GT(vm["chain_bytes"].get<std::uint64_t>(), 0u) << out;
      seen.insert(vm["name"].get<std::string>());
    }
    EXPECT_EQ(seen, (std::set<std::string>{"home", "work"})) << out;
  }
  // And touches nothing of the other's, by any name.
  for (const auto& [who, args] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"alice", {"status", "--vm", "bob/work"}},
           {"alice", {"switch", "--vm", "bob/work", "--to", "phone"}},
           {"bob", {"stop", "--vm", "alice/home"}},
           {"bob", {"switch", "--vm", "alice/work", "--to", "tablet", "--force"}}}) {
    std::string out;
    EXPECT_NE(fleet.vmsync(who, args, &out), 0) << args[0] << " " << args[2] << ": " << out;
    EXPECT_NE(out.find(std::string("it belongs to user ") + (who == "alice" ? "bob" : "alice")), std::string::npos)
        << out;
  }

  // alice/work moves phone -> laptop while bob/home keeps pushing.
  const std::uint64_t otherBefore = fleet.head("bob", "home");
  std::string out, errors;
  ASSERT_EQ(fleet.vmsync("alice", {"switch", "--vm", "work", "--to", "laptop", "--json"}, &out, &errors), 0)
      << out << errors << fleet.logs("alice", "work");
  const auto report = nlohmann::json::parse(out);
  EXPECT_EQ(report["from"], "phone");
  EXPECT_EQ(report["to"], "laptop");
  EXPECT_EQ(fleet.status("alice", "work")["active_device"], "laptop");
  // bob/work moves tablet -> phone; meanwhile the others go on.
  ASSERT_EQ(fleet.vmsync("bob", {"switch", "--vm", "work", "--to", "phone"}, &out), 0)
      << out << fleet.logs("bob", "work");
  EXPECT_EQ(fleet.status("bob", "work")["active_device"], "phone");
  EXPECT_TRUE(waitFor([&] { return fleet.head("bob", "home") >= otherBefore + 3; }, std::chrono::seconds(60)))
      << "bob/home stopped pushing during the switches of the other VMs\n" << fleet.logs("bob", "home");
  // alice's other VM ran on where it was.
  EXPECT_EQ(fleet.status("alice", "home")["active_device"], "laptop");

  // Every VM parked: each standby applies the final checkpoint, whose image
  // digest it checks before it confirms, and the daemons that ran them exit.
  for (const auto& p : plan) {
    ASSERT_EQ(fleet.vmsync(p.user, {"stop", "--vm", p.vm}, &out), 0) << out << fleet.logs(p.user, p.vm);
    auto s = fleet.status(p.user, p.vm);
    ASSERT_FALSE(s.is_null());
    EXPECT_TRUE(s["parked"].get<bool>()) << s.dump();
  }
  for (const auto& p : plan) {
    const std::uint64_t head = fleet.head(p.user, p.vm);
    EXPECT_TRUE(waitFor(
        [&] {
          auto s = fleet.status(p.user, p.vm);
          if (s.is_null()) return false;
          for (const auto& d : s["devices"])
            if (d["state"] != "offline" && d["applied_sequence"].get<std::uint64_t>() != head) return false;
          return true;
        },
        std::chrono::seconds(60)))
        << p.user << "/" << p.vm << ": a standby did not apply the final checkpoint\n"
        << fleet.logs(p.user, p.vm);
    // One device applied it when it parked the VM, the other when it was sent it.
    auto s = fleet.status(p.user, p.vm);
    std::size_t atHead = 0;
    for (const auto& d : s["devices"]) atHead += d["applied_sequence"].get<std::uint64_t>() == head;
    EXPECT_EQ(atHead, 2u) << s.dump();
  }
  const std::string serverLog = readFile(dir.path() + "/server.log");

  // The server's metrics, scraped as Prometheus would: every VM's stored
  // checkpoints (all parked, so no more come), the two switches with their
  // phases, and the four refusals by action.
  const int port = metricsPortInLog(serverLog);
  ASSERT_GT(port, 0) << "the server did not log its metrics port\n" << serverLog;
  const std::string metrics = scrapeMetrics(port);
  for (const auto& p : plan)
    EXPECT_EQ(metricSample(metrics, "vmsync_server_checkpoints_stored_total", {"vm=\"" + p.user + "/" + p.vm + "\""}),
              static_cast<double>(fleet.head(p.user, p.vm)))
        << p.user << "/" << p.vm << "\n" << metrics;
  EXPECT_EQ(metricSample(metrics, "vmsync_server_switches_total", {R"(kind="switch")", R"(result="done")"}), 2)
      << metrics;
  EXPECT_EQ(metricSample(metrics, "vmsync_server_switch_seconds_count", {R"(kind="switch")", R"(phase="total")"}), 2)
      << metrics;
  EXPECT_GT(metricSample(metrics, "vmsync_server_switch_seconds_sum", {R"(kind="switch")", R"(phase="transfer")"}), 0)
      << metrics;
  EXPECT_EQ(metricSum(metrics, "vmsync_server_refused_total"), 4) << metrics;
  EXPECT_EQ(metricSample(metrics, "vmsync_build_info",
                         {"version=\"" + std::string(buildVersion()) + "\"", "commit=\"" + std::string(buildCommit()) + "\""}),
            1)
      << metrics;
  EXPECT_EQ(metricSample(metrics, "vmsync_server_refused_total", {R"(action="switch")"}), 2) << metrics;
  for (const auto& p : plan)
    EXPECT_NE(serverLog.find("VM " + p.user + "/" + p.vm + " created for device"), std::string::npos)
        << p.user << "/" << p.vm;

  // A state directory is one VM's: naming another VM for it is refused.
  ASSERT_EQ(run({vmsyncBinary(), "standby", "--device", "laptop", "--vm", "home", "--state",
                 fleet.stateDir("alice", "work", "laptop"), "--server", cluster.address(), "--credential",
                 cluster.credential("laptop", "alice")},
                &out),
            1)
      << out;
  EXPECT_NE(out.find("holds VM 'work', not 'home'"), std::string::npos) << out;
}

}  // namespace
}  // namespace vmsync::testing
