#include "lab/bench_server.h"

#include <netinet/in.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <kj/async-io.h>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "base/durable_file.h"
#include "base/error.h"
#include "base/units.h"
#include "checkpoint/checkpoint_builder.h"
#include "harvest/unit_hashes.h"
#include "lab/gnuplot.h"
#include "lab/lab_process.h"
#include "lab/machine_usage.h"
#include "transport/rpc_util.h"
#include "transport/secure_channel.h"
#include "vmm/image_file.h"
#include "vmsync.capnp.h"

namespace vmsync {

namespace fs = std::filesystem;

namespace {

std::uint64_t wallNs() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

/// What the synthetic devices saw while the run was measured.
struct Stats {
  bool measuring = false;
  std::vector<double> pushMs;  // push sent -> stored and answered
  std::vector<double> lagMs;   // checkpoint made -> applied by a standby (push plus forward)
  std::uint64_t pushes = 0, pushBytes = 0, forwards = 0, forwardBytes = 0;
  std::uint64_t errors = 0;
  std::vector<std::string> firstErrors;
  void error(const std::string& what) {
    ++errors;
    if (firstErrors.size() < 5) firstErrors.push_back(what);
  }
};

/// A standby that takes every checkpoint the server forwards and notes how
/// late it came; it keeps no image (the load on the server is the same).
class SyntheticStandby final : public wire::DevicePeer::Server {
 public:
  SyntheticStandby(Stats& stats, bool measured) : stats_(stats), measured_(measured) {}

 protected:
  kj::Promise<void> apply(ApplyContext context) override {
    auto checkpoint = context.getParams().getCheckpoint();
    if (stats_.measuring && measured_) {
      const std::uint64_t now = wallNs(), created = checkpoint.getCreatedUnixNs();
      stats_.lagMs.push_back(now > created ? static_cast<double>(now - created) / 1e6 : 0.0);
      ++stats_.forwards;
      stats_.forwardBytes += checkpoint.totalSize().wordCount * sizeof(capnp::word);
    }
    context.getResults().setAppliedSequence(checkpoint.getSequence());
    return kj::READY_NOW;
  }
  kj::Promise<void> ping(PingContext) override { return kj::READY_NOW; }

 private:
  Stats& stats_;
  bool measured_;
};

std::string credentialPath(const std::string& dir, int vm, int device) {
  return fmt::format("{}/credentials/u{}-d{}.cred", dir, vm, device);
}

/// One VM: device d0 runs it and pushes a checkpoint every interval, made by
/// an ImageTracker from an image in which `checkpointKib` of random bytes
/// changed; the other devices follow it.
class SyntheticVm {
 public:
  SyntheticVm(kj::AsyncIoContext& io, Stats& stats, const BenchServerOptions& options, int index,
              const std::string& dir, const std::string& address)
      : io_(io),
        stats_(stats),
        options_(options),
        index_(index),
        dir_(dir),
        address_(address),
        ram_(fmt::format("{}/images/vm{}.ram", dir, index), true,
             std::uint64_t{index == 0 && options.largeVmMb ? options.largeVmMb : options.imageMb} << 20),
        disk_(fmt::format("{}/images/vm{}.disk", dir, index), true, 1u << 20),
        rng_(index + 1) {
    measured_ = !(index == 0 && options.largeVmMb != 0);
    if (!measured_) fillRandom();
    ramTracker_ = std::make_unique<ImageTracker>(
        ram_, std::vector<std::uint64_t>(ram_.units(), zeroUnitHash()), wire::Policy::DIRTY_PREV, false);
    diskTracker_ = std::make_unique<ImageTracker>(
        disk_, std::vector<std::uint64_t>(disk_.units(), zeroUnitHash()), wire::Policy::DIRTY_PREV, false);
  }

  /// Connects and registers every device (the followers first), then takes
  /// the lease for d0.
  kj::Promise<void> start() {
    kj::Promise<void> chain = kj::READY_NOW;
    for (int d = options_.devices - 1; d >= 0; --d)
      chain = chain.then([this, d] { return connect(d); });
    return chain.then([this] {
      return sessions_.front().acquireLeaseRequest().send().then(
          [this](capnp::Response<wire::DeviceSession::AcquireLeaseResults> r) { epoch_ = r.getEpoch(); });
    });
  }

  /// Pushes at every tick from `first` on, one push at a time, until `*stop`.
  kj::Promise<void> run(kj::TimePoint first, const bool* stop) {
    auto& timer = io_.provider->getTimer();
    return timer.atTime(first).then([this, first, stop]() -> kj::Promise<void> {
      if (*stop) return kj::READY_NOW;
      const auto interval = static_cast<std::int64_t>(options_.intervalSeconds * 1e9) * kj::NANOSECONDS;
      return pushOnce().then([this, first, stop, interval]() {
        // The next tick not yet passed: a push longer than the interval skips ticks.
        auto next = first + interval;
        const auto now = io_.provider->getTimer().now();
        while (next < now) next = next + interval;
        return run(next, stop);
      });
    });
  }

  std::uint64_t stored() const { return sequence_; }

 private:
  /// Random bytes in every unit, written 1 MiB at a time.
  void fillRandom() {
    std::vector<std::byte> chunk(1 << 20);
    std::vector<UnitWrite> writes;
    for (std::uint64_t first = 0; first < ram_.units(); first += chunk.size() / kUnitSize) {
      for (std::size_t i = 0; i < chunk.size(); i += 8) {
        const std::uint64_t r = rng_();
        std::memcpy(chunk.data() + i, &r, 8);
      }
      writes.clear();
      for (std::uint64_t u = first; u < std::min(ram_.units(), first + chunk.size() / kUnitSize); ++u)
        writes.push_back({u, chunk.data() + (u - first) * kUnitSize});
      ram_.writeUnits(writes);
    }
  }

  kj::Promise<void> connect(int device) {
    auto transport = std::make_shared<ClientTransport>(loadCredential(credentialPath(dir_, index_, device)));
    return transport->connect(io_, address_).then([this, device, transport](kj::Own<RpcConnection> connection) {
      auto request = connection->bootstrap().castAs<wire::SyncServer>().registerRequest();
      request.setDeviceId(fmt::format("d{}", device));
      request.setPeer(kj::heap<SyntheticStandby>(stats_, !(index_ == 0 && options_.largeVmMb != 0)));
      request.setAppliedSequence(0);
      request.setVm("vm");
      connections_.push_back(kj::mv(connection));
      return request.send().then([this, device](capnp::Response<wire::SyncServer::RegisterResults> r) {
        if (device == 0) sessions_.insert(sessions_.begin(), r.getSession());
        else sessions_.push_back(r.getSession());
      });
    });
  }

  kj::Promise<void> pushOnce() {
    const bool full = sequence_ == 0;
    DirtyUnits candidates;
    if (full) {
      candidates.everything = true;
    } else {
      // checkpointKib of random bytes, in random units.
      const std::uint32_t kib =
          !measured_ && options_.largeVmCheckpointKib != 0 ? options_.largeVmCheckpointKib : options_.checkpointKib;
      const std::uint64_t count = std::max<std::uint64_t>(1, (std::uint64_t{kib} << 10) / kUnitSize);
      bytes_.resize(count * kUnitSize);
      for (std::size_t i = 0; i < bytes_.size(); i += 8) {
        const std::uint64_t r = rng_();
        std::memcpy(bytes_.data() + i, &r, 8);
      }
      std::uniform_int_distribution<std::uint64_t> unit(0, ram_.units() - 1);
      std::vector<UnitWrite> writes;
      for (std::uint64_t i = 0; i < count; ++i) candidates.units.push_back(unit(rng_));
      std::sort(candidates.units.begin(), candidates.units.end());
      candidates.units.erase(std::unique(candidates.units.begin(), candidates.units.end()), candidates.units.end());
      for (std::size_t i = 0; i < candidates.units.size(); ++i)
        writes.push_back({candidates.units[i], bytes_.data() + i * kUnitSize});
      ram_.writeUnits(writes);
    }
    auto memory = std::make_shared<ImageDelta>(ramTracker_->collect(candidates));
    auto disk = std::make_shared<ImageDelta>(diskTracker_->collect(full ? candidates : DirtyUnits{}));
    auto request = sessions_.front().pushRequest();
    auto checkpoint = request.initCheckpoint();
    checkpoint.setVmId("vm");
    checkpoint.setEpoch(epoch_);
    checkpoint.setSequence(sequence_ + 1);
    checkpoint.setBaseSequence(sequence_);
    checkpoint.setKind(full ? wire::CheckpointKind::FULL : wire::CheckpointKind::INCREMENTAL);
    checkpoint.setPolicy(wire::Policy::DIRTY_PREV);
    checkpoint.setOrigin("d0");
    checkpoint.setCreatedUnixNs(wallNs());
    toWire(*memory, *disk, checkpoint);
    if (full) {
      auto spec = checkpoint.initSpec();
      spec.setVmId("vm");
      spec.setMemoryBytes(ram_.sizeBytes());
      spec.setDiskBytes(disk_.sizeBytes());
      spec.setPolicy(wire::Policy::DIRTY_PREV);
      spec.setAccel("tcg");
      spec.setCpuModel("qemu64");
      spec.setVcpus(1);
    }
    const std::uint64_t bytes = request.totalSize().wordCount * sizeof(capnp::word);
    const std::uint64_t sent = nowNs();
    return request.send()
        .then(
            [this, memory, disk, bytes, sent](capnp::Response<wire::DeviceSession::PushResults>) {
              ramTracker_->acknowledge(*memory);
              diskTracker_->acknowledge(*disk);
              ++sequence_;
              if (stats_.measuring && measured_) {
                stats_.pushMs.push_back(static_cast<double>(nowNs() - sent) / 1e6);
                ++stats_.pushes;
                stats_.pushBytes += bytes;
              }
            },
            [this, memory, disk](kj::Exception&& e) {
              // As a device does: the changes go into the next checkpoint.
              ramTracker_->retryLater(*memory);
              diskTracker_->retryLater(*disk);
              stats_.error(fmt::format("vm{} push {}: {}", index_, sequence_ + 1, describe(e)));
            });
  }

  kj::AsyncIoContext& io_;
  Stats& stats_;
  const BenchServerOptions& options_;
  int index_;
  std::string dir_, address_;
  ImageFile ram_, disk_;
  std::unique_ptr<ImageTracker> ramTracker_, diskTracker_;
  std::vector<kj::Own<RpcConnection>> connections_;
  std::vector<wire::DeviceSession::Client> sessions_;  // d0's first
  std::uint64_t sequence_ = 0, epoch_ = 0;
  std::mt19937_64 rng_;
  std::vector<std::byte> bytes_;
  bool measured_ = true;  // its pushes count in the figures (not the large VM's)
};

/// A TCP port on the loopback nobody listens on now.
int freePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throwLastErrno("socket");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    const int err = errno;
    ::close(fd);
    throwErrno(err, "bind a loopback port");
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

/// One run's results.
struct RunResult {
  int vms = 0;
  double seconds = 0;
  Stats stats;
  double serverCpu = 0;      // cores of CPU the server used
  double benchCpu = 0;       // cores of CPU the synthetic devices used
  double serverRssMiB = 0;   // peak
  double writtenMiBps = 0;   // the server's writes to storage
  double diskBusy = -1;      // fraction of the time the data directory's disk was busy
  double machineBusy = 0;    // fraction of all CPUs' time the machine was busy
  double loopRunning = 0;    // fraction of the time the server's event loop ran
  double loopInIo = 0;       //   and waited on the disk (fsync)
  std::string saturated;
};

RunResult runOnce(const BenchServerOptions& options, int vms) {
  RunResult result;
  result.vms = vms;
  const std::string& dir = options.dir;
  const std::string data = dir + "/server-data";
  fs::remove_all(data);
  fs::remove_all(dir + "/images");
  fs::create_directories(dir + "/images");
  const int port = freePort();
  const std::string address = fmt::format("127.0.0.1:{}", port);
  std::vector<std::string> argv{selfBinary(), "server", "--listen", address, "--data", data, "--tls",
                                dir + "/identity", "--max-vms-per-user", "0", "--lease-timeout", "3600"};
  if (options.compactAfter >= 0) argv.insert(argv.end(), {"--compact-after", std::to_string(options.compactAfter)});
  if (options.compactAboveMb >= 0)
    argv.insert(argv.end(), {"--compact-above-mb", std::to_string(options.compactAboveMb)});
  Child server(argv, fmt::format("{}/server-{}vms.log", dir, vms));
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  // Until it listens.
  for (int i = 0;; ++i) {
    try {
      io.provider->getNetwork().parseAddress(address).wait(io.waitScope)->connect().wait(io.waitScope);
      break;
    } catch (const kj::Exception&) {
      if (i == 100 || !server.running())
        fail("the server did not start listening on {}; see {}/server-{}vms.log", address, dir, vms);
      timer.afterDelay(100 * kj::MILLISECONDS).wait(io.waitScope);
    }
  }
  Stats& stats = result.stats;
  std::vector<std::unique_ptr<SyntheticVm>> fleet;
  kj::Vector<kj::Promise<void>> starts;
  for (int v = 0; v < vms; ++v) {
    fleet.push_back(std::make_unique<SyntheticVm>(io, stats, options, v, dir, address));
    starts.add(fleet.back()->start());
  }
  kj::joinPromises(starts.releaseAsArray()).wait(io.waitScope);
  // Every VM's full checkpoint and two more before the measurement.
  const auto interval = static_cast<std::int64_t>(options.intervalSeconds * 1e9) * kj::NANOSECONDS;
  bool stop = false;
  kj::Vector<kj::Promise<void>> runs;
  for (int v = 0; v < vms; ++v)  // spread over the interval, as devices that started at different times
    runs.add(fleet[v]->run(timer.now() + interval * v / vms, &stop));
  auto all = kj::joinPromises(runs.releaseAsArray()).fork();
  const auto warmBy = timer.now() + 300 * kj::SECONDS;
  std::function<kj::Promise<void>()> warm = [&]() -> kj::Promise<void> {
    return timer.afterDelay(100 * kj::MILLISECONDS).then([&]() -> kj::Promise<void> {
      bool ready = true;
      for (const auto& vm : fleet) ready = ready && vm->stored() >= 3;
      if (ready || timer.now() >= warmBy) return kj::READY_NOW;
      return warm();
    });
  };
  warm().exclusiveJoin(all.addBranch()).wait(io.waitScope);
  for (const auto& vm : fleet)
    if (vm->stored() < 3) stats.error("a VM did not store its first checkpoints within 300 s");
  const double serverCpu0 = server.cpuSeconds(), benchCpu0 = selfCpuSeconds();
  const double written0 = writtenBytes(server.pid()), busy0 = diskBusyMs(data);
  const auto machine0 = machineJiffies();
  const auto start = std::chrono::steady_clock::now();
  stats.measuring = true;
  auto loop = std::make_unique<LoopSampler>(server.pid());
  std::uint64_t peakRss = server.residentBytes();
  std::function<kj::Promise<void>()> sample = [&]() -> kj::Promise<void> {
    return timer.afterDelay(500 * kj::MILLISECONDS).then([&] {
      peakRss = std::max(peakRss, server.residentBytes());
      return sample();
    });
  };
  const auto until = timer.now() + static_cast<std::int64_t>(options.seconds * 1e9) * kj::NANOSECONDS;
  timer.atTime(until).exclusiveJoin(all.addBranch()).exclusiveJoin(sample()).wait(io.waitScope);
  // The pushes under way still count; no new ones start.
  stop = true;
  all.addBranch().wait(io.waitScope);
  stats.measuring = false;
  result.loopRunning = loop->running();
  result.loopInIo = loop->disk();
  loop.reset();
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.serverCpu = (server.cpuSeconds() - serverCpu0) / result.seconds;
  result.benchCpu = (selfCpuSeconds() - benchCpu0) / result.seconds;
  result.serverRssMiB = peakRss / 1048576.0;
  result.writtenMiBps = (writtenBytes(server.pid()) - written0) / 1048576.0 / result.seconds;
  const double busy1 = diskBusyMs(data);
  const auto machine1 = machineJiffies();
  if (machine1.second > machine0.second)
    result.machineBusy = (machine1.first - machine0.first) / (machine1.second - machine0.second);
  if (busy0 >= 0 && busy1 >= 0) result.diskBusy = (busy1 - busy0) / 1000.0 / result.seconds;
  if (!server.running()) stats.error("the server exited during the run");
  // Where the time went, first match.
  const double loopBusy = result.loopRunning + result.loopInIo;
  if (result.diskBusy >= 0.9) result.saturated = "disk";
  else if (loopBusy >= 0.75)  // a single queue that busy makes its requests wait several times their service
    result.saturated = fmt::format("the server's event loop ({:.0f}% running, {:.0f}% waiting on fsync)",
                                   result.loopRunning * 100, result.loopInIo * 100);
  else if (result.machineBusy >= 0.9)
    result.saturated = fmt::format("the machine's CPUs ({:.0f}% busy; the server {:.0f}% of a core, the load generator "
                                   "{:.0f}%)", result.machineBusy * 100, result.serverCpu * 100, result.benchCpu * 100);
  else result.saturated = "-";
  return result;
}

void printRow(const RunResult& r, const BenchServerOptions& options) {
  const double pushP50 = percentile(r.stats.pushMs, 50), pushP99 = percentile(r.stats.pushMs, 99);
  const double lagP50 = percentile(r.stats.lagMs, 50), lagP99 = percentile(r.stats.lagMs, 99);
  std::printf("%5d %7.1f %9.2f %9.2f %8.1f %8.1f %8.1f %8.1f %6.0f%% %6.0f%% %6.0f%% %7.0f %8.1f %6s %6llu  %s\n", r.vms,
              r.stats.pushes / r.seconds, r.stats.pushBytes / 1048576.0 / r.seconds,
              r.stats.forwardBytes / 1048576.0 / r.seconds, pushP50, pushP99, lagP50, lagP99, r.serverCpu * 100,
              (r.loopRunning + r.loopInIo) * 100,
              r.benchCpu * 100, r.serverRssMiB, r.writtenMiBps,
              r.diskBusy < 0 ? "?" : fmt::format("{:.0f}%", r.diskBusy * 100).c_str(),
              static_cast<unsigned long long>(r.stats.errors), r.saturated.c_str());
  (void)options;
  std::fflush(stdout);
}

nlohmann::json toJson(const RunResult& r) {
  return {{"vms", r.vms},
          {"seconds", r.seconds},
          {"checkpoints_per_s", r.stats.pushes / r.seconds},
          {"stored_mib_per_s", r.stats.pushBytes / 1048576.0 / r.seconds},
          {"forwarded_mib_per_s", r.stats.forwardBytes / 1048576.0 / r.seconds},
          {"pushes", r.stats.pushes},
          {"forwards", r.stats.forwards},
          {"push_ms_p50", percentile(r.stats.pushMs, 50)},
          {"push_ms_p99", percentile(r.stats.pushMs, 99)},
          {"lag_ms_p50", percentile(r.stats.lagMs, 50)},
          {"lag_ms_p99", percentile(r.stats.lagMs, 99)},
          {"server_cpu", r.serverCpu},
          {"bench_cpu", r.benchCpu},
          {"server_rss_mib", r.serverRssMiB},
          {"server_written_mib_per_s", r.writtenMiBps},
          {"disk_busy", r.diskBusy},
          {"machine_busy", r.machineBusy},
          {"loop_running", r.loopRunning},
          {"loop_in_io", r.loopInIo},
          {"errors", r.stats.errors},
          {"first_errors", r.stats.firstErrors},
          {"saturated", r.saturated}};
}

/// A run as a line of the plot's data: VMs, push p50 and p99, lag p50 and
/// p99 (ms), checkpoints stored per second, and those offered (one per
/// measured VM and interval).
std::string plotRow(const RunResult& r, const BenchServerOptions& options) {
  const int measuredVms = options.largeVmMb != 0 ? r.vms - 1 : r.vms;
  return fmt::format("{} {:.2f} {:.2f} {:.2f} {:.2f} {:.2f} {:.2f}\n", r.vms, percentile(r.stats.pushMs, 50),
                     percentile(r.stats.pushMs, 99), percentile(r.stats.lagMs, 50), percentile(r.stats.lagMs, 99),
                     r.stats.pushes / r.seconds, measuredVms / options.intervalSeconds);
}

/// The runs as a PNG beside the JSON results (in --dir without them): push
/// latency and forward lag, p50 and p99, against the VM count on a log scale
/// (a knee spans decades), with the knee the sweep stops at; below, the
/// checkpoints stored per second against those the VMs offered.
void plotRuns(const std::string& rows, const BenchServerOptions& options) {
  const fs::path base = options.json.empty() ? fs::path(options.dir) / "bench-server" : fs::path(options.json);
  const std::string png = fs::path(base).replace_extension(".png").string();
  std::string script = gnuplotPreamble(1000, 800);
  script += "$runs << EOD\n" + rows + "EOD\n";
  script += "set output " + gnuplotQuote(png) + "\n";
  script += "set multiplot layout 2,1 title " +
            gnuplotQuote(fmt::format("vmsync bench server: {} devices per VM, {} KiB per checkpoint every {} s, "
                                     "{} s measured per run",
                                     options.devices, options.checkpointKib, options.intervalSeconds, options.seconds)) +
            "\n";
  script += fmt::format(
      // Tics at the VM counts run; room above the highest point for the key.
      "set key inside left top\nset xlabel 'VMs'\nset xrange [0:*]\nset offsets 0, 0, graph 0.1, 0\n"
      "set title 'push latency (sent to stored) and lag (made to applied by a follower)'\n"
      "set ylabel 'ms (log scale)'\nset logscale y\n"
      "plot $runs using 1:2:xtic(1) with linespoints lw 2 pt 7 lc rgb '#0072b2' title 'push p50', "
      "'' using 1:3 with linespoints lw 2 pt 5 dt 2 lc rgb '#0072b2' title 'push p99', "
      "'' using 1:4 with linespoints lw 2 pt 7 lc rgb '#e69f00' title 'lag p50', "
      "'' using 1:5 with linespoints lw 2 pt 5 dt 2 lc rgb '#e69f00' title 'lag p99', "
      "{} with lines lc rgb '#c00000' title {}\n"
      "set title 'throughput'\nset ylabel 'checkpoints stored per s'\nunset logscale y\nset yrange [0:*]\n"
      "plot $runs using 1:6:xtic(1) with linespoints lw 2 pt 7 lc rgb '#009e73' title 'stored', "
      "'' using 1:7 with lines lc rgb '#888888' dt 2 title 'offered (a checkpoint per VM and interval)'\n"
      "unset multiplot\n",
      options.kneePushP99Ms, gnuplotQuote(fmt::format("knee: p99 push {} ms", options.kneePushP99Ms)));
  drawPlots("bench server", fs::path(base).replace_extension(".gp").string(), script, {png});
}

}  // namespace

int runBenchServer(const BenchServerOptions& options) {
  try {
    if (options.devices < 2) fail("--devices must be at least 2 (one pushes, the others follow)");
    if (options.vms.empty()) fail("--vms needs at least one count");
    const int most = *std::max_element(options.vms.begin(), options.vms.end());
    if (*std::min_element(options.vms.begin(), options.vms.end()) < 1) fail("--vms counts must be at least 1");
    ::umask(077);
    makePrivateDirectory(options.dir);
    // One server identity and a credential per user (one per VM) and device, kept across runs.
    if (!fs::exists(options.dir + "/identity/ca.pem")) initServerIdentity(options.dir + "/identity", "bench-server");
    makePrivateDirectory(options.dir + "/credentials");
    for (int v = 0; v < most; ++v)
      for (int d = 0; d < options.devices; ++d)
        if (!fs::exists(credentialPath(options.dir, v, d)))
          enrollDevice(options.dir + "/identity", fmt::format("u{}", v), fmt::format("d{}", d),
                       credentialPath(options.dir, v, d));
    std::printf("vmsync bench server: %d devices per VM (one pushes %u KiB every %.1f s, the others follow), "
                "%.0f s measured per run, TLS, data in %s/server-data\n",
                options.devices, options.checkpointKib, options.intervalSeconds, options.seconds,
                options.dir.c_str());
    if (options.compactAfter > 0)
      std::printf("the server folds a chain once %lld checkpoints follow its base\n",
                  static_cast<long long>(options.compactAfter));
    if (options.compactAboveMb > 0)
      std::printf("the server folds a chain once the checkpoints after its base pass %lld MiB\n",
                  static_cast<long long>(options.compactAboveMb));
    if (options.largeVmMb != 0)
      std::printf("VM 0 holds %u MiB of random bytes (heavy folds) and changes %u KiB per checkpoint; the figures "
                  "leave its own pushes out\n",
                  options.largeVmMb,
                  options.largeVmCheckpointKib != 0 ? options.largeVmCheckpointKib : options.checkpointKib);
    std::printf("%5s %7s %9s %9s %8s %8s %8s %8s %7s %7s %7s %7s %8s %6s %6s  %s\n", "VMs", "ckpt/s", "stored",
                "fwd", "push50", "push99", "lag50", "lag99", "srvCPU", "loop", "genCPU", "RSS", "written", "disk",
                "errors", "saturated");
    std::printf("%5s %7s %9s %9s %8s %8s %8s %8s %7s %7s %7s %7s %8s %6s %6s\n", "", "", "MiB/s", "MiB/s", "ms",
                "ms", "ms", "ms", "", "busy", "", "MiB", "MiB/s", "busy", "");
    nlohmann::json runs = nlohmann::json::array();
    std::uint64_t errors = 0;
    std::optional<int> knee;
    std::string plotRows;
    for (int vms : options.vms) {
      RunResult r = runOnce(options, vms);
      printRow(r, options);
      for (const auto& e : r.stats.firstErrors) std::printf("      error: %s\n", e.c_str());
      errors += r.stats.errors;
      runs.push_back(toJson(r));
      plotRows += plotRow(r, options);
      if (percentile(r.stats.pushMs, 99) > options.kneePushP99Ms) {
        knee = vms;
        std::printf("p99 push latency passed %.0f ms at %d VMs (saturated: %s)\n", options.kneePushP99Ms, vms,
                    r.saturated.c_str());
        break;
      }
    }
    if (!knee && options.vms.size() > 1)
      std::printf("p99 push latency stayed under %.0f ms up to %d VMs\n", options.kneePushP99Ms, options.vms.back());
    if (!options.json.empty()) {
      nlohmann::json j{{"devices", options.devices},           {"interval_s", options.intervalSeconds},
                       {"checkpoint_kib", options.checkpointKib}, {"seconds", options.seconds},
                       {"compact_after", options.compactAfter},   {"compact_above_mb", options.compactAboveMb},
                       {"large_vm_mb", options.largeVmMb}, {"large_vm_checkpoint_kib", options.largeVmCheckpointKib},
                       {"runs", runs}};
      if (knee) j["knee_vms"] = *knee;
      const std::string text = j.dump(2) + "\n";
      writeFileDurably(options.json, text.data(), text.size());
    }
    plotRuns(plotRows, options);
    return errors == 0 ? 0 : 1;
  } catch (const Error& e) {
    spdlog::error("{}", e.what());
    return 1;
  } catch (const kj::Exception& e) {
    spdlog::error("{}", describe(e));
    return 1;
  }
}

}  // namespace vmsync
