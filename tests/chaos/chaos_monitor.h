// The chaos harness's watchers: every device's QEMU polled over its tools QMP
// socket (two VMs answering "running" at once is a failure) and every
// device's serial log read for the guest's counter (it goes up by one across
// devices, and back only after a forced failover).
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "base/error.h"
#include "chaos_schedule.h"
#include "cluster.h"
#include "vmm/qmp_client.h"

namespace vmsync::testing {

/// Polls every device's QEMU over its tools QMP socket and reads every
/// device's serial log, on a thread of its own.
class Monitor {
 public:
  using Clock = std::chrono::steady_clock;

  Monitor(Cluster& cluster) : cluster_(cluster) {
    for (const auto& d : kDevices) offsets_[d] = 0;
    thread_ = std::thread([this] { loop(); });
  }
  ~Monitor() { stop(); }
  void stop() {
    done_ = true;
    if (thread_.joinable()) thread_.join();
  }

  /// Devices whose VM answered "running" at their last poll.
  std::set<std::string> running() {
    std::lock_guard lock(mutex_);
    std::set<std::string> out;
    for (const auto& [d, p] : last_)
      if (p.running) out.insert(d);
    return out;
  }
  std::vector<std::string> overlaps() {
    std::lock_guard lock(mutex_);
    return overlaps_;
  }
  /// Counter values in the order they were printed, with the device.
  std::vector<std::pair<long, std::string>> counter() {
    std::lock_guard lock(mutex_);
    return counter_;
  }
  /// A forced failover may take the guest back to its resumable point: the
  /// next value read (the new VM's first, the lost one being dead) may go back.
  void allowRollback() {
    std::lock_guard lock(mutex_);
    rollbackAllowed_ = true;
  }
  std::vector<std::string> continuityFailures() {
    std::lock_guard lock(mutex_);
    return continuity_;
  }

 private:
  struct Poll {
    bool running = false;
    Clock::time_point at;
    bool runningBefore = false;  // the poll before this one said running too
    Clock::time_point before;
  };

  static std::optional<bool> vmRunning(const std::string& socket) {
    if (!std::filesystem::exists(socket)) return false;
    try {
      QmpClient qmp(socket, std::chrono::milliseconds(300));
      return qmp.execute("query-status").value("running", false);
    } catch (const Error&) {
      return std::nullopt;  // no answer: neither running nor not
    }
  }

  void loop() {
    while (!done_) {
      for (const auto& d : kDevices) {
        const auto answer = vmRunning(cluster_.stateDir(d) + "/run/tools-qmp.sock");
        const auto now = Clock::now();
        std::lock_guard lock(mutex_);
        Poll& p = last_[d];
        Poll next{answer.value_or(false), now, p.running && answer.value_or(false), p.at};
        // `d` ran from its previous poll to this one: any other device that
        // answered "running" in between ran at the same time.
        if (next.running && next.runningBefore) {
          for (const auto& [other, q] : last_) {
            if (other == d || !q.running || q.at <= next.before) continue;
            overlaps_.push_back(fmt::format("{} and {} both running ({} ran from {} ms to {} ms, {} at {} ms)", d,
                                            other, d, ms(next.before), ms(now), other, ms(q.at)));
          }
        }
        if (answer) {
          p = next;
        } else {
          p = Poll{false, now, false, p.at};  // unknown: no interval is claimed across it
        }
      }
      readSerials();
      std::this_thread::sleep_for(std::chrono::milliseconds(40));
    }
  }

  long ms(Clock::time_point t) const {
    return static_cast<long>(std::chrono::duration_cast<std::chrono::milliseconds>(t - start_).count());
  }

  void readSerials() {
    std::vector<std::pair<long, std::string>> round;
    for (const auto& d : kDevices) {
      std::ifstream in(cluster_.serialLog(d), std::ios::binary);
      if (!in) continue;
      in.seekg(0, std::ios::end);
      const std::streamoff size = in.tellg();
      if (size < offsets_[d]) offsets_[d] = 0;  // a new log (the state directory was made again)
      if (size <= offsets_[d]) continue;
      in.seekg(offsets_[d]);
      std::string text(static_cast<std::size_t>(size - offsets_[d]), '\0');
      in.read(text.data(), static_cast<std::streamsize>(text.size()));
      const std::size_t complete = text.rfind('\n');
      if (complete == std::string::npos) continue;
      offsets_[d] += static_cast<std::streamoff>(complete + 1);
      for (long v : counterValues(text.substr(0, complete + 1))) round.emplace_back(v, d);
    }
    // Within one round of reads the order between devices is not known: the
    // values say it (two VMs running would print the same ones).
    std::stable_sort(round.begin(), round.end());
    std::lock_guard lock(mutex_);
    for (const auto& [v, d] : round) {
      if (!counter_.empty()) {
        const auto& [last, lastDevice] = counter_.back();
        if (v != last + 1 && !(rollbackAllowed_ && v <= last))
          continuity_.push_back(fmt::format("counter {} on {} follows {} on {}", v, d, last, lastDevice));
      }
      rollbackAllowed_ = false;
      counter_.emplace_back(v, d);
    }
  }

  Cluster& cluster_;
  std::thread thread_;
  std::atomic<bool> done_{false};
  std::mutex mutex_;
  Clock::time_point start_ = Clock::now();
  std::map<std::string, Poll> last_;
  std::map<std::string, std::streamoff> offsets_;
  std::vector<std::string> overlaps_;
  std::vector<std::pair<long, std::string>> counter_;
  std::vector<std::string> continuity_;
  bool rollbackAllowed_ = false;
};

}  // namespace vmsync::testing
