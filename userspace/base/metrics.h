// Prometheus metrics over HTTP: `--metrics-listen ADDRESS` serves what a
// process's metrics hold as Prometheus text at http://ADDRESS/metrics. The
// metrics are prometheus-cpp's (Debian's prometheus-cpp-dev); the endpoint
// is its pull exposer, which answers on threads of its own.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace prometheus {
class Collectable;
class Exposer;
class Registry;
}  // namespace prometheus

namespace vmsync {

/// Histogram bounds for latencies, in seconds: from a millisecond (a push on
/// a LAN) to a minute (a full checkpoint on a slow uplink).
const std::vector<double>& latencyBucketsSeconds();

class MetricsEndpoint {
 public:
  /// Listens on `address` (host:port; port 0 picks a free one). Throws Error
  /// naming the address when it cannot.
  explicit MetricsEndpoint(const std::string& address);
  ~MetricsEndpoint();
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  /// Serves `metrics` at /metrics from now on, for as long as it lives.
  void serve(const std::weak_ptr<prometheus::Collectable>& metrics);
  /// The port it listens on.
  int port() const;

 private:
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::shared_ptr<prometheus::Registry> buildInfo_;
};

}  // namespace vmsync
