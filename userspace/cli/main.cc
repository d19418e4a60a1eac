// vmsync: the controller command.
//
//   vmsync init     --dir ID [--server-name NAME]
//   vmsync enroll   --dir ID --user U --device A --out A.cred [--days N]
//   vmsync revoke   --dir ID --user U [--device A] [--reason TEXT]
//   vmsync server   --listen HOST:PORT --data DIR (--tls ID | --insecure)
//   vmsync active   --device A --state DIR [--vm NAME] [--image DIR] [--server HOST:PORT] (--credential A.cred | --insecure)
//                   [--interval S] [--target-switch-ms T [--optimize bytes|energy] [--radio lte|3g|wifi]]
//                   [--accel auto|kvm|tcg]
//   vmsync stop     [--vm NAME] [--server HOST:PORT] (--credential F | --insecure)
//   vmsync standby  --device B --state DIR [--vm NAME] [--server HOST:PORT] (--credential B.cred | --insecure)
//   vmsync switch   --to B [--vm NAME] [--server HOST:PORT] (--credential F | --insecure) [--json]
//   vmsync status   [--vm NAME] [--server HOST:PORT] (--credential F | --insecure) [--json]
//   vmsync bench switch --profile wifi,lte --runs N [--image DIR]
//   vmsync bench server --vms 10,25,50,100 [--devices 3] [--seconds S] [--json FILE]
//   vmsync completion bash
//   vmsync --version
//
// Every command reads --config FILE (default $VMSYNC_CONFIG, else
// /etc/vmsync/vmsync.toml where it exists; see cli/config_file.h).
// Exit codes: 0 done; 1 the command failed (the message says why);
// 2 the command line or config file is wrong (unknown command or option,
// missing or bad value).
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <kj/async-io.h>
#include <nlohmann/json.hpp>

#include "base/version.h"
#include "cli/client_commands.h"
#include "cli/completion.h"
#include "cli/config_file.h"
#include "lab/bench_server.h"
#include "lab/bench_switch.h"
#include "daemon/device.h"
#include "base/error.h"
#include "transport/rpc_util.h"
#include "transport/revocation.h"
#include "transport/secure_channel.h"
#include "server_main.h"
#include "lab/study.h"

namespace {

void addDeviceOptions(CLI::App& cmd, vmsync::DeviceOptions& o) {
  cmd.add_option("--device", o.deviceId, "this device's name")->required();
  cmd.add_option("--state", o.stateDir,
                 "this VM's state directory (images, serial log): one per VM, e.g. ROOT/NAME for each VM a device "
                 "follows")
      ->required();
  cmd.add_option("--vm", o.vmId,
                 "the VM's name, one of the user's on the server (default: the one the state directory holds, "
                 "else \"vm\"); `active` creates it if the server has none by that name");
  cmd.add_option("--server", o.server, "sync server address, host:port")->capture_default_str();
  cmd.add_option("--metrics-listen", o.metricsListen,
                 "serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP: keep it on this device or a "
                 "trusted network)");
  cmd.add_option("--credential", o.credential, "this device's credential from `vmsync enroll` (TLS)");
  cmd.add_flag("--insecure", o.insecure, "plain TCP to a server started with --insecure");
  cmd.add_option("--accel", o.accel, "accelerator: auto, kvm or tcg")
      ->check(CLI::IsMember({"auto", "kvm", "tcg"}))
      ->capture_default_str();
  cmd.add_option("--interval", o.intervalSeconds, "seconds between incremental checkpoints")->capture_default_str();
  cmd.add_option("--resumable-every", o.resumableEverySeconds,
                 "when active, make a consistent checkpoint (VM paused briefly) this often, in seconds: where a "
                 "failover resumes if this device is lost (0: none)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  auto* target = cmd.add_option("--target-switch-ms", o.targetSwitchMs,
                                 "when active, choose the interval from the measured link rate and the guest's dirty "
                                 "rate so that a switch's final checkpoint is expected to travel in this many ms (0: "
                                 "--interval stays)")
                     ->capture_default_str();
  cmd.add_option("--optimize", o.optimize,
                 "with --target-switch-ms, among the intervals that keep the target: bytes (the longest, as before "
                 "this option) or energy (the least expected radio and CPU energy per minute on --radio)")
      ->check(CLI::IsMember({"bytes", "energy"}))
      ->needs(target)
      ->capture_default_str();
  cmd.add_option("--radio", o.radio,
                 "with --target-switch-ms, the radio this device pushes over, whose power model prices the interval: "
                 "lte, 3g or wifi")
      ->check(CLI::IsMember({"lte", "3g", "wifi"}))
      ->needs(target)
      ->capture_default_str();
  cmd.add_option("--dead-link-timeout", o.deadLinkSeconds,
                 "seconds after which a silent connection to the server counts as dead and is made again "
                 "(keepalive probes and unacknowledged data); short in test harnesses, long on links that stall")
      ->check(CLI::Range(vmsync::kMinDeadLinkSeconds, 3600))
      ->capture_default_str();
  cmd.add_flag("--final-full-compare", o.finalFullCompare,
               "when active, compare every RAM unit for a final checkpoint (a switch, a stop, a resumable point) "
               "even when the page source sees every write (kmod), and report what it had missed; by default "
               "its list is taken");
  cmd.add_flag("--full-verify", o.fullVerify,
               "check a final checkpoint's image digest by hashing the whole image, not from the unit hashes kept "
               "on every apply (slower switches; also names units the kept hashes got wrong)");
  cmd.add_option("--image-check-every", o.scrubEverySeconds,
                 "as a standby, re-read the whole image in the background this often, in seconds, against the "
                 "unit hashes kept on apply; damage found is resynced from the server (0: never)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd.add_option("--qemu", o.qemuBinary, "QEMU binary")->capture_default_str();
  cmd.add_option("--page-source", o.pageSource, "dirty page source: scan, kmod (vmsync.ko, KVM only) or auto")
      ->check(CLI::IsMember({"scan", "kmod", "auto"}))
      ->capture_default_str();
  cmd.add_option("--block-source", o.blockSource, "dirty block source: bpf, scan, or auto (bpf where it loads)")
      ->check(CLI::IsMember({"bpf", "scan", "auto"}))
      ->capture_default_str();
  cmd.add_option_function<std::string>(
         "--compression",
         [&o](const std::string& text) {
           try {
             o.compression = vmsync::parseCompressionSetting(text);
           } catch (const vmsync::Error& e) {
             throw CLI::ValidationError("--compression", e.what());
           }
         },
         "how checkpoint payloads are compressed: auto (lz4 on fast links, zstd at a higher level the slower "
         "the measured link, each choice logged), none, lz4, zstd or zstd:LEVEL (1-22; zstd alone is level 3)")
      ->default_str("auto");
  cmd.add_flag_callback(
      "--no-compress", [&o] { o.compression = vmsync::parseCompressionSetting("none"); },
      "the same as --compression none");
  cmd.add_option("--disk", o.disk, "give the VMM the disk image as a file, or as a loop device (cache=none) "
                                   "whose block requests the bpf source records")
      ->check(CLI::IsMember({"file", "loop"}))
      ->capture_default_str();
}

std::string versionLine() {
  return fmt::format("vmsync {} (commit {})", vmsync::buildVersion(), vmsync::buildCommit());
}

/// The deepest command the command line named: `vmsync bench` for
/// `vmsync bench swich`.
const CLI::App* deepestCommand(const CLI::App& app) {
  for (const CLI::App* sub : app.get_subcommands())
    if (sub->parsed()) return deepestCommand(*sub);
  return &app;
}

std::string commandPath(const CLI::App& command) {
  std::string path = command.get_name();
  for (const CLI::App* at = command.get_parent(); at != nullptr; at = at->get_parent())
    path = (at->get_parent() == nullptr ? std::string("vmsync") : at->get_name()) + " " + path;
  return command.get_parent() == nullptr ? std::string("vmsync") : path;
}

/// A wrong command line: says what was wrong (an unknown command by name,
/// with the commands there are) and exits with 2.
int usageError(const CLI::App& app, const CLI::ParseError& error) {
  const CLI::App& command = *deepestCommand(app);
  std::vector<std::string> names;
  for (const CLI::App* sub : command.get_subcommands({})) names.push_back(sub->get_name());
  const auto rest = command.remaining();
  if (!names.empty() && !rest.empty() && rest.front().rfind("-", 0) != 0) {
    std::fprintf(stderr, "vmsync: `%s` has no command '%s'; its commands are: %s\n", commandPath(command).c_str(),
                 rest.front().c_str(), CLI::detail::join(names, ", ").c_str());
  } else if (!names.empty() && command.get_subcommands().empty() && rest.empty() &&
             dynamic_cast<const CLI::RequiredError*>(&error) != nullptr) {
    std::fprintf(stderr, "vmsync: `%s` needs a command: %s\n", commandPath(command).c_str(),
                 CLI::detail::join(names, ", ").c_str());
  } else {
    std::fprintf(stderr, "vmsync: %s\n", error.what());
  }
  std::fprintf(stderr, "run `%s --help` for its options\n", commandPath(command).c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vmsync: keep a live VM synchronized across devices"};
  app.require_subcommand(1);
  app.set_version_flag("--version", versionLine());
  std::string logLevel = "info";
  app.add_option("--log-level", logLevel, "trace, debug, info, warn, error")->capture_default_str();

  vmsync::ServerOptions serverOptions;
  auto* server = app.add_subcommand("server", "run the sync server");
  vmsync::addServerOptions(*server, serverOptions);

  vmsync::DeviceOptions activeOptions;
  auto* active = app.add_subcommand(
      "active", "create the VM on this device (or resume it where it was parked), run it and ship checkpoints");
  addDeviceOptions(*active, activeOptions);
  active->add_option("--image", activeOptions.imageDir,
                     "guest image directory (vm-images/build.sh --out), for a new VM; a parked one needs none");
  active->add_option("--policy", activeOptions.policy, "checkpoint policy: dirty-prev, diff-prev, dirty-orig, diff-orig")
      ->check(CLI::IsMember({"dirty-prev", "diff-prev", "dirty-orig", "diff-orig"}))
      ->capture_default_str();
  active->add_option("--memory-mb", activeOptions.memoryMb, "guest RAM in MiB (default: the image's)");

  vmsync::DeviceOptions standbyOptions;
  auto* standby = app.add_subcommand("standby", "keep a copy of the VM current, ready to take over");
  addDeviceOptions(*standby, standbyOptions);

  vmsync::ClientOptions client;
  auto addClientOptions = [&client](CLI::App* cmd) {
    cmd->add_option("--server", client.server, "sync server address")->capture_default_str();
    cmd->add_option("--credential", client.credential, "a device credential of the VM's owner (from `vmsync enroll`)");
    cmd->add_flag("--insecure", client.insecure, "plain TCP to a server started with --insecure");
    cmd->add_option("--vm", client.vm, "the VM, NAME (one of the user's) or USER/NAME (default: \"vm\")");
  };
  std::string target;
  bool json = false, force = false;
  auto* sw = app.add_subcommand("switch", "move the running VM to another device");
  sw->add_option("--to", target, "device to continue on")->required();
  sw->add_flag("--force", force,
               "the active device is lost: once the lease timeout has passed, resume the VM on the target from the "
               "newest resumable point (what came after it is abandoned)");
  addClientOptions(sw);
  sw->add_flag("--json", json, "print the report as JSON");

  auto* status = app.add_subcommand(
      "status", "the user's VMs, one line each; with --vm, that VM's devices, the active one, applied checkpoints");
  addClientOptions(status);

  auto* stop = app.add_subcommand("stop", "park the VM: its device pauses it, ships a final checkpoint and exits");
  addClientOptions(stop);
  status->add_flag("--json", json, "print as JSON");
  stop->add_flag("--json", json, "print the report as JSON");

  std::string identityDir, serverName = "vmsync-server", user, deviceName, credentialOut;
  auto* init = app.add_subcommand("init", "create the server's identity (a certificate authority and a server key)");
  init->add_option("--dir", identityDir, "directory for the identity (keep it private)")->required();
  init->add_option("--server-name", serverName, "name the devices expect the server to prove")->capture_default_str();
  auto* enroll = app.add_subcommand("enroll", "issue a device's credential, signed by the server's identity");
  enroll->add_option("--dir", identityDir, "the server identity directory from `vmsync init`")->required();
  enroll->add_option("--user", user, "the user the device belongs to")->required();
  enroll->add_option("--device", deviceName, "the device's name")->required();
  enroll->add_option("--out", credentialOut, "credential file to write (give it to the device only)")->required();
  int days = 3650;
  enroll->add_option("--days", days, "days the credential is valid")->check(CLI::PositiveNumber)->capture_default_str();
  std::string reason;
  auto* revoke = app.add_subcommand(
      "revoke", "stop a lost device's credentials from working (or every device of a user); the server takes it "
                "up while it runs");
  revoke->add_option("--dir", identityDir, "the server identity directory from `vmsync init`")->required();
  revoke->add_option("--user", user, "the user whose device, or every device, is revoked")->required();
  revoke->add_option("--device", deviceName, "the device (default: every device of the user)");
  revoke->add_option("--reason", reason, "why, for the audit log");
  for (auto* command : {init, enroll, revoke}) command->add_flag("--json", json, "print the result as JSON");

  std::string shell;
  auto* completion = app.add_subcommand("completion", "print a shell completion script (bash)");
  completion->add_option("shell", shell, "the shell")->check(CLI::IsMember({"bash"}))->required();

  vmsync::StudyOptions studyOptions;
  auto* study = app.add_subcommand("study", "measure every checkpoint policy and interval on a real workload");
  study->add_option("--workload", studyOptions.workload, "workload name (for the report)")->capture_default_str();
  study->add_option("--image", studyOptions.imageDir, "guest image built for the workload (default build/vm-images/WORKLOAD)");
  study->add_option("--duration", studyOptions.durationSeconds, "seconds measured per run")->capture_default_str();
  study->add_option("--intervals", studyOptions.intervals, "checkpoint intervals in seconds, e.g. 1,2,5,10,30,60")
      ->delimiter(',')
      ->capture_default_str();
  study->add_option("--repeat", studyOptions.repeat, "independent runs")->capture_default_str();
  study->add_option("--out", studyOptions.outDir, "output directory")->capture_default_str();
  study->add_option("--accel", studyOptions.accel, "auto, kvm or tcg")
      ->check(CLI::IsMember({"auto", "kvm", "tcg"}))
      ->capture_default_str();
  bool noProgress = false;
  study->add_flag("--no-progress", noProgress, "no progress bar");

  vmsync::BenchSwitchOptions benchOptions;
  auto* bench = app.add_subcommand("bench", "benchmarks on a real guest");
  bench->require_subcommand(1);
  auto* benchSwitch = bench->add_subcommand(
      "switch", "switch latency over emulated links (network namespaces, root), next to QEMU's live migration");
  benchSwitch->add_option("--profile", benchOptions.profiles, "link profiles: wifi, lte, 3g")
      ->delimiter(',')
      ->capture_default_str();
  benchSwitch->add_option("--runs", benchOptions.runs, "switches per profile")->capture_default_str();
  benchSwitch->add_option("--image", benchOptions.imageDir, "guest image")->capture_default_str();
  benchSwitch->add_option("--out", benchOptions.outDir,
                          "state and logs of the server and devices, and the plot (bench-switch.png)")
      ->capture_default_str();
  benchSwitch->add_option("--interval", benchOptions.intervalSeconds, "checkpoint interval in seconds")
      ->capture_default_str();
  benchSwitch->add_option("--settle", benchOptions.settleSeconds, "seconds of checkpoints before each switch")
      ->capture_default_str();
  benchSwitch->add_option("--target-switch-ms", benchOptions.targetSwitchMs,
                          "devices choose their interval for this final-checkpoint transfer time (0: --interval)")
      ->capture_default_str();
  benchSwitch->add_option("--initial-sync-profile", benchOptions.initialSyncProfile,
                          "link profile for the initial full sync (e.g. lan), before the links take the measured "
                          "profile (default: the measured profile throughout)");
  benchSwitch->add_option("--workload-seconds", benchOptions.workloadSeconds,
                          "how long the guest's workload runs (vmsync.duration; 0: as the image was built)")
      ->capture_default_str();
  benchSwitch->add_flag("!--no-qemu-migration", benchOptions.qemuMigration, "do not measure QEMU's migration");
  benchSwitch->add_option("--migration-timeout", benchOptions.migrationTimeoutSeconds,
                          "seconds after which a QEMU migration is cancelled")
      ->capture_default_str();

  vmsync::BenchServerOptions benchServerOptions;
  auto* benchServer = bench->add_subcommand(
      "server", "the sync server under many VMs: synthetic devices over TLS push and follow, no QEMU");
  benchServer->add_option("--vms", benchServerOptions.vms,
                          "VM counts, one run each; a sweep stops once p99 push latency passes --knee-ms")
      ->delimiter(',')
      ->capture_default_str();
  benchServer->add_option("--devices", benchServerOptions.devices, "devices per VM: one pushes, the others follow")
      ->capture_default_str();
  benchServer->add_option("--interval", benchServerOptions.intervalSeconds, "seconds between a VM's pushes")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  benchServer->add_option("--checkpoint-kib", benchServerOptions.checkpointKib,
                          "KiB of random (incompressible) changes per checkpoint")
      ->check(CLI::Range(4u, 65536u))
      ->capture_default_str();
  benchServer->add_option("--seconds", benchServerOptions.seconds, "seconds measured per run")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  benchServer->add_option("--image-mb", benchServerOptions.imageMb, "each synthetic VM's RAM image, MiB")
      ->check(CLI::Range(1u, 4096u))
      ->capture_default_str();
  benchServer->add_option("--dir", benchServerOptions.dir,
                          "identity, credentials, images and the server's data directory (on the disk measured)")
      ->capture_default_str();
  benchServer->add_option("--knee-ms", benchServerOptions.kneePushP99Ms, "p99 push latency that ends a sweep")
      ->capture_default_str();
  benchServer->add_option("--json", benchServerOptions.json,
                          "also write the results to this file, and the plot beside it (FILE with .png)");
  benchServer->add_option("--compact-after", benchServerOptions.compactAfter,
                          "the server's --compact-after: fold a chain once N checkpoints follow its base (0: not "
                          "by count; default: the server's)");
  benchServer->add_option("--compact-above-mb", benchServerOptions.compactAboveMb,
                          "the server's --compact-above-mb: fold a chain once the checkpoints after its base pass "
                          "N MiB (0: not by size; default: the server's)");
  benchServer->add_option("--large-vm-mb", benchServerOptions.largeVmMb,
                          "VM 0's image, filled with random bytes so that its folds are heavy; its own pushes are "
                          "left out of the figures (0: as the others)");
  benchServer->add_option("--large-vm-checkpoint-kib", benchServerOptions.largeVmCheckpointKib,
                          "KiB VM 0 changes per checkpoint (default: --checkpoint-kib); with --compact-above-mb, "
                          "VM 0 can fold while the others do not");

  vmsync::addConfigFile(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return usageError(app, e);
  }
  // Logs and warnings go to stderr: stdout is the command's answer (JSON with
  // --json). No colours where NO_COLOR is set (no-color.org) or stderr is not
  // a terminal.
  const char* noColor = std::getenv("NO_COLOR");
  spdlog::set_default_logger(spdlog::stderr_color_mt(
      "vmsync", noColor != nullptr && *noColor != '\0' ? spdlog::color_mode::never : spdlog::color_mode::automatic));
  spdlog::set_level(spdlog::level::from_str(logLevel));
  spdlog::set_pattern("[%H:%M:%S.%e] %^%l%$ %v");

  try {
    if (server->parsed()) return vmsync::runServer(serverOptions);
    if (active->parsed()) return vmsync::runDevice(activeOptions, vmsync::Role::active);
    if (standby->parsed()) return vmsync::runDevice(standbyOptions, vmsync::Role::standby);
    if (sw->parsed()) return vmsync::runSwitch(client, target, force, json);
    if (status->parsed()) return vmsync::runStatus(client, json);
    if (stop->parsed()) return vmsync::runStop(client, json);
    // What these write (identities, credentials) is for this user alone; the
    // server and the devices see to their own directories.
    if (init->parsed() || enroll->parsed() || revoke->parsed()) ::umask(077);
    if (completion->parsed()) {
      std::fputs(vmsync::bashCompletion(app).c_str(), stdout);
      return 0;
    }
    if (init->parsed()) {
      vmsync::initServerIdentity(identityDir, serverName);
      if (json) return vmsync::printJson({{"identity_dir", identityDir}, {"server_name", serverName}});
      std::printf("server identity for '%s' created in %s; start the server with --tls %s and enroll devices with "
                  "`vmsync enroll --dir %s`\n", serverName.c_str(), identityDir.c_str(), identityDir.c_str(),
                  identityDir.c_str());
      return 0;
    }
    if (enroll->parsed()) {
      vmsync::enrollDevice(identityDir, user, deviceName, credentialOut, days);
      if (json)
        return vmsync::printJson(
            {{"user", user}, {"device", deviceName}, {"credential", credentialOut}, {"days", days}});
      std::printf("credential for device %s of user %s written to %s\n", deviceName.c_str(), user.c_str(),
                  credentialOut.c_str());
      return 0;
    }
    if (revoke->parsed()) {
      if (!deviceName.empty()) vmsync::checkName("device", deviceName);
      vmsync::checkName("user", user);
      const auto r = vmsync::revoke(identityDir, user, deviceName, reason);
      if (json)
        return vmsync::printJson({{"user", user},
                          {"device", deviceName.empty() ? nlohmann::json(nullptr) : nlohmann::json(deviceName)},
                          {"credentials_revoked", r.ids.size()}});
      std::printf("revoked %s of user %s: %zu credential(s) on record, and any from before the record; a running "
                  "server closes their connections at its next check (every 250 ms). Enroll a replacement with "
                  "`vmsync enroll`\n",
                  deviceName.empty() ? "every device" : ("device " + deviceName).c_str(), user.c_str(),
                  r.ids.size());
      return 0;
    }
    if (benchSwitch->parsed()) return vmsync::runBenchSwitch(benchOptions);
    if (benchServer->parsed()) return vmsync::runBenchServer(benchServerOptions);
    if (study->parsed()) {
      if (studyOptions.imageDir.empty()) studyOptions.imageDir = "build/vm-images/" + studyOptions.workload;
      studyOptions.progress = !noProgress;
      return vmsync::runStudy(studyOptions);
    }
  } catch (const vmsync::Error& e) {
    std::fprintf(stderr, "vmsync: %s\n", e.what());
    return 1;
  } catch (const kj::Exception& e) {
    std::fprintf(stderr, "vmsync: %s\n", vmsync::describe(e).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vmsync: %s\n", e.what());
    return 1;
  }
  return 2;
}
