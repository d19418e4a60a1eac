#include "lab/machine_usage.h"

#include <fmt/format.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>

#include <chrono>
#include <fstream>
#include <iterator>
#include <sstream>
#include <vector>

namespace vmsync {

double diskBusyMs(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return -1;
  std::ifstream in("/proc/diskstats");
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    unsigned major = 0, minor = 0;
    std::string name;
    fields >> major >> minor >> name;
    if (major != ::major(st.st_dev) || minor != ::minor(st.st_dev)) continue;
    std::vector<double> values;
    for (double v; fields >> v;) values.push_back(v);
    return values.size() >= 10 ? values[9] : -1;  // field 13 of the line: time spent doing I/Os
  }
  return -1;
}

double writtenBytes(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/io", pid));
  for (std::string line; std::getline(in, line);)
    if (line.rfind("write_bytes:", 0) == 0) return std::stod(line.substr(12));
  return 0;
}

std::pair<double, double> machineJiffies() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  in >> cpu;
  double value = 0, total = 0, idle = 0;
  for (int i = 0; i < 10 && in >> value; ++i) {
    total += value;
    if (i == 3 || i == 4) idle += value;  // idle, iowait
  }
  return {total - idle, total};
}

double selfCpuSeconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec + (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

LoopSampler::LoopSampler(pid_t pid) : path_(fmt::format("/proc/{}/task/{}/stat", pid, pid)) {
  thread_ = std::thread([this] {
    while (!stop_) {
      std::ifstream in(path_);
      std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      const std::size_t end = text.rfind(')');
      if (end != std::string::npos && end + 2 < text.size()) {
        const char state = text[end + 2];
        ++total_;
        if (state == 'R') ++running_;
        if (state == 'D') ++disk_;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
}

double threadCpuMs() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) / 1e6;
}

}  // namespace vmsync
