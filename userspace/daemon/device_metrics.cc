#include "daemon/device_metrics.h"

#include "base/metrics.h"

namespace vmsync {

DeviceMetrics::DeviceMetrics(const std::string& vm, const std::string& device)
    : registry_(std::make_shared<prometheus::Registry>()),
      pushed_(prometheus::BuildCounter()
                  .Name("vmsync_device_checkpoints_pushed_total")
                  .Help("Checkpoints this device pushed and the server stored, by kind")
                  .Labels({{"vm", vm}, {"device", device}})
                  .Register(*registry_)),
      pushedBytes_(prometheus::BuildCounter()
                       .Name("vmsync_device_pushed_bytes_total")
                       .Help("Bytes sent in the pushes the server stored")
                       .Labels({{"vm", vm}, {"device", device}})
                       .Register(*registry_)
                       .Add({})),
      pushSeconds_(prometheus::BuildHistogram()
                       .Name("vmsync_device_push_seconds")
                       .Help("From sending a checkpoint to the server's answer that it stored it")
                       .Labels({{"vm", vm}, {"device", device}})
                       .Register(*registry_)
                       .Add({}, latencyBucketsSeconds())),
      harvestSeconds_(prometheus::BuildHistogram()
                          .Name("vmsync_device_harvest_seconds")
                          .Help("Finding and encoding what changed, per checkpoint pushed")
                          .Labels({{"vm", vm}, {"device", device}})
                          .Register(*registry_)
                          .Add({}, latencyBucketsSeconds())),
      pushesFailed_(prometheus::BuildCounter()
                        .Name("vmsync_device_pushes_failed_total")
                        .Help("Pushes the server did not store; their changes went into the next one")
                        .Labels({{"vm", vm}, {"device", device}})
                        .Register(*registry_)
                        .Add({})),
      applied_(prometheus::BuildCounter()
                   .Name("vmsync_device_checkpoints_applied_total")
                   .Help("Checkpoints this standby applied to its image")
                   .Labels({{"vm", vm}, {"device", device}})
                   .Register(*registry_)
                   .Add({})),
      applySeconds_(prometheus::BuildHistogram()
                        .Name("vmsync_device_apply_seconds")
                        .Help("Journaling and writing one checkpoint into the standby's image")
                        .Labels({{"vm", vm}, {"device", device}})
                        .Register(*registry_)
                        .Add({}, latencyBucketsSeconds())),
      position_(prometheus::BuildGauge()
                    .Name("vmsync_device_sequence")
                    .Help("The newest checkpoint this device's image holds (pushed and stored, or applied)")
                    .Labels({{"vm", vm}, {"device", device}})
                    .Register(*registry_)
                    .Add({})),
      active_(prometheus::BuildGauge()
                  .Name("vmsync_device_active")
                  .Help("1 while this device runs the VM, else 0")
                  .Labels({{"vm", vm}, {"device", device}})
                  .Register(*registry_)
                  .Add({})),
      epoch_(prometheus::BuildGauge()
                 .Name("vmsync_device_lease_epoch")
                 .Help("The lease epoch this device last ran the VM under")
                 .Labels({{"vm", vm}, {"device", device}})
                 .Register(*registry_)
                 .Add({})) {}

void DeviceMetrics::pushed(const char* kind, std::uint64_t wireBytes, double seconds, double harvestSeconds) {
  pushed_.Add({{"kind", kind}}).Increment();
  pushedBytes_.Increment(static_cast<double>(wireBytes));
  pushSeconds_.Observe(seconds);
  harvestSeconds_.Observe(harvestSeconds);
}

void DeviceMetrics::pushFailed() { pushesFailed_.Increment(); }

void DeviceMetrics::applied(double seconds) {
  applied_.Increment();
  applySeconds_.Observe(seconds);
}

void DeviceMetrics::position(std::uint64_t sequence) { position_.Set(static_cast<double>(sequence)); }

void DeviceMetrics::role(bool active, std::uint64_t epoch) {
  active_.Set(active ? 1 : 0);
  if (epoch != 0) epoch_.Set(static_cast<double>(epoch));
}

}  // namespace vmsync
