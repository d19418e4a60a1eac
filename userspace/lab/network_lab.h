// Devices on their own hosts: the sync server and each device in its own
// network namespace, each device joined to the server's namespace by a veth
// pair shaped like a mobile link (profiles below).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lab/delay_relay.h"
#include "lab/link_loss.h"

namespace vmsync {

/// A mobile link as emulated here. Bandwidth: tc HTB on each end of the veth
/// (uplink on the device's end, downlink on the server's end) with a short
/// byte queue under it (a bfifo holding `queueMs` at the link's rate, at least
/// 256 KiB). One-way delay and jitter: a DelayRelay in the server's namespace
/// that every connection from the device goes through. Loss and the outages
/// of a flaky link: the BPF program link_loss at the egress of each end of the
/// veth (link_loss.h), which the lab limits to one segment per packet
/// (gso_max_segs 1), so that the loss unit is a packet on the wire, at most
/// one MTU. Outages by hand: NetworkLab::setLinkUp (the device's end taken down).
struct LinkProfile {
  std::string name;
  double downMbit = 0;                  // server -> device
  double upMbit = 0;                    // device -> server
  std::chrono::milliseconds oneWayDelay{0};
  std::uint32_t queueMs = 0;            // queue at each end, in time at the link's rate
  double downLoss = 0;                  // probability that a packet server -> device is lost
  double upLoss = 0;                    // probability that a packet device -> server is lost
  std::chrono::milliseconds jitter{0};  // added to the one-way delay: uniform in [0, jitter]
  OutageSchedule outages;               // both directions at once; none unless set
};

/// Every profile, in one table: wifi, lte, 3g, flaky (lte with short outages
/// every few seconds), and lan (a home network, for an initial sync before
/// the devices go mobile).
const std::vector<LinkProfile>& linkProfiles();
/// The profile called `name`; throws Error naming the known ones.
const LinkProfile& linkProfile(const std::string& name);
/// Checks a profile's figures; throws Error naming the one out of range.
void checkLinkProfile(const LinkProfile& profile);

/// What both directions of a device's link did to their packets.
struct LinkTraffic {
  LinkCounters up;    // device -> server
  LinkCounters down;  // server -> device
};

/// Namespaces, veth pairs, shaping and delay relays for one server and its
/// devices; everything is removed by the destructor (also when a test fails
/// halfway), and leftovers of a process that died are removed on creation.
class NetworkLab {
 public:
  /// Creates the server's namespace. `serverPort`: where the server listens on
  /// 127.0.0.1 inside it. `seed` fixes every link's loss draws, outage
  /// windows and jitter draws (a run can be repeated; what the traffic meets
  /// still depends on its timing). Throws Error with the reason when
  /// namespaces cannot be made (not root, no netns support).
  explicit NetworkLab(std::uint16_t serverPort, std::uint64_t seed = 1);
  ~NetworkLab();
  NetworkLab(const NetworkLab&) = delete;
  NetworkLab& operator=(const NetworkLab&) = delete;

  /// Empty when this host can run a lab, else why not.
  static std::string unavailableReason();

  const std::string& serverNamespace() const { return serverNamespace_; }
  /// Address processes in the server's namespace use to reach the server.
  std::string serverAddress() const;

  /// Adds `device` in a namespace of its own, linked with `profile`.
  void addDevice(const std::string& device, const LinkProfile& profile);
  const std::string& deviceNamespace(const std::string& device) const;
  /// Address `device` dials to reach the server (its link's delay relay).
  std::string serverAddressFor(const std::string& device) const;
  /// The device's own address on its link (renumber changes it), and the
  /// server namespace's end of that link.
  std::string deviceHost(const std::string& device) const;
  std::string serverHostFor(const std::string& device) const;
  /// Gives the device's link another profile: rates, queues, loss and
  /// outages at once (outage windows counted from now), the delay and jitter
  /// for bytes sent from now on. Connections stay open.
  void setProfile(const std::string& device, const LinkProfile& profile);
  const LinkProfile& profile(const std::string& device) const;

  /// Takes the device's link down (an outage) or brings it back.
  void setLinkUp(const std::string& device, bool up);

  /// Gives the device's end of its link another address on the link's
  /// subnet (a phone that moved to another network), and returns it. The
  /// device's open connections die (the address they use is gone); it must
  /// connect again, from the new address, to the same server address.
  std::string renumber(const std::string& device);

  /// Packets seen and dropped on the device's link so far, each direction.
  LinkTraffic traffic(const std::string& device) const;
  /// The outages of the device's link (its profile's) that overlap [from, to).
  std::vector<OutageWindow> outages(const std::string& device, std::chrono::steady_clock::time_point from,
                                    std::chrono::steady_clock::time_point to) const;

  /// `argv` run inside namespace `ns` (through `ip netns exec`).
  static std::vector<std::string> inNamespace(const std::string& ns, std::vector<std::string> argv);

 private:
  struct DeviceLink {
    std::string ns;
    int index = 0;
    int host = 2;  // the device's address on its link is linkAddress(index, host)
    std::uint64_t seed = 0;
    LinkProfile profile;
    std::unique_ptr<DelayRelay> relay;
    std::unique_ptr<LinkLossFilter> upLoss;    // at the device's end
    std::unique_ptr<LinkLossFilter> downLoss;  // at the server's end
  };
  const DeviceLink& link(const std::string& device) const;
  void shape(const std::string& ns, const std::string& interface, double mbit, std::uint32_t queueMs);
  void applyLoss(DeviceLink& link, const LinkProfile& profile);

  std::string prefix_;
  std::uint16_t serverPort_;
  std::uint64_t seed_;
  std::string serverNamespace_;
  std::map<std::string, DeviceLink> devices_;
  std::vector<std::string> namespaces_;  // to delete, server's first
};

/// Runs a command to completion; throws Error with its output when it fails.
std::string runCommand(const std::vector<std::string>& argv);

}  // namespace vmsync
