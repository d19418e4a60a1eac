#include "lab/link_loss.h"

#include <bpf/libbpf.h>
#include <net/if.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <ctime>
#include <thread>

#include "base/error.h"
#include "lab/delay_relay.h"
#include "bpf/link_loss.h"
#include "link_loss.skel.h"

namespace vmsync {

namespace {

/// The place of the filter among the interface's egress filters.
constexpr std::uint32_t kHandle = 1;
constexpr std::uint32_t kPriority = 1;

bpf_tc_hook egressHook(int ifindex) {
  bpf_tc_hook hook{};
  hook.sz = sizeof hook;
  hook.ifindex = ifindex;
  hook.attach_point = BPF_TC_EGRESS;
  return hook;
}

bpf_tc_opts filterOptions() {
  bpf_tc_opts opts{};
  opts.sz = sizeof opts;
  opts.handle = kHandle;
  opts.priority = kPriority;
  return opts;
}

std::uint64_t nanoseconds(std::chrono::steady_clock::time_point t) {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count());
}

std::uint64_t nanoseconds(std::chrono::milliseconds d) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
}

std::chrono::steady_clock::time_point timePoint(std::uint64_t ns) {
  return std::chrono::steady_clock::time_point(
      std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::nanoseconds(ns)));
}

/// Runs `body` on a thread that has entered network namespace `ns`; rethrows its Error.
template <typename Body>
void inNamespace(const std::string& ns, Body&& body) {
  std::string error;
  std::thread worker([&] {
    try {
      enterNetworkNamespace(ns);
      body();
    } catch (const Error& e) {
      error = e.what();
    }
  });
  worker.join();
  if (!error.empty()) throw Error(error);
}

link_loss_settings settingsOf(const OutageSchedule& outages, std::uint64_t seed,
                              std::chrono::steady_clock::time_point epoch) {
  link_loss_settings s{};
  s.outage_period_ns = nanoseconds(outages.every);
  s.outage_min_ns = nanoseconds(outages.shortest);
  s.outage_max_ns = nanoseconds(outages.longest);
  s.outage_epoch_ns = nanoseconds(epoch);
  s.outage_seed = seed;
  return s;
}

}  // namespace

void checkOutageSchedule(const OutageSchedule& outages) {
  if (outages.every.count() < 0) fail("outage period {} ms is negative", outages.every.count());
  if (!outages.any()) return;
  if (outages.shortest.count() <= 0 || outages.longest < outages.shortest || outages.longest >= outages.every)
    fail("outages of {} to {} ms every {} ms: need 0 < shortest <= longest < period", outages.shortest.count(),
         outages.longest.count(), outages.every.count());
}

// The clock of bpf_ktime_get_ns() is CLOCK_MONOTONIC, and so is steady_clock's
// on Linux: outage windows computed here are the program's.
static_assert(std::chrono::steady_clock::is_steady);

void LinkLossFilter::SkeletonDeleter::operator()(link_loss_bpf* skeleton) const { link_loss_bpf__destroy(skeleton); }

LinkLossFilter::LinkLossFilter(std::string ns, std::string interface, std::uint64_t seed)
    : ns_(std::move(ns)), interface_(std::move(interface)) {
  skeleton_.reset(link_loss_bpf__open_and_load());
  if (!skeleton_) throwLastErrno("cannot load BPF program link_loss");
  // Each CPU draws from a stream of its own, all started from the seed.
  const int cpus = libbpf_num_possible_cpus();
  if (cpus <= 0) throwErrno(-cpus, "cannot count the possible CPUs");
  std::vector<std::uint64_t> streams(static_cast<std::size_t>(cpus));
  for (int cpu = 0; cpu < cpus; ++cpu)
    streams[static_cast<std::size_t>(cpu)] = link_loss_mix(seed ^ link_loss_mix(static_cast<std::uint64_t>(cpu)));
  const std::uint32_t zero = 0;
  int err = bpf_map__update_elem(skeleton_->maps.generator, &zero, sizeof zero, streams.data(),
                                 streams.size() * sizeof(std::uint64_t), 0);
  if (err) throwErrno(-err, "cannot seed BPF program link_loss");
  const int program = bpf_program__fd(skeleton_->progs.link_loss);
  inNamespace(ns_, [&] {
    ifindex_ = static_cast<int>(::if_nametoindex(interface_.c_str()));
    if (ifindex_ == 0) throwLastErrno(fmt::format("no interface {} in network namespace {}", interface_, ns_));
    bpf_tc_hook hook = egressHook(ifindex_);
    int rc = bpf_tc_hook_create(&hook);
    if (rc && rc != -EEXIST)
      throwErrno(-rc, fmt::format("cannot add a clsact qdisc to {} in {}", interface_, ns_));
    bpf_tc_opts opts = filterOptions();
    opts.prog_fd = program;
    opts.flags = BPF_TC_F_REPLACE;
    rc = bpf_tc_attach(&hook, &opts);
    if (rc) throwErrno(-rc, fmt::format("cannot attach BPF program link_loss to {} in {}", interface_, ns_));
  });
}

LinkLossFilter::~LinkLossFilter() {
  try {
    inNamespace(ns_, [&] {
      bpf_tc_hook hook = egressHook(ifindex_);
      bpf_tc_opts opts = filterOptions();
      bpf_tc_detach(&hook, &opts);  // fails when the interface went with its namespace: nothing to detach then
    });
  } catch (const Error& e) {
    spdlog::debug("link loss on {} in {}: {}", interface_, ns_, e.what());
  }
}

void LinkLossFilter::configure(double loss, const OutageSchedule& outages, std::uint64_t outageSeed,
                               std::chrono::steady_clock::time_point epoch) {
  if (!(loss >= 0 && loss <= 1)) fail("loss probability {} is not between 0 and 1", loss);
  checkOutageSchedule(outages);
  link_loss_settings s = settingsOf(outages, outageSeed, epoch);
  s.loss_threshold = static_cast<std::uint64_t>(std::llround(loss * 4294967296.0));
  const std::uint32_t zero = 0;
  int err = bpf_map__update_elem(skeleton_->maps.settings, &zero, sizeof zero, &s, sizeof s, BPF_ANY);
  if (err) throwErrno(-err, fmt::format("cannot configure link loss on {} in {}", interface_, ns_));
  outages_ = outages;
  outageSeed_ = outageSeed;
  epoch_ = epoch;
}

LinkCounters LinkLossFilter::counters() const {
  const int cpus = libbpf_num_possible_cpus();
  if (cpus <= 0) throwErrno(-cpus, "cannot count the possible CPUs");
  std::vector<link_loss_counters> perCpu(static_cast<std::size_t>(cpus));
  const std::uint32_t zero = 0;
  int err = bpf_map__lookup_elem(skeleton_->maps.counters, &zero, sizeof zero, perCpu.data(),
                                 perCpu.size() * sizeof(link_loss_counters), 0);
  if (err) throwErrno(-err, fmt::format("cannot read the link loss counters of {} in {}", interface_, ns_));
  LinkCounters total;
  for (const auto& c : perCpu) {
    total.packets += c.packets;
    total.dropped += c.dropped;
    total.outageDropped += c.outage_dropped;
    total.offloaded += c.offloaded;
  }
  return total;
}

std::vector<OutageWindow> LinkLossFilter::outages(std::chrono::steady_clock::time_point from,
                                                  std::chrono::steady_clock::time_point to) const {
  std::vector<OutageWindow> windows;
  if (!outages_.any() || to <= epoch_) return windows;
  const link_loss_settings s = settingsOf(outages_, outageSeed_, epoch_);
  const std::uint64_t begin = nanoseconds(std::max(from, epoch_)) - s.outage_epoch_ns;
  const std::uint64_t end = nanoseconds(to) - s.outage_epoch_ns;
  for (std::uint64_t slot = begin / s.outage_period_ns; slot <= end / s.outage_period_ns; ++slot) {
    unsigned long long start = 0, stop = 0;
    link_loss_outage(&s, slot, &start, &stop);
    if (timePoint(stop) > from && timePoint(start) < to) windows.push_back({timePoint(start), timePoint(stop)});
  }
  return windows;
}

}  // namespace vmsync
