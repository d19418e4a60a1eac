#include "chaos.h"

#include <fmt/format.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <regex>
#include <set>
#include <thread>

#include "base/error.h"
#include "chain_image.h"
#include "checkpoint/checkpoint_identity.h"
#include "cluster.h"
#include "harvest/unit_hashes.h"
#include "chaos_monitor.h"
#include "chaos_schedule.h"
#include "durability_checker.h"
#include "power_cut_mount.h"
#include "transport/rpc_util.h"
#include "vmm/qmp_client.h"

namespace vmsync::testing {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

/// How long one step may take to settle: one VM running, every device at the head.
/// ("At the head": holding the head as it was when the wait began.)
constexpr auto kSettle = std::chrono::seconds(150);

/// "exited with status N" or "was killed by signal N (name)", from a wait status.
std::string howItEnded(int status) {
  if (WIFSIGNALED(status))
    return fmt::format("was killed by signal {} ({})", WTERMSIG(status), ::strsignal(WTERMSIG(status)));
  return fmt::format("exited with status {}", WEXITSTATUS(status));
}

class Harness {
 public:
  explicit Harness(const ChaosOptions& o)
      : options_(o),
        // Kept for `vmsync_chaos --check`; fsyncs of 20 ms, as a loaded disk's.
        serverDisk_(o.dir + "/server", /*keepContents=*/true, std::chrono::milliseconds(20)),
        cluster_(o.dir),
        events_(o.dir + "/events.log") {
    if (!serverDisk_.missing().empty())
      throw Error("the server's power-cut file system did not mount: " + serverDisk_.missing());
    result_.seed = o.seed;
    result_.steps = o.steps;
  }

  ChaosResult run() {
    start();
    Monitor monitor(cluster_);
    monitor_ = &monitor;
    const auto steps = schedule(options_.seed, options_.steps, options_.deadLinkSeconds);
    for (int i = 0; i < static_cast<int>(steps.size()) && result_.failures.empty(); ++i) {
      step_ = i + 1;
      log(fmt::format("step {}: {}", step_, describe(steps[i])));
      ++result_.events[kindName(steps[i].kind)];
      execute(steps[i]);
      settle();
      check(fmt::format("after step {}", step_));
    }
    if (result_.failures.empty()) finish();
    monitor.stop();
    check("at the end");
    result_.counterValues = monitor.counter().size();
    if (result_.acknowledged == 0) result_.failures.push_back("no checkpoint was acknowledged: nothing was checked");
    if (result_.counterValues == 0) result_.failures.push_back("no counter value was read: continuity unchecked");
    monitor_ = nullptr;
    result_.wallSeconds = std::chrono::duration<double>(Clock::now() - t0_).count();
    log(result_.failures.empty() ? "passed" : fmt::format("FAILED: {}", result_.failures.front()));
    return result_;
  }

 private:
  void log(const std::string& text) {
    const double t = std::chrono::duration<double>(Clock::now() - t0_).count();
    const std::string line = fmt::format("[{:9.3f}] seed {} {}\n", t, options_.seed, text);
    events_ << line << std::flush;
    if (options_.progress) *options_.progress << line << std::flush;
  }

  void fail(const std::string& what) {
    result_.failures.push_back(fmt::format("step {}: {}", step_, what));
    log("failure: " + what);
  }

  void start() {
    // The relays of the network lab run in this process.
    setDeadLinkSeconds(options_.deadLinkSeconds);
    cluster_.useNetworkLab(options_.seed);
    std::mt19937_64 random(options_.seed ^ 0x5eedull);
    // The first full checkpoint goes over wifi; the seed then gives each
    // link its profile (wifi or lte) for the schedule.
    for (const auto& d : kDevices) cluster_.setLink(d, "wifi");
    startServer();
    cluster_.startActive("A", deviceOptions());
    cluster_.startStandby("B", deviceOptions());
    cluster_.startStandby("C", deviceOptions());
    if (!cluster_.waitForHead(3, std::chrono::seconds(300)))
      throw Error("the cluster did not sync its first checkpoints:\n" + cluster_.logOf("A") + cluster_.logOf("server"));
    if (!waitFor([&] { return counterValues(readFile(cluster_.serialLog("A"))).size() >= 3; },
                 std::chrono::seconds(300)))
      throw Error("the guest on A is not counting:\n" + cluster_.logOf("A"));
    for (const auto& d : kDevices) {
      profile_[d] = kProfiles[std::uniform_int_distribution<std::size_t>(0, 1)(random)];
      cluster_.setProfile(d, profile_[d]);
    }
    log(fmt::format("cluster up: links A {}, B {}, C {}", profile_["A"], profile_["B"], profile_["C"]));
  }

  std::vector<std::string> deviceOptions() const {
    return {"--block-source", "scan", "--resumable-every", "2", "--dead-link-timeout",
            std::to_string(options_.deadLinkSeconds)};
  }
  void startServer() {
    cluster_.startServer({"--lease-timeout", std::to_string(options_.leaseTimeoutSeconds), "--dead-link-timeout",
                          std::to_string(options_.deadLinkSeconds)});
  }

  std::string active() {
    auto s = cluster_.status();
    return s ? (*s)["active_device"].get<std::string>() : std::string();
  }
  /// The pick-th device other than `not`.
  std::string other(const std::string& notThis, int pick) {
    std::vector<std::string> others;
    for (const auto& d : kDevices)
      if (d != notThis) others.push_back(d);
    return others[static_cast<std::size_t>(pick) % others.size()];
  }

  void execute(const Step& s) {
    switch (s.kind) {
      case Kind::Switch: {
        const std::string from = active();
        const std::string to = other(from, s.pick);
        switchTo(from, to, nullptr, nullptr);
        break;
      }
      case Kind::SwitchCut: {
        const std::string from = active();
        const std::string to = other(from, s.pick);
        switchTo(from, to, &s, [&] { cut(s.cutSource ? from : to, s.durationMs); });
        break;
      }
      case Kind::SwitchKill: killDuringSwitch(s); break;
      case Kind::Flap: {
        const std::string d = kDevices[static_cast<std::size_t>(s.pick) % kDevices.size()];
        cut(d, s.durationMs);
        break;
      }
      case Kind::ServerKill: {
        cutServerPower();
        cluster_.server().kill();  // SIGKILL
        log("server killed");
        restartServerAfter(s.durationMs);
        break;
      }
      case Kind::StandbyKill: {
        const std::string victim = other(active(), s.pick);
        cluster_.device(victim).kill();  // SIGKILL
        log("standby " + victim + " killed");
        std::this_thread::sleep_for(std::chrono::milliseconds(s.durationMs));
        cluster_.startStandby(victim, deviceOptions());
        log("standby " + victim + " restarted");
        break;
      }
      case Kind::ActiveKill: killActive(s); break;
      case Kind::Profile: {
        const std::string d = kDevices[static_cast<std::size_t>(s.pick) % kDevices.size()];
        cluster_.setProfile(d, s.profile);
        profile_[d] = s.profile;
        log("link of " + d + " is " + s.profile);
        break;
      }
      case Kind::Renumber: {
        // Its connections die with the old address: it is back once it has
        // registered again, from the new one (the server may take it for
        // online and at the head until then).
        const std::string d = kDevices[static_cast<std::size_t>(s.pick) % kDevices.size()];
        const std::string deviceLog = options_.dir + "/" + d + ".log";
        const std::size_t mark = readFile(deviceLog).size();
        log(d + "'s address is now " + cluster_.renumber(d));
        if (waitFor([&] { return readFile(deviceLog).find("registered with", mark) != std::string::npos; }, kSettle))
          log(d + " registered again from its new address");
        else
          fail(fmt::format("{} did not register again within {} s of its address change\n{}", d, kSettle.count(),
                           cluster_.logOf(d)));
        break;
      }
    }
  }

  void cut(const std::string& device, int ms) {
    cluster_.setLinkUp(device, false);
    log("link of " + device + " down");
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    cluster_.setLinkUp(device, true);
    log("link of " + device + " up");
  }

  /// Runs `vmsync switch` from `from` to `to`; with `fault`, calls it at the
  /// moment of the switch `timing` names, while the command runs.
  void switchTo(const std::string& from, const std::string& to, const Step* timing,
                const std::function<void()>& fault) {
    if (from.empty()) {
      fail("no device holds the lease before a switch");
      return;
    }
    const std::size_t serverLogAt = readFile(options_.dir + "/server.log").size();
    std::atomic<bool> finished{false};
    int rc = -1;
    std::string output;
    std::thread command([&] {
      nlohmann::json report;
      rc = cluster_.switchTo(to, &report, &output);
      finished = true;
    });
    if (fault) {
      // Wait for the moment of the switch the step names, then strike.
      auto paused = [&] {
        return readFile(options_.dir + "/server.log").find("pausing " + from, serverLogAt) != std::string::npos;
      };
      switch (timing->phase) {
        case Phase::AtStart: break;
        case Phase::AtPause:
        case Phase::AfterPause:
          waitFor([&] { return paused() || finished.load(); }, std::chrono::seconds(60));
          break;
        case Phase::AtEnd: waitFor([&] { return finished.load(); }, std::chrono::seconds(120)); break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(timing->delayMs));
      const bool during = !finished.load();
      if (during) ++result_.faultsDuringSwitch;
      log(fmt::format("the fault comes {} the switch", during ? "during" : "after"));
      fault();
    }
    command.join();
    if (rc == 0) {
      ++result_.switchesSucceeded;
      log(fmt::format("switch {} -> {} done", from, to));
    } else {
      ++result_.switchesFailed;
      std::string first = output.substr(0, output.find('\n'));
      log(fmt::format("switch {} -> {} failed: {}", from, to, first));
      if (!fault) fail(fmt::format("a switch {} -> {} on healed links failed: {}", from, to, output));
    }
  }

  void killDuringSwitch(const Step& s) {
    const std::string from = active();
    const std::string to = other(from, s.pick);
    const std::string who = victimName(s);
    const std::string victim = who == "server" ? "" : who == "source" ? from : to;  // "": the server
    switchTo(from, to, &s, [&] {
      if (victim.empty()) {
        cutServerPower();
        cluster_.server().kill();
        log("server killed");
      } else {
        cluster_.device(victim).kill();  // SIGKILL; its QEMU, if any, dies with it
        log("device " + victim + " killed");
      }
    });
    if (victim.empty()) {
      restartServerAfter(s.durationMs);
      return;
    }
    recoverLostDevice(victim, s.pick);
  }

  /// The server's power goes (kill it next): its data directory keeps only
  /// what was fsynced, and nothing it writes from now on lands.
  void cutServerPower() {
    log("power cut of the server's disk: " + describe(serverDisk_.cut()));
  }

  /// Starts the killed server again after `ms` (its disk's power back
  /// first), and checks the store at once.
  void restartServerAfter(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    serverDisk_.restore();
    startServer();
    log("server restarted");
    if (!waitFor([&] { return cluster_.status().has_value(); }, std::chrono::seconds(30)))
      fail("the server did not come back after kill -9 and a power cut:\n" + cluster_.logOf("server"));
    check(fmt::format("step {}, right after the server's restart", step_));
  }

  /// `victim`'s daemon was killed: if the VM ran there or nowhere runs now,
  /// the VM fails over (forced, once the lease has timed out) to another
  /// device; then `victim` comes back as a standby.
  void recoverLostDevice(const std::string& victim, int pick) {
    if (!waitFor([&] { return monitor_->running().count(victim) == 0; }, std::chrono::seconds(20)))
      fail("the VM of " + victim + " still runs after its daemon was killed");
    // A failed switch resumes the source by itself: give it the time to.
    const bool elsewhere = waitFor(
        [&] {
          const auto running = monitor_->running();
          return running.size() == 1 && !running.count(victim);
        },
        std::chrono::seconds(options_.leaseTimeoutSeconds + 5));
    if (!elsewhere) failOver(victim, other(victim, pick));
    cluster_.startStandby(victim, deviceOptions());
    log("lost device " + victim + " back as a standby");
  }

  /// `vmsync switch --force` to `to`, retried until the lease of the lost
  /// `victim` has timed out.
  void failOver(const std::string& victim, const std::string& to) {
    std::string output;
    nlohmann::json report;
    int rc = -1;
    waitFor(
        [&] {
          rc = cluster_.switchTo(to, &report, &output, /*force=*/true);
          if (rc != 0) std::this_thread::sleep_for(std::chrono::milliseconds(500));
          return rc == 0;
        },
        std::chrono::seconds(90));
    if (rc != 0) {
      fail(fmt::format("forced switch to {} after losing {} failed: {}", to, victim, output));
      return;
    }
    monitor_->allowRollback();
    ++result_.forcedFailovers;
    log(fmt::format("forced switch to {} done ({} lost)", to, victim));
  }

  void killActive(const Step& s) {
    const std::string victim = active();
    if (victim.empty()) {
      fail("no device holds the lease");
      return;
    }
    cluster_.device(victim).kill();  // SIGKILL; its QEMU dies with it (parent-death signal)
    log("active " + victim + " killed");
    if (!waitFor([&] { return monitor_->running().count(victim) == 0; }, std::chrono::seconds(20)))
      fail("the VM of " + victim + " still runs after its daemon was killed");
    failOver(victim, other(victim, s.pick));
    cluster_.startStandby(victim, deviceOptions());
    log("lost device " + victim + " back as a standby");
  }

  /// Waits, links healed, until exactly one VM runs (the lease holder's) and
  /// every device is online at the head; records how long that took.
  void settle() {
    if (!result_.failures.empty()) return;
    const auto t = Clock::now();
    std::string last;
    std::string died;
    // Checkpoints go on meanwhile: a device on a slow link is always a push
    // or two behind the head of the instant. It has converged once it holds
    // the head as it was when the wait began.
    std::uint64_t target = 0;
    const bool settled = waitFor(
        [&] {
          // Every process the harness started runs, unless it killed it.
          for (const auto& d : kDevices)
            if (!cluster_.device(d).running()) died = d + "'s daemon " + howItEnded(cluster_.device(d).status());
          if (!cluster_.server().running()) died = "the server " + howItEnded(cluster_.server().status());
          if (!died.empty()) return true;
          auto s = cluster_.status();
          if (!s) {
            last = "the server does not answer";
            return false;
          }
          const std::string holder = (*s)["active_device"];
          const std::uint64_t head = (*s)["head_sequence"];
          if (target == 0 || head < target) target = head;  // a failover takes the head back
          const auto running = monitor_->running();
          if (running.size() != 1 || holder.empty() || !running.count(holder)) {
            last = fmt::format("holder '{}', {} VM(s) running", holder, running.size());
            return false;
          }
          for (const auto& d : (*s)["devices"]) {
            if (d["state"] == "offline" || (d["device"] != holder && d["applied_sequence"] < target)) {
              last = fmt::format("device {} is {} at {}, short of {} (head {})", d["device"].get<std::string>(),
                                 d["state"].get<std::string>(), d["applied_sequence"].get<std::uint64_t>(), target,
                                 head);
              return false;
            }
          }
          return (*s)["devices"].size() == kDevices.size();
        },
        kSettle);
    const double seconds = std::chrono::duration<double>(Clock::now() - t).count();
    if (!died.empty()) {
      fail(fmt::format("{} by itself\n{}{}{}{}", died, cluster_.logOf("server"), cluster_.logOf("A"),
                       cluster_.logOf("B"), cluster_.logOf("C")));
      return;
    }
    if (!settled) {
      fail(fmt::format("not settled {:.0f} s after the step: {}\n{}{}{}{}", seconds, last, cluster_.logOf("server"),
                       cluster_.logOf("A"), cluster_.logOf("B"), cluster_.logOf("C")));
      return;
    }
    result_.convergenceSeconds.push_back(seconds);
    log(fmt::format("settled in {:.1f} s", seconds));
  }

  void check(const std::string& when) {
    checkDurability(options_.dir, result_, when);
    for (const auto& o : monitor_ ? monitor_->overlaps() : std::vector<std::string>{}) {
      if (reportedOverlaps_.insert(o).second) {
        ++result_.twoRunning;
        fail("two VMs running: " + o);
      }
    }
    for (const auto& c : monitor_ ? monitor_->continuityFailures() : std::vector<std::string>{}) {
      if (reportedContinuity_.insert(c).second) fail("guest counter: " + c);
    }
  }

  /// The schedule is over: every device takes the VM once more on healed
  /// links, the target verifying the final checkpoint's image digest.
  void finish() {
    for (const auto& d : kDevices) cluster_.setLinkUp(d, true);
    std::string from = active();
    for (int i = 0; i < static_cast<int>(kDevices.size()) && result_.failures.empty(); ++i) {
      const auto at = std::find(kDevices.begin(), kDevices.end(), from);
      const std::string to = at == kDevices.end() ? kDevices.front() : kDevices[(at - kDevices.begin() + 1) % kDevices.size()];
      step_ = options_.steps + i + 1;
      log(fmt::format("final round: switch {} -> {}", from, to));
      switchTo(from, to, nullptr, nullptr);
      settle();
      from = to;
    }
  }

  ChaosOptions options_;
  PowerCutMount serverDisk_;  // the server's data directory; unmounted after the cluster stops
  Cluster cluster_;
  std::ofstream events_;
  ChaosResult result_;
  Monitor* monitor_ = nullptr;
  std::map<std::string, std::string> profile_;
  std::set<std::string> reportedOverlaps_, reportedContinuity_;
  int step_ = 0;
  Clock::time_point t0_ = Clock::now();
};

}  // namespace

ChaosResult runChaos(const ChaosOptions& options) {
  Harness harness(options);
  return harness.run();
}

std::vector<std::string> describeSchedule(std::uint64_t seed, int steps, int deadLinkSeconds) {
  std::vector<std::string> out;
  int i = 0;
  for (const auto& s : schedule(seed, steps, deadLinkSeconds)) out.push_back(fmt::format("step {}: {}", ++i, describe(s)));
  return out;
}

ChaosResult checkAcknowledged(const std::string& dir) {
  ChaosResult result;
  checkDurability(dir, result, "check");
  return result;
}

std::string missingForChaos() {
  std::string missing = missingForVm();
  if (missing.empty()) missing = missingForNetworkLab();
  if (missing.empty()) missing = PowerCutMount::unavailableReason();
  return missing;
}

std::string summaryTable(const std::vector<ChaosResult>& results) {
  const char* header =
      "{:>6} {:>6} {:>8} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6} {:>6} {:>5} {:>6} {:>8} {:>8} "
      "{:>7}  {}\n";
  std::string out = fmt::format(fmt::runtime(header), "seed", "steps", "switches", "failed", "cut", "kill", "mid",
                                "flap", "srv", "sby", "act", "link", "renum", "forced", "acked", "lost", "two-on",
                                "conv-med", "conv-max", "time", "result");
  auto row = [&](const std::string& seed, const ChaosResult& r, std::vector<double> conv, bool passed) {
    std::sort(conv.begin(), conv.end());
    const double median = conv.empty() ? 0 : conv[conv.size() / 2];
    const double max = conv.empty() ? 0 : conv.back();
    auto count = [&](Kind k) {
      auto it = r.events.find(kindName(k));
      return it == r.events.end() ? 0 : it->second;
    };
    out += fmt::format("{:>6} {:>6} {:>8} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6} {:>6} {:>5} "
                       "{:>6} {:>7.1f}s {:>7.1f}s {:>6.1f}m  {}\n",
                       seed, r.steps, r.switchesSucceeded + r.switchesFailed, r.switchesFailed, count(Kind::SwitchCut),
                       count(Kind::SwitchKill), r.faultsDuringSwitch, count(Kind::Flap), count(Kind::ServerKill),
                       count(Kind::StandbyKill), count(Kind::ActiveKill), count(Kind::Profile), count(Kind::Renumber),
                       r.forcedFailovers,
                       r.acknowledged, r.lost, r.twoRunning, median, max, r.wallSeconds / 60, passed ? "pass" : "FAIL");
  };
  ChaosResult total;
  std::vector<double> all;
  bool passed = true;
  for (const auto& r : results) {
    row(std::to_string(r.seed), r, r.convergenceSeconds, r.passed());
    total.steps += r.steps;
    total.switchesSucceeded += r.switchesSucceeded;
    total.switchesFailed += r.switchesFailed;
    total.faultsDuringSwitch += r.faultsDuringSwitch;
    total.forcedFailovers += r.forcedFailovers;
    for (const auto& [k, n] : r.events) total.events[k] += n;
    total.acknowledged += r.acknowledged;
    total.wallSeconds += r.wallSeconds;
    total.lost += r.lost;
    total.twoRunning += r.twoRunning;
    all.insert(all.end(), r.convergenceSeconds.begin(), r.convergenceSeconds.end());
    passed = passed && r.passed();
  }
  if (results.size() > 1) row("total", total, all, passed);
  out += "switches: every switch command, the final round's included (failed: refused or cut short by a fault);\n"
         "cut, kill: switches with a link cut or a kill -9 (server, source or target) at a chosen moment; mid: of\n"
         "those, the faults that struck while the command still ran; flap: link outages; srv, sby, act: kill -9\n"
         "of the server, a standby, the active device (each kill of the server comes with a power cut of its\n"
         "data directory); link: profile changes; renum: a device's address changed (its connections die, it\n"
         "comes back from the new address); forced: forced failovers; acked:\n"
         "checkpoints acknowledged to devices, each found in the store by digest, folded into the base, or\n"
         "abandoned by a failover; lost: acknowledged but not there; two-on: moments two VMs answered running;\n"
         "conv: time from the end of a step to one VM running, on the lease holder, and every device holding the\n"
         "head as it was then; time: minutes the run took, the cluster's set-up included.\n";
  return out;
}

}  // namespace vmsync::testing
