#include "metrics_scrape.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <regex>
#include <sstream>
#include <stdexcept>

namespace vmsync::testing {

namespace {

[[noreturn]] void failed(const std::string& what) {
  throw std::runtime_error(what + ": " + std::strerror(errno));
}

/// The value of `line` if it is a sample of metric `name`.
bool sampleOf(const std::string& line, const std::string& name, double& value) {
  if (line.rfind(name, 0) != 0 || line.size() <= name.size() || (line[name.size()] != '{' && line[name.size()] != ' '))
    return false;
  value = std::stod(line.substr(line.rfind(' ') + 1));
  return true;
}

}  // namespace

std::string scrapeMetrics(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) failed("socket");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<std::uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    ::close(fd);
    failed("connect to the metrics endpoint on port " + std::to_string(port));
  }
  const std::string request = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
  if (::write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    ::close(fd);
    failed("send the request to the metrics endpoint");
  }
  std::string response;
  char buffer[4096];
  for (ssize_t n; (n = ::read(fd, buffer, sizeof buffer)) > 0;) response.append(buffer, static_cast<std::size_t>(n));
  ::close(fd);
  const auto body = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || response.find(" 200 ") == std::string::npos || body == std::string::npos)
    throw std::runtime_error("the metrics endpoint answered: " + response.substr(0, 200));
  return response.substr(body + 4);
}

double metricSample(const std::string& text, const std::string& name, const std::vector<std::string>& labels) {
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    double value = 0;
    if (!sampleOf(line, name, value)) continue;
    bool all = true;
    for (const std::string& label : labels) all = all && line.find(label) != std::string::npos;
    if (all) return value;
  }
  return std::numeric_limits<double>::quiet_NaN();
}

double metricSum(const std::string& text, const std::string& name) {
  std::istringstream lines(text);
  double sum = 0;
  for (std::string line; std::getline(lines, line);) {
    double value = 0;
    if (sampleOf(line, name, value)) sum += value;
  }
  return sum;
}

int metricsPortInLog(const std::string& log) {
  static const std::regex line(R"(metrics served on \S+ \(port (\d+)\))");
  std::smatch port;
  return std::regex_search(log, port, line) ? std::stoi(port[1]) : -1;
}

}  // namespace vmsync::testing
