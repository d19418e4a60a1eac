// What a sync server counts and measures, for Prometheus (see
// docs/operations.md, "Metrics"). Every VM's server updates it on the event
// loop; the metrics endpoint reads it on a thread of its own.
#pragma once

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "vmsync.capnp.h"

namespace vmsync {

class ServerMetrics final : public prometheus::Collectable {
 public:
  ServerMetrics();

  /// A push of `vm` stored (`bytes` on disk).
  void stored(const std::string& vm, std::uint64_t bytes);
  /// A push answered `seconds` after it arrived, stored or not.
  void pushAnswered(double seconds);
  /// A checkpoint of `vm` applied by a standby: `bytes` sent, `seconds` from
  /// sending it to the standby's answer.
  void forwarded(const std::string& vm, std::uint64_t bytes, double seconds);
  /// Where `device` of `vm` stands: `applied` of the chain's `head`.
  void devicePosition(const std::string& vm, const std::string& device, std::uint64_t head, std::uint64_t applied);
  /// The lease epoch of `vm`, and the wall-clock creation time of its newest
  /// resumable point (0: none).
  void vmState(const std::string& vm, std::uint64_t epoch, std::uint64_t resumableCreatedUnixNs);
  /// A switch (`kind`: "switch" or "failover") that ended with `report`.
  void switched(const char* kind, wire::SwitchReport::Reader report);
  void switchFailed(const char* kind);
  /// A fold that took `seconds`, and whether it replaced the base.
  void folded(double seconds, bool done);
  /// An operation (`action`: "push", "switch", ...) refused.
  void refused(const std::string& action);

  /// Every metric as of now (prometheus::Collectable).
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  struct Lag {
    std::uint64_t checkpoints = 0;
    std::uint64_t behindSinceNs = 0;  // steady clock; 0 while at the head
  };

  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& storedCheckpoints_;
  prometheus::Family<prometheus::Counter>& storedBytes_;
  prometheus::Histogram& pushSeconds_;
  prometheus::Family<prometheus::Counter>& forwardedCheckpoints_;
  prometheus::Family<prometheus::Counter>& forwardedBytes_;
  prometheus::Histogram& forwardSeconds_;
  prometheus::Family<prometheus::Histogram>& switchSeconds_;
  prometheus::Family<prometheus::Counter>& switches_;
  prometheus::Family<prometheus::Gauge>& leaseEpoch_;
  prometheus::Family<prometheus::Histogram>& foldSeconds_;
  prometheus::Family<prometheus::Counter>& refused_;

  /// Read when scraped: the ages are measured then.
  mutable std::mutex mutex_;
  std::map<std::pair<std::string, std::string>, Lag> lag_;  // by (VM, device)
  std::map<std::string, std::uint64_t> resumableCreatedUnixNs_;  // by VM
};

}  // namespace vmsync
