// Reading a Prometheus endpoint as a Prometheus server would, for tests.
#pragma once

#include <string>
#include <vector>

namespace vmsync::testing {

/// GET /metrics on 127.0.0.1:`port`: the body. Throws std::runtime_error
/// naming what failed, or with the start of an answer other than 200.
std::string scrapeMetrics(int port);

/// The value of the sample of metric `name` whose labels include every one
/// of `labels` (each `key="value"`) in Prometheus text `text`; NaN when no
/// sample matches.
double metricSample(const std::string& text, const std::string& name, const std::vector<std::string>& labels = {});

/// The sum of every sample of metric `name` in `text` (0 when there is none).
double metricSum(const std::string& text, const std::string& name);

/// The port of the metrics endpoint a vmsync process logged ("metrics served
/// on HOST:PORT (port N)"); -1 when `log` has no such line.
int metricsPortInLog(const std::string& log);

}  // namespace vmsync::testing
