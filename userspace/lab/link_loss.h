// Packet loss and outages on one direction of an emulated link: the BPF
// program bpf/link_loss.bpf.c at the clsact egress hook of one end of a veth
// pair (this kernel has no netem qdisc), and the counters it keeps.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct link_loss_bpf;  // the bpftool skeleton (link_loss.skel.h)

namespace vmsync {

/// Outages of a flaky link: time is cut into periods of `every`, and each
/// period holds one outage of `shortest`..`longest` at a seeded offset.
struct OutageSchedule {
  std::chrono::milliseconds every{0};  // 0: no outages
  std::chrono::milliseconds shortest{0};
  std::chrono::milliseconds longest{0};
  bool any() const { return every.count() > 0; }
};

/// One outage: every packet sent in [start, end) is dropped.
struct OutageWindow {
  std::chrono::steady_clock::time_point start;
  std::chrono::steady_clock::time_point end;
};

/// What one direction of a link did to the packets sent on it.
struct LinkCounters {
  std::uint64_t packets = 0;        // every packet seen
  std::uint64_t dropped = 0;        // by the loss draw
  std::uint64_t outageDropped = 0;  // inside an outage
  std::uint64_t offloaded = 0;      // packets that carried several segments (GSO): 0 on a lab link
};

/// link_loss loaded and attached at the egress of `interface` in network
/// namespace `ns`; the destructor detaches it (when the interface is still there).
class LinkLossFilter {
 public:
  /// `seed` starts the loss draws. Throws Error with the reason when the
  /// program cannot be loaded or attached (not root, no BPF, no clsact).
  LinkLossFilter(std::string ns, std::string interface, std::uint64_t seed);
  ~LinkLossFilter();
  LinkLossFilter(const LinkLossFilter&) = delete;
  LinkLossFilter& operator=(const LinkLossFilter&) = delete;

  /// From now on drops each IP packet with probability `loss` (0 to 1) and
  /// every packet inside the outages of `outages`, whose windows are drawn
  /// from `outageSeed` and counted from `epoch`. Throws Error naming what is
  /// out of range.
  void configure(double loss, const OutageSchedule& outages, std::uint64_t outageSeed,
                 std::chrono::steady_clock::time_point epoch);

  /// The counters, added up over the CPUs.
  LinkCounters counters() const;

  /// The outages that overlap [from, to), as configured now.
  std::vector<OutageWindow> outages(std::chrono::steady_clock::time_point from,
                                    std::chrono::steady_clock::time_point to) const;

 private:
  struct SkeletonDeleter {
    void operator()(link_loss_bpf* skeleton) const;
  };
  std::string ns_;
  std::string interface_;
  int ifindex_ = 0;
  OutageSchedule outages_;
  std::uint64_t outageSeed_ = 0;
  std::chrono::steady_clock::time_point epoch_;
  std::unique_ptr<link_loss_bpf, SkeletonDeleter> skeleton_;
};

/// Checks an outage schedule; throws Error naming what is wrong.
void checkOutageSchedule(const OutageSchedule& outages);

}  // namespace vmsync
