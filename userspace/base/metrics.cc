#include "base/metrics.h"

#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include <exception>

#include "base/error.h"
#include "base/version.h"

namespace vmsync {

const std::vector<double>& latencyBucketsSeconds() {
  static const std::vector<double> buckets{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                           0.5,   1,      2.5,   5,    10,    30,   60};
  return buckets;
}

MetricsEndpoint::MetricsEndpoint(const std::string& address) {
  if (address.find(':') == std::string::npos)
    fail("--metrics-listen {}: give host:port (for example 127.0.0.1:9464)", address);
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/1);
  } catch (const std::exception& e) {
    fail("cannot serve metrics on {}: {}", address, e.what());
  }
  if (exposer_->GetListeningPorts().empty()) fail("cannot serve metrics on {}: nothing listens there", address);
  // What is running, as Prometheus exporters say it: a gauge of 1 whose
  // labels are the version and the commit.
  buildInfo_ = std::make_shared<prometheus::Registry>();
  prometheus::BuildGauge()
      .Name("vmsync_build_info")
      .Help("The vmsync build serving these metrics (always 1)")
      .Register(*buildInfo_)
      .Add({{"version", buildVersion()}, {"commit", buildCommit()}})
      .Set(1);
  exposer_->RegisterCollectable(buildInfo_);
}

MetricsEndpoint::~MetricsEndpoint() = default;

void MetricsEndpoint::serve(const std::weak_ptr<prometheus::Collectable>& metrics) {
  exposer_->RegisterCollectable(metrics);
}

int MetricsEndpoint::port() const { return exposer_->GetListeningPorts().front(); }

}  // namespace vmsync
