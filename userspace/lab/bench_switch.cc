#include "lab/bench_switch.h"

#include <fcntl.h>
#include <kj/common.h>
#include <sched.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <thread>

#include "lab/delay_relay.h"
#include "lab/gnuplot.h"
#include "lab/lab_process.h"
#include "base/durable_file.h"
#include "base/error.h"
#include "lab/network_lab.h"
#include "vmm/qemu_vm.h"
#include "vmm/qmp_client.h"

namespace vmsync {

namespace fs = std::filesystem;

namespace {

constexpr std::uint16_t kServerPort = 7400;
constexpr std::uint16_t kMigrationPort = 7600;

/// One QEMU live migration.
struct Migration {
  bool completed = false;
  std::string status;
  double totalMs = 0;
  double downtimeMs = 0;
  double transferredBytes = 0;
};

/// A server and two devices, A active and B standby, each in its namespace.
class BenchCluster {
 public:
  /// The links start as `initialProfile` (see syncInitially) or as `profile`.
  BenchCluster(const BenchSwitchOptions& options, const LinkProfile& profile, const LinkProfile& initialProfile,
               const std::string& dir)
      : options_(options), profile_(profile), dir_(dir), lab_(kServerPort) {
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    lab_.addDevice("A", initialProfile);
    lab_.addDevice("B", initialProfile);
    const std::string self = selfBinary();
    // TLS as in real use: a server identity and a credential per device.
    runCommand({self, "init", "--dir", dir_ + "/identity", "--server-name", "vmsync-bench"});
    for (const char* device : {"A", "B", "cli"})
      runCommand({self, "enroll", "--dir", dir_ + "/identity", "--user", "bench", "--device", device, "--out",
                  credential(device)});
    server_ = std::make_unique<Child>(
        NetworkLab::inNamespace(lab_.serverNamespace(), {self, "server", "--listen", lab_.serverAddress(), "--data",
                                                          dir_ + "/server", "--tls", dir_ + "/identity"}),
        dir_ + "/server.log");
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    const std::string interval = fmt::format("{}", options_.intervalSeconds);
    const std::string target = std::to_string(options_.targetSwitchMs);
    devices_["A"] = std::make_unique<Child>(
        NetworkLab::inNamespace(lab_.deviceNamespace("A"),
                                {self, "active", "--device", "A", "--state", dir_ + "/A", "--server",
                                 lab_.serverAddressFor("A"), "--credential", credential("A"), "--image",
                                 options_.imageDir, "--accel", options_.accel,
                                 "--interval", interval, "--block-source", "scan", "--target-switch-ms", target}),
        dir_ + "/A.log");
    devices_["B"] = std::make_unique<Child>(
        NetworkLab::inNamespace(lab_.deviceNamespace("B"),
                                {self, "standby", "--device", "B", "--state", dir_ + "/B", "--server",
                                 lab_.serverAddressFor("B"), "--credential", credential("B"), "--interval", interval,
                                 "--block-source", "scan",
                                 "--target-switch-ms", target}),
        dir_ + "/B.log");
  }

  ~BenchCluster() {
    devices_.clear();
    server_.reset();
  }

  std::string credential(const std::string& device) const { return dir_ + "/" + device + ".cred"; }

  /// `vmsync status --json` run in the server's namespace.
  std::optional<nlohmann::json> status() {
    try {
      return nlohmann::json::parse(runCommand(NetworkLab::inNamespace(
          lab_.serverNamespace(),
          {selfBinary(), "status", "--vm", "vm", "--server", lab_.serverAddress(), "--credential", credential("cli"), "--json"})));
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }

  /// Waits until the head is at least `sequence` and the standby has applied
  /// it; with `standbyToo` false, only until the head is there.
  void waitInSync(std::uint64_t sequence, std::chrono::seconds timeout, bool standbyToo = true) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      for (auto& [name, child] : devices_)
        if (!child->running()) fail("device {} exited; see {}/{}.log", name, dir_, name);
      if (auto s = status()) {
        const std::uint64_t head = (*s)["head_sequence"];
        bool synced = head >= sequence;
        for (const auto& d : (*s)["devices"])
          synced &= !standbyToo || d["active"].get<bool>() ||
                    (d["state"] == "online" && d["applied_sequence"] == head);
        if (synced) return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(standbyToo ? 500 : 100));
    }
    fail("the devices did not reach checkpoint {} within {} s; see the logs in {}", sequence, timeout.count(), dir_);
  }

  /// The initial full sync over the links' initial profile; each link takes
  /// the measured profile as soon as its part is done: A's once the server
  /// stored the full sync (normally before A's first estimate of its link:
  /// A's next checkpoint starts an interval later), B's once B applied it.
  void syncInitially() {
    waitInSync(1, std::chrono::seconds(900), false);
    lab_.setProfile("A", profile_);
    waitInSync(1, std::chrono::seconds(900));
    lab_.setProfile("B", profile_);
  }

  /// CPU seconds the two device daemons have used (checkpointing, applying).
  double deviceCpuSeconds() {
    double total = 0;
    for (auto& [name, child] : devices_) total += child->cpuSeconds();
    return total;
  }

  /// Bytes of checkpoints the server has stored since it started. (Not the
  /// size of its data directory: compaction folds the chain away.)
  double storedBytes() {
    auto s = status();
    return s ? s->value("stored_bytes", 0.0) : std::nan("");  // nan: the cost line says so
  }

  std::uint64_t head() {
    auto s = status();
    return s ? (*s)["head_sequence"].get<std::uint64_t>() : 0;
  }

  nlohmann::json switchTo(const std::string& target) {
    std::string out = runCommand(NetworkLab::inNamespace(
        lab_.serverNamespace(), {selfBinary(), "switch", "--server", lab_.serverAddress(), "--credential",
                                 credential("cli"), "--to", target, "--json"}));
    // Progress lines (stderr, merged here) come before the report.
    const auto report = out.rfind("\n{");
    return nlohmann::json::parse(report == std::string::npos ? out : out.substr(report + 1));
  }

  /// Sets migration capabilities on the active device's QEMU. The daemon
  /// saves the device state through QEMU's migration too (resumable points),
  /// and QEMU refuses to change capabilities while a migration runs: wait
  /// for that save to end (a few seconds at most) rather than fail the bench.
  static void setCapabilitiesBetweenSaves(QmpClient& monitor, const nlohmann::json& capabilities) {
    monitor.executeWhenAllowed("migrate-set-capabilities", {{"capabilities", capabilities}},
                               "migration process in progress", std::chrono::milliseconds(100),
                               std::chrono::seconds(30));
  }

  /// QEMU's live migration of `source`'s running VM to a QEMU started with
  /// -incoming in `target`'s namespace, over the same links as the checkpoints
  /// (source uplink, server namespace, target downlink), xbzrle and compression on.
  Migration migrate(const std::string& source, const std::string& target) {
    const std::string sourceDir = dir_ + "/" + source;
    auto spec = nlohmann::json::parse(std::ifstream(sourceDir + "/vm.json"));
    const std::string scratch = dir_ + "/migration-" + target;
    fs::remove_all(scratch);
    fs::create_directories(scratch);
    copySparse(options_.imageDir + "/disk.img", scratch + "/disk.img");
    VmConfig config;
    config.accel = spec.at("accel");
    config.cpuModel = spec.at("cpu_model");
    config.memoryBytes = spec.at("memory_bytes");
    config.vcpus = spec.at("vcpus");
    config.freePageReporting = spec.value("free_page_reporting", false);  // the same hardware as the source's
    config.kernelPath = sourceDir + "/vmlinuz";
    config.initrdPath = sourceDir + "/initrd.img";
    config.kernelCmdline = spec.at("cmdline");
    config.ramPath = scratch + "/ram.img";
    config.diskPath = scratch + "/disk.img";
    config.serialLogPath = scratch + "/serial.log";
    config.runDir = scratch + "/run";
    config.incoming = true;
    // Started with this thread inside the target's namespace, so that QEMU
    // listens there (not from a helper thread: QEMU dies with the thread that
    // forked it, PR_SET_PDEATHSIG).
    std::unique_ptr<QemuVm> destination;
    {
      int home = ::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
      if (home < 0) throwLastErrno("cannot open this thread's network namespace");
      KJ_DEFER({
        if (::setns(home, CLONE_NEWNET) != 0) spdlog::error("cannot return to the bench's network namespace");
        ::close(home);
      });
      enterNetworkNamespace(lab_.deviceNamespace(target));
      destination = std::make_unique<QemuVm>(config);
    }
    const nlohmann::json on = {{{"capability", "xbzrle"}, {"state", true}},
                               {{"capability", "compress"}, {"state", true}},
                               {{"capability", "x-ignore-shared"}, {"state", false}}};
    destination->qmp().execute("migrate-set-capabilities", {{"capabilities", on}});
    destination->qmp().execute("migrate-incoming",
                               {{"uri", fmt::format("tcp:{}:{}", lab_.deviceHost(target), kMigrationPort)}});
    // The relay gives the stream the one-way delay of both links, as a checkpoint has.
    DelayRelayOptions relayOptions;
    relayOptions.listenHost = lab_.serverHostFor(source);
    relayOptions.listenPort = kMigrationPort;
    relayOptions.targetHost = lab_.deviceHost(target);
    relayOptions.targetPort = kMigrationPort;
    relayOptions.oneWayDelay = 2 * profile_.oneWayDelay;
    relayOptions.networkNamespace = lab_.serverNamespace();
    DelayRelay relay(relayOptions);

    QmpClient monitor(sourceDir + "/run/tools-qmp.sock", std::chrono::seconds(5));
    nlohmann::json before = monitor.execute("query-migrate-capabilities");
    setCapabilitiesBetweenSaves(monitor, on);
    Migration result;
    try {
      monitor.execute("migrate", {{"uri", fmt::format("tcp:{}:{}", lab_.serverHostFor(source), kMigrationPort)}});
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(options_.migrationTimeoutSeconds);
      while (true) {
        auto info = monitor.execute("query-migrate");
        result.status = info.value("status", "");
        if (result.status == "completed") {
          result.completed = true;
          result.totalMs = info.value("total-time", 0.0);
          result.downtimeMs = info.value("downtime", 0.0);
          result.transferredBytes = info["ram"].value("transferred", 0.0);
          break;
        }
        if (result.status == "failed" || result.status == "cancelled") {
          result.status += ": " + info.value("error-desc", std::string("no reason given"));
          break;
        }
        if (std::chrono::steady_clock::now() > deadline) {
          monitor.execute("migrate_cancel");
          result.status = fmt::format("not done in {} s (cancelled)", options_.migrationTimeoutSeconds);
          if (info.contains("ram")) result.transferredBytes = info["ram"].value("transferred", 0.0);
          for (int i = 0; i < 100 && monitor.execute("query-migrate").value("status", "") != "cancelled"; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    } catch (const Error& e) {
      result.status = e.what();
    }
    // The VM goes on where it was, for vmsync to switch it; the daemon's own
    // device-state saves must find the capabilities as they were.
    if (monitor.execute("query-status").value("status", "") == "postmigrate") monitor.execute("cont");
    nlohmann::json restore = nlohmann::json::array();
    for (const auto& c : before)
      if (c["capability"] == "xbzrle" || c["capability"] == "compress" || c["capability"] == "x-ignore-shared")
        restore.push_back({{"capability", c["capability"]}, {"state", c["state"]}});
    setCapabilitiesBetweenSaves(monitor, restore);
    destination.reset();
    fs::remove_all(scratch);
    return result;
  }

 private:
  const BenchSwitchOptions& options_;
  LinkProfile profile_;
  std::string dir_;
  NetworkLab lab_;
  std::unique_ptr<Child> server_;
  std::map<std::string, std::unique_ptr<Child>> devices_;
};

/// The phases of a switch report, in order: their fields and their names in the plot.
constexpr std::pair<const char*, const char*> kPhases[] = {
    {"pause_ms", "pause"},
    {"final_harvest_ms", "final harvest"},
    {"device_state_save_ms", "device-state save"},
    {"transfer_ms", "transfer"},
    {"apply_ms", "apply"},
    {"device_state_load_ms", "device-state load"},
    {"resume_ms", "resume"}};

/// What one profile's runs measured.
struct ProfileRuns {
  const LinkProfile* profile = nullptr;
  std::vector<nlohmann::json> reports;  // `vmsync switch --json`, one a run
  std::vector<Migration> migrations;    // empty with --no-qemu-migration
};

std::string cell(const std::vector<double>& values) {
  if (values.empty()) return "-";
  return fmt::format("{:.0f} / {:.0f}", percentile(values, 50), percentile(values, 95));
}

/// The completed migrations' `field` (total, downtime, bytes moved).
std::vector<double> completed(const std::vector<Migration>& migrations, double Migration::*field) {
  std::vector<double> values;
  for (const auto& m : migrations)
    if (m.completed) values.push_back(m.*field);
  return values;
}

void printTable(const ProfileRuns& runs, int count) {
  const LinkProfile& profile = *runs.profile;
  std::printf("\n%s: %.0f/%.1f Mbit/s down/up, %lld ms one way; %d runs (median / p95)\n", profile.name.c_str(),
              profile.downMbit, profile.upMbit, static_cast<long long>(profile.oneWayDelay.count()), count);
  std::printf("| %-38s | %-18s |\n", "vmsync switch", "ms");
  std::printf("|%s|%s|\n", std::string(40, '-').c_str(), std::string(20, '-').c_str());
  auto row = [&](const char* field) {
    std::vector<double> values;
    for (const auto& r : runs.reports) values.push_back(r.value(field, 0.0));
    std::printf("| %-38s | %-18s |\n", field, cell(values).c_str());
  };
  for (const auto& [field, name] : kPhases) row(field);
  row("total_ms");
  std::vector<double> kib;
  for (const auto& r : runs.reports) kib.push_back(r.value("final_bytes", 0.0) / 1024);
  std::printf("| %-38s | %-18s |\n", "final checkpoint (KiB)", cell(kib).c_str());
  if (runs.migrations.empty()) return;
  std::vector<double> moved = completed(runs.migrations, &Migration::transferredBytes);
  for (auto& bytes : moved) bytes /= 1024;
  std::string failures;
  for (const auto& m : runs.migrations)
    if (!m.completed) failures += (failures.empty() ? "" : "; ") + m.status;
  std::printf("| %-38s | %-18s |\n", "QEMU migration total (xbzrle+compress)",
              cell(completed(runs.migrations, &Migration::totalMs)).c_str());
  std::printf("| %-38s | %-18s |\n", "QEMU migration downtime",
              cell(completed(runs.migrations, &Migration::downtimeMs)).c_str());
  std::printf("| %-38s | %-18s |\n", "QEMU migration RAM moved (KiB)", cell(moved).c_str());
  std::printf("QEMU migrations completed: %zu of %zu%s%s\n", moved.size(), runs.migrations.size(),
              failures.empty() ? "" : "; ", failures.c_str());
}

/// The switches of every profile as one PNG in `out`, beside the servers'
/// and devices' state: per profile, the phases of the switch with the median
/// total stacked, what the phases leave of that total on top (so the bar is
/// the table's median total); beside them, unless QEMU's migration was left
/// out, the median switch total against the median downtime and total of
/// QEMU's migrations, on a log scale (QEMU's total is tens of times the
/// switch's, its downtime can be a few ms).
void plotSwitches(const std::vector<ProfileRuns>& profiles, const BenchSwitchOptions& options, const fs::path& out) {
  std::string phases = "profile", versus;
  double least = INFINITY;  // the smallest bar on the log scale
  for (const auto& [field, name] : kPhases) phases += fmt::format(" \"{}\"", name);
  phases += " \"rest of the total\"\n";
  for (const auto& p : profiles) {
    std::vector<double> totals;
    for (const auto& r : p.reports) totals.push_back(r.value("total_ms", 0.0));
    const double median = percentile(totals, 50);
    const auto& run = p.reports[std::find(totals.begin(), totals.end(), median) - totals.begin()];
    double rest = median;
    phases += fmt::format("\"{}\"", p.profile->name);
    for (const auto& [field, name] : kPhases) {
      phases += fmt::format(" {:.1f}", run.value(field, 0.0));
      rest -= run.value(field, 0.0);
    }
    phases += fmt::format(" {:.1f}\n", std::max(0.0, rest));
    // nan (no migration completed) leaves the bar out.
    const double downtime = percentile(completed(p.migrations, &Migration::downtimeMs), 50);
    const double migration = percentile(completed(p.migrations, &Migration::totalMs), 50);
    versus += fmt::format("\"{}\" {:.1f} {:.1f} {:.1f}\n", p.profile->name, median, downtime, migration);
    for (double bar : {median, downtime, migration})
      if (bar > 0) least = std::min(least, bar);  // false for nan
  }
  const std::string png = (out / "bench-switch.png").string();
  const std::string title = fmt::format("vmsync bench switch, {} switch{} per link", options.runs,
                                        options.runs == 1 ? "" : "es");
  std::string script = gnuplotPreamble(options.qemuMigration ? 1200 : 700, 600);
  script += "$phases << EOD\n" + phases + "EOD\n$versus << EOD\n" + versus + "EOD\n";
  script += "set output " + gnuplotQuote(png) + "\n";
  if (options.qemuMigration) script += "set multiplot layout 1,2 title " + gnuplotQuote(title) + "\n";
  script += fmt::format(
      "set style data histogram\nset style fill solid 0.85 border -1\nset key outside below horizontal maxcols 3\n"
      "set xrange [-0.5:{}]\nset ylabel 'ms'\nset linetype 8 lc rgb '#b0b0b0'\n"
      "set style histogram rowstacked\nset boxwidth 0.6\nset yrange [0:*]\nset title {}\n"
      "plot for [c=2:{}] $phases using c:xtic(1) title columnheader(c)\n",
      profiles.size() - 0.5,
      gnuplotQuote(options.qemuMigration ? "vmsync switch by phase\n(the switch with the median total)"
                                         : title + "\nby phase (the switch with the median total)"),
      std::size(kPhases) + 2);
  if (options.qemuMigration)
    script +=
        "set style histogram clustered gap 1\nset boxwidth 0.9 relative\nset logscale y\n" +
        // A decade below the smallest bar's decade: gnuplot's own bottom can leave it a sliver.
        (std::isfinite(least) ? fmt::format("set yrange [{:g}:*]\n", std::pow(10.0, std::floor(std::log10(least)) - 1))
                              : std::string("set yrange [*:*]\n")) +
        "set ylabel 'ms (log scale)'\nset title 'against QEMU live migration (xbzrle + compress)'\n"
        "plot $versus using 2:xtic(1) title 'vmsync switch, total' lc rgb '#404040', "
        "'' using 3 title 'QEMU migration, downtime' lc rgb '#cc79a7', "
        "'' using 4 title 'QEMU migration, total' lc rgb '#a0522d'\nunset multiplot\n";
  drawPlots("bench switch", (out / "bench-switch.gp").string(), script, {png});
}

/// The image as the devices boot it: `image`'s files, linked, with the
/// workload's duration set on the kernel command line, so that a workload
/// that ends (video, music) keeps the guest busy for the whole bench.
std::string imageWithWorkloadDuration(const fs::path& image, std::uint32_t seconds, const fs::path& dir) {
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const char* f : {"vmlinuz", "initrd.img", "disk.img", "spec.json"})
    if (fs::exists(image / f)) fs::create_symlink(fs::absolute(image / f), dir / f);
  std::istringstream words(readImageCmdline(image.string()));
  std::string cmdline, word;
  while (words >> word)
    if (!word.starts_with("vmsync.duration=")) cmdline += word + " ";
  std::ofstream(dir / "cmdline") << cmdline << "vmsync.duration=" << seconds << "\n";
  return dir.string();
}

}  // namespace

int runBenchSwitch(const BenchSwitchOptions& options) {
  try {
    if (options.runs < 1) fail("--runs must be at least 1");
    std::string unavailable = NetworkLab::unavailableReason();
    if (!unavailable.empty()) fail("cannot build the emulated links: {}", unavailable);
    for (const char* f : {"vmlinuz", "initrd.img", "disk.img", "cmdline"})
      if (!fs::exists(fs::path(options.imageDir) / f))
        fail("guest image {} has no {}; build it with vm-images/build.sh", options.imageDir, f);
    BenchSwitchOptions resolved = options;
    resolved.imageDir = fs::absolute(options.imageDir).string();
    const std::string outDir = fs::absolute(options.outDir).string();
    if (options.workloadSeconds)
      resolved.imageDir = imageWithWorkloadDuration(resolved.imageDir, options.workloadSeconds, outDir + "/image");
    std::vector<ProfileRuns> measured;
    for (const auto& name : options.profiles) {
      const LinkProfile& profile = linkProfile(name);
      spdlog::info("bench switch: profile {}: starting the server and devices A, B", name);
      const LinkProfile& initial =
          options.initialSyncProfile.empty() ? profile : linkProfile(options.initialSyncProfile);
      BenchCluster cluster(resolved, profile, initial, outDir + "/" + name);
      if (&initial != &profile) cluster.syncInitially();
      cluster.waitInSync(3, std::chrono::seconds(900));
      ProfileRuns& runs = measured.emplace_back();
      runs.profile = &profile;
      auto& reports = runs.reports;
      auto& migrations = runs.migrations;
      std::string active = "A";
      const auto measureStart = std::chrono::steady_clock::now();
      const double cpuStart = cluster.deviceCpuSeconds();
      const double bytesStart = cluster.storedBytes();
      for (int run = 1; run <= options.runs; ++run) {
        const std::string target = active == "A" ? "B" : "A";
        std::this_thread::sleep_for(std::chrono::duration<double>(options.settleSeconds));
        if (options.qemuMigration) {
          spdlog::info("bench switch: {} run {}: QEMU migration {} -> {}", name, run, active, target);
          migrations.push_back(cluster.migrate(active, target));
          const auto& m = migrations.back();
          spdlog::info("bench switch: QEMU migration: {} ({:.0f} ms, downtime {:.0f} ms, {:.0f} KiB)", m.status,
                       m.totalMs, m.downtimeMs, m.transferredBytes / 1024);
          // Checkpoints held up by the migration's traffic catch up first.
          cluster.waitInSync(cluster.head() + 2, std::chrono::seconds(600));
        }
        spdlog::info("bench switch: {} run {}: vmsync switch {} -> {}", name, run, active, target);
        reports.push_back(cluster.switchTo(target));
        spdlog::info("bench switch: switched in {:.0f} ms ({} bytes)", reports.back().value("total_ms", 0.0),
                     reports.back().value("final_bytes", 0));
        active = target;
        cluster.waitInSync(reports.back().value("final_sequence", 0ull) + 2, std::chrono::seconds(600));
      }
      printTable(runs, options.runs);
      if (options.targetSwitchMs) {
        // What the adaptive interval is for: the final checkpoint's transfer
        // (push to the server and forward to the target) within T.
        std::vector<double> transfer;
        for (const auto& r : reports) transfer.push_back(r.value("transfer_ms", 0.0));
        const auto over = std::count_if(transfer.begin(), transfer.end(),
                                        [&](double ms) { return ms > options.targetSwitchMs; });
        std::printf("final checkpoint transfer against the target of %u ms: median %.0f ms, worst %.0f ms; %s\n",
                    options.targetSwitchMs, percentile(transfer, 50), percentile(transfer, 100),
                    over == 0 ? "under the target in every run"
                              : fmt::format("over the target in {} of {} runs", over, transfer.size()).c_str());
      }
      const double minutes =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - measureStart).count() / 60.0;
      std::printf("checkpointing cost (%s): device daemons' CPU %.1f s/min, checkpoints stored %.1f MiB/min\n",
                  options.targetSwitchMs ? fmt::format("adaptive, target {} ms", options.targetSwitchMs).c_str()
                                         : fmt::format("every {} s", options.intervalSeconds).c_str(),
                  (cluster.deviceCpuSeconds() - cpuStart) / minutes,
                  (cluster.storedBytes() - bytesStart) / 1048576.0 / minutes);
      std::fflush(stdout);
    }
    plotSwitches(measured, options, outDir);
    return 0;
  } catch (const std::exception& e) {
    spdlog::error("bench switch: {}", e.what());
    return 1;
  }
}

}  // namespace vmsync
