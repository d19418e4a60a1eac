#include "base/metrics.h"

#include <prometheus/exposer.h>

#include <exception>

#include "base/error.h"

namespace vmsync {

MetricsEndpoint::MetricsEndpoint(const std::string& address) {
  if (address.find(':') == std::string::npos)
    fail("--metrics-listen {}: give host:port (for example 127.0.0.1:9464)", address);
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/1);
  } catch (const std::exception& e) {
    fail("cannot serve metrics on {}: {}", address, e.what());
  }
  if (exposer_->GetListeningPorts().empty()) fail("cannot serve metrics on {}: nothing listens there", address);
}

MetricsEndpoint::~MetricsEndpoint() = default;

void MetricsEndpoint::serve(const std::weak_ptr<prometheus::Collectable>& metrics) {
  exposer_->RegisterCollectable(metrics);
}

int MetricsEndpoint::port() const { return exposer_->GetListeningPorts().front(); }

}  // namespace vmsync
