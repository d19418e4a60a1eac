#include "server_metrics.h"

#include <chrono>

#include "base/metrics.h"

namespace vmsync {

namespace {

using prometheus::Histogram;

/// A fold of a large VM takes seconds to minutes.
const Histogram::BucketBoundaries& foldBuckets() {
  static const Histogram::BucketBoundaries buckets{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600};
  return buckets;
}

std::uint64_t steadyNs() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

std::uint64_t wallNs() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
}

prometheus::ClientMetric gaugeOf(std::vector<prometheus::ClientMetric::Label> labels, double value) {
  prometheus::ClientMetric metric;
  metric.label = std::move(labels);
  metric.gauge.value = value;
  return metric;
}

}  // namespace

ServerMetrics::ServerMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      storedCheckpoints_(prometheus::BuildCounter()
                             .Name("vmsync_server_checkpoints_stored_total")
                             .Help("Checkpoints pushed and stored, by VM")
                             .Register(*registry_)),
      storedBytes_(prometheus::BuildCounter()
                       .Name("vmsync_server_stored_bytes_total")
                       .Help("Bytes of the checkpoints stored, by VM")
                       .Register(*registry_)),
      pushSeconds_(prometheus::BuildHistogram()
                       .Name("vmsync_server_push_seconds")
                       .Help("From a push's arrival to its answer (stored, or refused)")
                       .Register(*registry_)
                       .Add({}, latencyBucketsSeconds())),
      forwardedCheckpoints_(prometheus::BuildCounter()
                                .Name("vmsync_server_checkpoints_forwarded_total")
                                .Help("Checkpoints a standby applied after the server sent them, by VM")
                                .Register(*registry_)),
      forwardedBytes_(prometheus::BuildCounter()
                          .Name("vmsync_server_forwarded_bytes_total")
                          .Help("Bytes of the checkpoints forwarded and applied, by VM")
                          .Register(*registry_)),
      forwardSeconds_(prometheus::BuildHistogram()
                          .Name("vmsync_server_forward_seconds")
                          .Help("From sending a checkpoint to a standby to its answer that it applied it")
                          .Register(*registry_)
                          .Add({}, latencyBucketsSeconds())),
      switchSeconds_(prometheus::BuildHistogram()
                         .Name("vmsync_server_switch_seconds")
                         .Help("Switches that ended, by kind (switch, failover) and phase (as in the switch report)")
                         .Register(*registry_)),
      switches_(prometheus::BuildCounter()
                    .Name("vmsync_server_switches_total")
                    .Help("Switches, by kind (switch, failover) and result (done, failed)")
                    .Register(*registry_)),
      leaseEpoch_(prometheus::BuildGauge()
                      .Name("vmsync_server_lease_epoch")
                      .Help("The lease epoch of each VM")
                      .Register(*registry_)),
      foldSeconds_(prometheus::BuildHistogram()
                       .Name("vmsync_server_fold_seconds")
                       .Help("Folds of a chain into a new base, by result (done, failed)")
                       .Register(*registry_)),
      refused_(prometheus::BuildCounter()
                   .Name("vmsync_server_refused_total")
                   .Help("Operations refused (not authorized, over a quota, fenced, ...), by action")
                   .Register(*registry_)) {}

void ServerMetrics::stored(const std::string& vm, std::uint64_t bytes) {
  storedCheckpoints_.Add({{"vm", vm}}).Increment();
  storedBytes_.Add({{"vm", vm}}).Increment(static_cast<double>(bytes));
}

void ServerMetrics::pushAnswered(double seconds) { pushSeconds_.Observe(seconds); }

void ServerMetrics::forwarded(const std::string& vm, std::uint64_t bytes, double seconds) {
  forwardedCheckpoints_.Add({{"vm", vm}}).Increment();
  forwardedBytes_.Add({{"vm", vm}}).Increment(static_cast<double>(bytes));
  forwardSeconds_.Observe(seconds);
}

void ServerMetrics::devicePosition(const std::string& vm, const std::string& device, std::uint64_t head,
                                   std::uint64_t applied) {
  std::lock_guard lock(mutex_);
  Lag& lag = lag_[{vm, device}];
  lag.checkpoints = head > applied ? head - applied : 0;
  if (lag.checkpoints == 0) lag.behindSinceNs = 0;
  else if (lag.behindSinceNs == 0) lag.behindSinceNs = steadyNs();
}

void ServerMetrics::vmState(const std::string& vm, std::uint64_t epoch, std::uint64_t resumableCreatedUnixNs) {
  leaseEpoch_.Add({{"vm", vm}}).Set(static_cast<double>(epoch));
  std::lock_guard lock(mutex_);
  if (resumableCreatedUnixNs == 0) resumableCreatedUnixNs_.erase(vm);
  else resumableCreatedUnixNs_[vm] = resumableCreatedUnixNs;
}

void ServerMetrics::switched(const char* kind, wire::SwitchReport::Reader report) {
  switches_.Add({{"kind", kind}, {"result", "done"}}).Increment();
  const std::pair<const char*, std::uint64_t> phases[] = {
      {"catch_up", report.getCatchUpNs()},
      {"pause", report.getPauseNs()},
      {"final_harvest", report.getFinalHarvestNs()},
      {"device_state_save", report.getDeviceStateSaveNs()},
      {"transfer", report.getTransferNs()},
      {"apply", report.getApplyNs()},
      {"device_state_load", report.getDeviceStateLoadNs()},
      {"resume", report.getResumeNs()},
      {"total", report.getTotalNs()},
  };
  for (const auto& [phase, ns] : phases)
    switchSeconds_.Add({{"kind", kind}, {"phase", phase}}, latencyBucketsSeconds()).Observe(static_cast<double>(ns) / 1e9);
}

void ServerMetrics::switchFailed(const char* kind) { switches_.Add({{"kind", kind}, {"result", "failed"}}).Increment(); }

void ServerMetrics::folded(double seconds, bool done) {
  foldSeconds_.Add({{"result", done ? "done" : "failed"}}, foldBuckets()).Observe(seconds);
}

void ServerMetrics::refused(const std::string& action) { refused_.Add({{"action", action}}).Increment(); }

std::vector<prometheus::MetricFamily> ServerMetrics::Collect() const {
  auto families = registry_->Collect();
  prometheus::MetricFamily checkpoints{"vmsync_server_device_lag_checkpoints",
                                       "Checkpoints a device has yet to apply to reach the head, by VM and device",
                                       prometheus::MetricType::Gauge,
                                       {}};
  prometheus::MetricFamily seconds{"vmsync_server_device_lag_seconds",
                                   "Seconds since a device was last at the head (0 while it is), by VM and device",
                                   prometheus::MetricType::Gauge,
                                   {}};
  prometheus::MetricFamily resumable{"vmsync_server_resumable_point_age_seconds",
                                     "Age of each VM's newest resumable point: the guest time a failover loses",
                                     prometheus::MetricType::Gauge,
                                     {}};
  const std::uint64_t now = steadyNs(), wall = wallNs();
  std::lock_guard lock(mutex_);
  for (const auto& [key, lag] : lag_) {
    const std::vector<prometheus::ClientMetric::Label> labels{{"vm", key.first}, {"device", key.second}};
    checkpoints.metric.push_back(gaugeOf(labels, static_cast<double>(lag.checkpoints)));
    seconds.metric.push_back(gaugeOf(labels, lag.behindSinceNs == 0 ? 0.0 : (now - lag.behindSinceNs) / 1e9));
  }
  for (const auto& [vm, created] : resumableCreatedUnixNs_)
    resumable.metric.push_back(gaugeOf({{"vm", vm}}, wall > created ? (wall - created) / 1e9 : 0.0));
  families.push_back(std::move(checkpoints));
  families.push_back(std::move(seconds));
  families.push_back(std::move(resumable));
  return families;
}

}  // namespace vmsync
