// What a device daemon counts and measures, for Prometheus (see
// docs/operations.md, "Metrics"): `vmsync active|standby --metrics-listen`.
// Every metric carries the VM's and the device's names.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <cstdint>
#include <memory>
#include <string>


namespace vmsync {

class DeviceMetrics {
 public:
  DeviceMetrics(const std::string& vm, const std::string& device);

  /// What an endpoint serves.
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  /// A checkpoint stored by the server: `kind` is full, incremental,
  /// resumable (a resumable point, the VM went on) or final (a switch's or a
  /// park's); `wireBytes` sent in `seconds`, after a harvest of
  /// `harvestSeconds`.
  void pushed(const char* kind, std::uint64_t wireBytes, double seconds, double harvestSeconds);
  /// A push not stored (its changes go into the next one).
  void pushFailed();
  /// A checkpoint applied to this standby's image in `seconds`.
  void applied(double seconds);
  /// The newest checkpoint this device's image holds (pushed, or applied).
  void position(std::uint64_t sequence);
  /// Whether this device runs the VM, under lease `epoch`.
  void role(bool active, std::uint64_t epoch);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& pushed_;
  prometheus::Counter& pushedBytes_;
  prometheus::Histogram& pushSeconds_;
  prometheus::Histogram& harvestSeconds_;
  prometheus::Counter& pushesFailed_;
  prometheus::Counter& applied_;
  prometheus::Histogram& applySeconds_;
  prometheus::Gauge& position_;
  prometheus::Gauge& active_;
  prometheus::Gauge& epoch_;
};

}  // namespace vmsync
